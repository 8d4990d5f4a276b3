// Drive OHIF in Debian's chromium (playwright-core, never a downloaded browser): open a
// study, load a SEG onto the CT, show one slice with the SEG shown and hidden, then open
// the SR. Writes screenshots and prints one JSON object (the last line of stdout) with
// what the page showed, for tests/viewer/test_ohif.py to judge.
//
//   node ohif_check.mjs spec.json
//
// spec: {nodeModules, chromium, baseUrl, studyUID, segDescription, srDescription,
//        keyImage: {description, sopInstanceUID}, sourceSOPInstanceUID, outDir, prefix,
//        timeoutMs}
// Every step waits for a condition (a selector, network idle, a cornerstone render event,
// two identical screenshots in a row), never for a fixed time. A failed step is recorded in
// `errors` and the rest still runs, so a broken SEG gives screenshots and figures to look at.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const spec = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const require = createRequire(path.join(spec.nodeModules, 'noop.js'));
const { chromium } = require('playwright-core');

const timeout = spec.timeoutMs ?? 60000;
const result = { errors: [], labels: [], screenshots: {}, console: [] };
const shot = name => path.join(spec.outDir, `${spec.prefix}-${name}.png`);

async function step(name, fn) {
  try {
    return await fn();
  } catch (err) {
    result.errors.push(`${name}: ${String(err && err.message ? err.message : err).slice(0, 500)}`);
    return undefined;
  }
}

// Arm a promise that settles on the viewport's next render (cornerstone's IMAGE_RENDERED
// plus two animation frames), or after `ms` when nothing renders.
async function armRender(page, ms) {
  await page.evaluate(ms => {
    window.__unictRendered = new Promise(resolve => {
      const el = window.cornerstone.getEnabledElements()[0].viewport.element;
      const settle = value => {
        el.removeEventListener(window.cornerstone.Enums.Events.IMAGE_RENDERED, handler);
        resolve(value);
      };
      const handler = () => requestAnimationFrame(() => requestAnimationFrame(() => settle(true)));
      el.addEventListener(window.cornerstone.Enums.Events.IMAGE_RENDERED, handler);
      setTimeout(() => settle(false), ms);
    });
  }, ms);
}
const rendered = page => page.evaluate(() => window.__unictRendered);

// A screenshot once the page has stopped changing (two identical in a row).
async function stableScreenshot(page, file) {
  let previous = await page.screenshot();
  for (let i = 0; i < 20; i++) {
    const current = await page.screenshot();
    if (current.equals(previous)) break;
    previous = current;
  }
  await page.screenshot({ path: file });
  return file;
}

const browser = await chromium.launch({
  executablePath: spec.chromium ?? '/usr/bin/chromium',
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader'],
  headless: true,
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(timeout);
  page.on('pageerror', err => result.console.push(`pageerror: ${err.message}`.slice(0, 400)));
  page.on('console', msg => {
    if (msg.type() === 'error') result.console.push(`error: ${msg.text()}`.slice(0, 400));
  });

  const url = `${spec.baseUrl}/viewer?StudyInstanceUIDs=${spec.studyUID}`;
  await page.goto(url);
  await page.locator('canvas').first().waitFor({ timeout });
  await page.waitForLoadState('networkidle', { timeout });
  // OHIF's first-visit tour stands over the viewport.
  const skip = page.getByText('Skip all', { exact: true });
  if (await skip.count()) await skip.click();

  // Load the SEG: double-click its series in the study browser, accept the prompt.
  await step('open SEG', async () => {
    await page.getByText(spec.segDescription, { exact: true }).dblclick();
    await page.getByRole('button', { name: 'Yes', exact: true }).click({ timeout });
    await page.waitForLoadState('networkidle', { timeout });
  });
  await step('segmentation panel', async () => {
    const title = page.locator('[data-cy="data-row-title"]');
    if (!(await title.first().isVisible())) {
      await page.locator('[data-cy="panelSegmentation-btn"]').click();
    }
    await title.first().waitFor({ timeout });
    result.labels = await title.allInnerTexts();
  });

  // Where OHIF put the SEG: segmented pixels per source instance of its labelmap, over
  // the whole stack (the pixel check below sees one slice; this sees every frame).
  await step('labelmap', async () => {
    result.labelmap = await page.evaluate(() => {
      const cs = window.cornerstone;
      const counts = {};
      for (const seg of window.cornerstoneTools.segmentation.state.getSegmentations()) {
        for (const id of seg.representationData.Labelmap?.imageIds ?? []) {
          const image = cs.cache.getImage(id);
          const match = /\/instances\/([0-9.]+)\//.exec(image?.referencedImageId ?? '');
          if (!match) continue;
          const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
          let n = 0;
          for (let i = 0; i < data.length; i++) if (data[i]) n++;
          if (n) counts[match[1]] = (counts[match[1]] ?? 0) + n;
        }
      }
      return counts;
    });
  });

  // Show the source slice the test chose, and where its image pixels land on the page.
  await step('go to slice', async () => {
    await armRender(page, 15000);
    result.slice = await page.evaluate(async uid => {
      const vp = window.cornerstone.getEnabledElements()[0].viewport;
      const ids = vp.getImageIds();
      const index = ids.findIndex(id => id.includes(`/instances/${uid}/`));
      if (index < 0) throw new Error(`source instance ${uid} is not in the viewport's stack`);
      await vp.setImageIdIndex(index);
      return { index, count: ids.length };
    }, spec.sourceSOPInstanceUID);
    await rendered(page);
    result.mapping = await page.evaluate(() => {
      const cs = window.cornerstone;
      const vp = cs.getEnabledElements()[0].viewport;
      const imageId = vp.getCurrentImageId();
      const rect = vp.canvas.getBoundingClientRect();
      // Image pixel (column, row) -> page pixel, from three pixel centres.
      const page = ([c, r]) => {
        const xy = vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [c, r]));
        return [xy[0] + rect.left, xy[1] + rect.top];
      };
      return {
        imageId,
        origin: page([0, 0]),
        column: page([1, 0]),
        row: page([0, 1]),
        canvas: [rect.left, rect.top, rect.width, rect.height],
      };
    });
  });

  // The same slice with the SEG shown, then hidden.
  result.screenshots.shown = await stableScreenshot(page, shot('seg-shown'));
  await step('hide SEG', async () => {
    await armRender(page, 15000);
    await page.locator('[data-cy="all-segments-visibility-toggle"]').click();
    await rendered(page);
  });
  result.screenshots.hidden = await stableScreenshot(page, shot('seg-hidden'));
  await step('show SEG again', async () => {
    await armRender(page, 15000);
    await page.locator('[data-cy="all-segments-visibility-toggle"]').click();
    await rendered(page);
  });

  if (spec.keyImage) {
    // The key-image series (Secondary Capture): it replaces the CT in the viewport.
    await step('open key images', async () => {
      await page.getByText(spec.keyImage.description, { exact: true }).dblclick();
      await page.waitForFunction(
        uid => {
          const vp = window.cornerstone.getEnabledElements()[0]?.viewport;
          return Boolean(vp?.getCurrentImageId?.()?.includes(`/instances/${uid}/`));
        },
        spec.keyImage.sopInstanceUID,
        { timeout },
      );
      await page.waitForLoadState('networkidle', { timeout });
      result.keyImage = await page.evaluate(() => {
        const vp = window.cornerstone.getEnabledElements()[0].viewport;
        const rect = vp.canvas.getBoundingClientRect();
        return {
          imageId: vp.getCurrentImageId(),
          canvas: [rect.left, rect.top, rect.width, rect.height],
        };
      });
    });
    result.screenshots.keyImage = await stableScreenshot(page, shot('key-image'));
  }

  if (spec.srDescription) {
    await step('open SR', async () => {
      await page.getByText(spec.srDescription, { exact: true }).dblclick();
      await page.waitForLoadState('networkidle', { timeout });
      // Either the SR's content or OHIF's error dialog.
      await page
        .locator('[data-cy="viewport-pane"], [role="dialog"]')
        .first()
        .waitFor({ timeout });
    });
    // OHIF draws the SR's measurements as SVG annotations on the image they reference.
    await step('SR annotations', async () => {
      await page.waitForFunction(
        () =>
          document.querySelector('[role="dialog"]') ||
          document.body.innerText.includes('Something went wrong') ||
          [...document.querySelectorAll('svg text')].some(t => t.textContent.trim()),
        null,
        { timeout },
      );
      result.srView = await page.evaluate(() => {
        const cs = window.cornerstone;
        const vp = cs.getEnabledElements()[0].viewport;
        const imageId = vp.getCurrentImageId();
        const rect = vp.canvas.getBoundingClientRect();
        const page = ([c, r]) => {
          const xy = vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [c, r]));
          return [xy[0] + rect.left, xy[1] + rect.top];
        };
        return {
          imageId,
          origin: page([0, 0]),
          column: page([1, 0]),
          row: page([0, 1]),
          canvas: [rect.left, rect.top, rect.width, rect.height],
          // One entry per text line (a text box's lines are its tspans).
          annotationText: [...vp.element.querySelectorAll('svg text')].flatMap(t => {
            const spans = [...t.querySelectorAll('tspan')];
            return spans.length ? spans.map(x => x.textContent) : [t.textContent];
          }),
        };
      });
    });
    result.screenshots.sr = await stableScreenshot(page, shot('sr'));
    result.srText = await page.locator('body').innerText();
  }
} catch (err) {
  result.errors.push(`fatal: ${String(err && err.message ? err.message : err).slice(0, 500)}`);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
