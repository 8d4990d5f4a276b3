"""The radiologist's view: the node's SEG and SR in a real viewer, in a real browser.

A phantom study goes Orthanc -> node -> Orthanc (as in tests/service/test_end_to_end.py).
The prebuilt OHIF viewer (npm ``@ohif/app``, pinned) is served by deploy/viewer/serve.py
with ``/dicom-web`` proxied to that Orthanc; Debian's chromium, driven by
``playwright-core`` (tests/viewer/ohif_check.mjs), opens the study, loads the SEG onto
the CT and shows the slice where the SEG itself has most of its segment, with the SEG
shown and hidden. The pixels that change between the two screenshots must be the
segment's colour and lie where the SEG's mask is on that slice; the segment label must
be in the panel. A SEG broken on purpose (frames referencing the wrong source instances)
must fail the same check. The SR must open on a lesion's key slice with its long axis drawn
where the SR's coordinates put it and labelled with its values. Screenshots go to
artifacts/viewer/.

Needs what deploy/setup.sh installs: /usr/bin/chromium, and the viewer and
playwright-core under .cache/viewer (deploy/viewer/install.sh).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.uid import generate_uid
from scipy import ndimage

from model.phantom import generate
from model.phantom.dicom_series import write_ct_series
from service.config import load_settings
from service.node import Node
from service.outputs.sr import LONG_AXIS, VOLUME
from service.processor import UniCTProcessor
from tests.conftest import OrthancFixture, wait_until
from tests.orthanc import PASSWORD, USER
from tests.service.test_end_to_end import COMPREHENSIVE_3D_SR, SEG_STORAGE, node_config

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("UNICT_VIEWER_CACHE", ROOT / ".cache" / "viewer"))
OHIF_DIST = CACHE / "ohif" / "dist"
NODE_MODULES = CACHE / "node_modules"
CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path(__file__).with_name("ohif_check.mjs")
ARTIFACTS = ROOT / "artifacts" / "viewer"
# A case whose pleural effusion is large (thousands of voxels over tens of slices).
SEED = 4
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEG_DESCRIPTION = "UniCT segmentation"
SR_DESCRIPTION = "UniCT report"
BROKEN_DESCRIPTION = "UniCT segmentation (broken on purpose)"
KEY_IMAGES_DESCRIPTION = "UniCT key images"

pytestmark = [pytest.mark.orthanc, pytest.mark.slow]


def require_viewer() -> None:
    """Skip without the browser or the npm parts; under CI (``CI`` set) fail instead.

    CI installs them (deploy/setup.sh), so a skip there would hide a broken install.
    """
    missing = [
        what
        for what, ok in (
            (str(CHROMIUM), CHROMIUM.exists()),
            ("node", shutil.which("node") is not None),
            (str(OHIF_DIST / "index.html"), (OHIF_DIST / "index.html").exists()),
            (str(NODE_MODULES / "playwright-core"), (NODE_MODULES / "playwright-core").exists()),
        )
        if not ok
    ]
    if missing:
        message = f"viewer harness missing: {', '.join(missing)} (bash deploy/setup.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@dataclass(frozen=True)
class Study:
    """The phantom study after the node's round trip, as Orthanc holds it."""

    study_uid: str
    source_uids: tuple[str, ...]  # CT instances in slice order
    seg: pydicom.Dataset
    sr: pydicom.Dataset
    key_images: tuple[pydicom.Dataset, ...]
    result: dict[str, Any]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancFixture) -> Study:
    """A phantom with a finding sent through the node; its SEG and SR are back in Orthanc."""
    tmp = tmp_path_factory.mktemp("viewer-study")
    phantom = generate(SEED, "training", p_normal=0.0)
    paths = write_ct_series(
        phantom.hu,
        phantom.affine_lps,
        tmp / "ct",
        patient_name="Phantom^Viewer",
        patient_id="VIEWER-1",
        slice_thickness=phantom.grid.slice_thickness,
    )
    ct = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in ct])
    source_uids = tuple(str(ct[i].SOPInstanceUID) for i in np.argsort(z))
    study_uid = str(ct[0].StudyInstanceUID)

    config_path = node_config(tmp, orthanc)
    config = yaml.safe_load(config_path.read_text())
    config["outputs"] = {"sc": {"enabled": True, "series_description": KEY_IMAGES_DESCRIPTION}}
    config_path.write_text(yaml.safe_dump(config))
    settings = load_settings(config_path)
    processor = UniCTProcessor(settings)
    node = Node(settings, processor, processor.status)
    client = orthanc.server.client
    with node:
        processor.load()
        for p in paths:
            client.upload_file(p)
        (series_id,) = client.lookup(str(ct[0].SeriesInstanceUID), filter="Series")
        client.modalities.send(orthanc.modality, series_id, timeout=120)
        job = wait_until(
            lambda: next(
                (j for j in node.store.list_jobs() if j.state.value in ("DONE", "FAILED")), None
            ),
            timeout=300,
            what="the job to end",
        )
    assert job.state.value == "DONE", (job.error_stage, job.error_reason)
    (study_id,) = client.lookup(study_uid, filter="Study")
    found: dict[str, list[pydicom.Dataset]] = {}
    for sid in client.studies.get_series_ids(study_id):
        for iid in client.series.get_instances_ids(sid):
            ds = pydicom.dcmread(io.BytesIO(client.instances.get_file(iid)))
            found.setdefault(str(ds.SOPClassUID), []).append(ds)
    assert SEG_STORAGE in found, "the node produced no SEG for this phantom"
    key_images = sorted(found.get(SECONDARY_CAPTURE, []), key=lambda ds: int(ds.InstanceNumber))
    return Study(
        study_uid,
        source_uids,
        found[SEG_STORAGE][0],
        found[COMPREHENSIVE_3D_SR][0],
        tuple(key_images),
        job.outputs["result"],
    )


@pytest.fixture(scope="module")
def viewer(orthanc: OrthancFixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """deploy/viewer/serve.py on a free loopback port, proxying the test Orthanc."""
    require_viewer()
    ready = tmp_path_factory.mktemp("viewer") / "port"
    log = ready.with_name("serve.log")
    env = {
        **os.environ,
        "UNICT_VIEWER_PACS_USER": USER,
        "UNICT_VIEWER_PACS_PASSWORD": PASSWORD,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "deploy" / "viewer" / "serve.py"),
                "--dist",
                str(OHIF_DIST),
                "--dicomweb",
                f"{orthanc.server.url}/dicom-web",
                "--port",
                "0",
                "--ready-file",
                str(ready),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        port = wait_until(
            lambda: process.poll() is None and ready.exists() and ready.read_text(),
            timeout=30,
            what="the viewer proxy to listen",
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


# --------------------------------------------------------------------------- SEG geometry


def segment_slices(seg: pydicom.Dataset, source_uids: tuple[str, ...]) -> npt.NDArray[np.uint8]:
    """``(slices, rows, columns, segments)`` of the SEG, on the source instances it references."""
    parsed = hd.seg.Segmentation.from_dataset(copy.deepcopy(seg))
    return np.asarray(
        parsed.get_pixels_by_source_instance(list(source_uids), ignore_spatial_locations=True)
    )


def target_slice(
    study: Study,
) -> tuple[int, int, npt.NDArray[np.bool_], list[tuple[int, int, int]]]:
    """Where the SEG has the most segmented pixels: slice index, its largest segment (index
    into SegmentSequence), the union of every segment's mask there, and their colours."""
    pixels = segment_slices(study.seg, study.source_uids) > 0
    index = int(pixels.any(axis=-1).sum(axis=(1, 2)).argmax())
    on_slice = pixels[index].sum(axis=(0, 1))
    segment = int(on_slice.argmax())
    colours = [segment_rgb(study.seg, k) for k in np.nonzero(on_slice)[0]]
    return index, segment, pixels[index].any(axis=-1), colours


def expected_labelmap(study: Study) -> dict[str, int]:
    """Segmented pixels (any segment) per source instance, from the SEG itself."""
    pixels = segment_slices(study.seg, study.source_uids)
    counts = (pixels > 0).any(axis=-1).sum(axis=(1, 2))
    return {uid: int(n) for uid, n in zip(study.source_uids, counts, strict=True) if n}


def break_seg(seg: pydicom.Dataset, source_uids: tuple[str, ...]) -> pydicom.Dataset:
    """A copy of the SEG whose frames reference the wrong source instances.

    Each frame's Source Image (and Referenced Series) points to the instance at the mirror
    position of the stack, and its Plane Position follows that reference: a SEG that a
    validator may pass but whose masks sit on the wrong slices.
    """
    broken = copy.deepcopy(seg)
    order = {uid: i for i, uid in enumerate(source_uids)}
    mirror = {uid: source_uids[len(source_uids) - 1 - i] for uid, i in order.items()}
    positions: dict[str, Any] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        positions[uid] = frame.PlanePositionSequence[0].ImagePositionPatient
    for frame in broken.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        wrong = mirror[str(source.ReferencedSOPInstanceUID)]
        source.ReferencedSOPInstanceUID = wrong
        if wrong in positions:
            frame.PlanePositionSequence[0].ImagePositionPatient = positions[wrong]
    broken.SOPInstanceUID = generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.SeriesInstanceUID = generate_uid()
    broken.SeriesNumber = 9909
    broken.SeriesDescription = BROKEN_DESCRIPTION
    return broken


# --------------------------------------------------------------------------- browser


def run_driver(
    base_url: str,
    study: Study,
    *,
    seg_description: str,
    sr_description: str | None,
    key_image: pydicom.Dataset | None = None,
    source_uid: str,
    prefix: str,
    tmp_path: Path,
) -> dict[str, Any]:
    """Run tests/viewer/ohif_check.mjs and return what it saw."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    spec = {
        "nodeModules": str(NODE_MODULES),
        "chromium": str(CHROMIUM),
        "baseUrl": base_url,
        "studyUID": study.study_uid,
        "segDescription": seg_description,
        "srDescription": sr_description,
        "keyImage": (
            {"description": KEY_IMAGES_DESCRIPTION, "sopInstanceUID": str(key_image.SOPInstanceUID)}
            if key_image is not None
            else None
        ),
        "sourceSOPInstanceUID": source_uid,
        "outDir": str(ARTIFACTS),
        "prefix": prefix,
        "timeoutMs": 90_000,
    }
    spec_path = tmp_path / f"{prefix}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
    started = time.monotonic()
    out = subprocess.run(
        ["node", str(DRIVER), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["seconds"] = round(time.monotonic() - started, 1)
    (ARTIFACTS / f"{prefix}-result.json").write_text(json.dumps(result, indent=1))
    return result


@dataclass(frozen=True)
class OverlayCheck:
    """How the overlay on screen compares with the SEG's mask on that slice."""

    changed: int  # screen pixels that differ between SEG shown and hidden, in the viewport
    expected: float  # screen pixels the mask covers at the displayed scale
    inside: float  # fraction of the changed pixels that lie on the mask (1-pixel tolerance)
    colour_match: float  # fraction of the changed pixels nearer a segment's colour than before

    @property
    def passed(self) -> bool:
        return (
            self.changed >= 0.5 * self.expected
            and self.changed <= 2.0 * self.expected
            and self.inside >= 0.9
            and self.colour_match >= 0.8
        )


def check_overlay(
    result: dict[str, Any],
    mask: npt.NDArray[np.bool_],
    colours: list[tuple[int, int, int]],
) -> OverlayCheck:
    """Compare the SEG-shown and SEG-hidden screenshots with the mask of the shown slice."""
    if "mapping" not in result or not {"shown", "hidden"} <= set(result["screenshots"]):
        return OverlayCheck(0, float(mask.sum()), 0.0, 0.0)
    shown = np.asarray(Image.open(result["screenshots"]["shown"]).convert("RGB"), dtype=np.int32)
    hidden = np.asarray(Image.open(result["screenshots"]["hidden"]).convert("RGB"), dtype=np.int32)
    mapping = result["mapping"]
    left, top, width, height = (round(v) for v in mapping["canvas"])
    changed = np.zeros(shown.shape[:2], dtype=bool)
    window = (slice(top, top + height), slice(left, left + width))
    changed[window] = np.abs(shown[window] - hidden[window]).sum(axis=-1) > 30
    origin = np.array(mapping["origin"])
    axes = np.stack([np.array(mapping["column"]) - origin, np.array(mapping["row"]) - origin], 1)
    expected = float(mask.sum()) * abs(float(np.linalg.det(axes)))
    ys, xs = np.nonzero(changed)
    if not len(xs):
        return OverlayCheck(0, expected, 0.0, 0.0)
    # Screen pixel centre -> continuous image (column, row); pixel (i, j) spans [i, i + 1).
    cr = np.linalg.inv(axes) @ (np.stack([xs + 0.5, ys + 0.5]) - origin[:, None])
    cols, rows = np.floor(cr).astype(int)
    valid = (cols >= 0) & (cols < mask.shape[1]) & (rows >= 0) & (rows < mask.shape[0])
    tolerant = ndimage.binary_dilation(mask, iterations=1)
    inside = np.zeros(len(xs), dtype=bool)
    inside[valid] = tolerant[rows[valid], cols[valid]]
    palette = np.array(colours, dtype=np.int32)  # (segments, 3)

    def distance(pixels: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
        return np.abs(pixels[:, None, :] - palette[None]).sum(-1).min(axis=1)

    nearer = distance(shown[ys, xs]) < distance(hidden[ys, xs])
    return OverlayCheck(len(xs), expected, float(inside.mean()), float(nearer.mean()))


def segment_rgb(seg: pydicom.Dataset, segment_index: int) -> tuple[int, int, int]:
    """The segment's recommended display colour (CIELab in the SEG) as sRGB."""
    lab = seg.SegmentSequence[segment_index].RecommendedDisplayCIELabValue
    rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb()
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def seen(viewer: str, study: Study, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One browser session on the node's SEG, key images and SR."""
    index, segment, mask, colours = target_slice(study)
    result = run_driver(
        viewer,
        study,
        seg_description=SEG_DESCRIPTION,
        sr_description=SR_DESCRIPTION,
        key_image=study.key_images[0] if study.key_images else None,
        source_uid=study.source_uids[index],
        prefix="node-seg",
        tmp_path=tmp_path_factory.mktemp("driver"),
    )
    result["check"] = check_overlay(result, mask, colours)
    result["segment"] = segment
    return result


def test_seg_overlays_the_lesion_in_ohif(seen: dict[str, Any], study: Study) -> None:
    check: OverlayCheck = seen["check"]
    print(f"viewer run {seen['seconds']} s; overlay: {check}; errors: {seen['errors']}")
    seg_steps = ("open SEG", "segmentation panel", "labelmap", "go to slice", "hide SEG")
    assert not [e for e in seen["errors"] if e.startswith(seg_steps)], seen["errors"]
    label = str(study.seg.SegmentSequence[seen["segment"]].SegmentLabel)
    assert label in seen["labels"], seen["labels"]
    assert check.passed, check


def test_ohif_puts_every_seg_frame_on_its_source_slice(seen: dict[str, Any], study: Study) -> None:
    """Every slice of OHIF's labelmap holds the SEG's pixels of that source instance.

    The node leaves empty frames out by default (``outputs.seg.omit_empty_frames``), which
    some OHIF versions mis-placed; this holds OHIF 3.13 to the whole stack.
    """
    expected = expected_labelmap(study)
    assert seen.get("labelmap") == expected, {
        "ohif": seen.get("labelmap"),
        "seg": expected,
    }


def test_key_images_show_the_burned_in_finding_in_ohif(seen: dict[str, Any], study: Study) -> None:
    """The Secondary Capture series (outputs.sc) opens in OHIF with the finding's colour."""
    assert study.key_images, "the node wrote no key images"
    assert not [e for e in seen["errors"] if e.startswith("open key images")], seen["errors"]
    assert KEY_IMAGES_DESCRIPTION in seen.get("srText", ""), "series not in the study browser"
    shot = np.asarray(Image.open(seen["screenshots"]["keyImage"]).convert("RGB"), dtype=np.int32)
    left, top, width, height = (round(v) for v in seen["keyImage"]["canvas"])
    canvas = shot[top : top + height, left : left + width]
    palette = np.array([segment_rgb(study.seg, k) for k in range(len(study.seg.SegmentSequence))])
    # Outlines are drawn in the segments' own colours (so is the legend's swatch).
    distance = np.abs(canvas[:, :, None, :] - palette[None, None]).sum(axis=-1).min(axis=-1)
    outline = int((distance <= 24).sum())
    print(f"key image: {outline} screen pixels in a segment's colour")
    assert outline >= 50


@dataclass(frozen=True)
class DrawnLesion:
    """A lesion as the SR states it: its planar group (TID 1410) and, by tracking UID, its
    volumetric group (TID 1411)."""

    name: str
    instance_uid: str  # the CT instance the long axis is drawn on
    points: npt.NDArray[np.float64]  # (2, 2) SCOORD (column, row)
    long_axis_mm: float
    volume_ml: float | None


def drawn_lesions(sr: pydicom.Dataset) -> list[DrawnLesion]:
    report = hd.sr.Comprehensive3DSR.from_dataset(copy.deepcopy(sr)).content
    assert isinstance(report, hd.sr.MeasurementReport)
    volumes = {
        group.tracking_uid: float(group.get_measurements(name=VOLUME)[0].value)
        for group in report.get_volumetric_roi_measurement_groups()
    }
    lesions = []
    for group in report.get_planar_roi_measurement_groups():
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)
        if region.graphic_type == hd.sr.GraphicTypeValues.POINT:
            continue  # a diffuse finding's extent, marked by a point: not a long axis
        (long_axis,) = group.get_measurements(name=LONG_AXIS)
        lesions.append(
            DrawnLesion(
                name=str(group.tracking_identifier),
                instance_uid=str(region.ContentSequence[0].referenced_sop_instance_uid),
                points=np.asarray(region.value, dtype=np.float64),
                long_axis_mm=float(long_axis.value),
                volume_ml=volumes.get(group.tracking_uid),
            )
        )
    return lesions


def line_coverage(screenshot: Path, view: dict[str, Any], points: npt.NDArray[np.float64]) -> float:
    """Fraction of the points along the SR's line, mapped to the page as OHIF maps image
    coordinates, that have an annotation pixel within a pixel of the image: green for the
    measurement OHIF made active, yellow for the others on the same slice."""
    shot = np.asarray(Image.open(screenshot).convert("RGB"), dtype=np.int32)
    origin = np.array(view["origin"])
    axes = np.stack([np.array(view["column"]) - origin, np.array(view["row"]) - origin], 1)
    # SCOORD (0, 0) is the top left corner of the top left pixel; cornerstone's image
    # coordinates put (0, 0) at that pixel's centre: allow for either.
    radius = max(3.0, float(np.abs(axes).max()))
    red, green, blue = shot[..., 0], shot[..., 1], shot[..., 2]
    active = (green >= 150) & (green - np.maximum(red, blue) >= 80)
    other = (red >= 150) & (green >= 150) & (np.minimum(red, green) - blue >= 80)
    annotation = active | other
    samples = 60
    hits = 0
    for t in np.linspace(0.0, 1.0, samples):
        x, y = origin + axes @ (points[0] + t * (points[1] - points[0]))
        r = int(np.ceil(radius))
        y0, x0 = max(int(y) - r, 0), max(int(x) - r, 0)
        hits += bool(annotation[y0 : int(y) + r + 1, x0 : int(x) + r + 1].any())
    return hits / samples


def sideways(points: npt.NDArray[np.float64], distance: float) -> npt.NDArray[np.float64]:
    """The segment moved ``distance`` image pixels at a right angle to itself."""
    direction = points[1] - points[0]
    normal = np.array([-direction[1], direction[0]]) / np.linalg.norm(direction)
    return points + distance * normal


def test_sr_opens_and_draws_a_lesions_long_axis_in_ohif(seen: dict[str, Any], study: Study) -> None:
    """The SR opens in OHIF on a lesion's key slice with its long axis drawn and labelled.

    What OHIF 3.13 can show of a TID 1500 report is its measurement groups with image
    coordinates: each is drawn on the image it references, labelled with its numeric
    measurements (concept meaning: value unit). It does not show finding types,
    tracking identifiers, study-level qualitative evaluations (our Present/Absent with
    probabilities) or TEXT items (the report text): its SR extension reads only the
    Imaging Measurements container and has no text view. So this asserts the drawing,
    the slice and the labels; the rest of the SR is checked in tests/service/outputs.
    """
    text = seen.get("srText", "")
    assert "Something went wrong" not in text, text[:500]
    assert not [e for e in seen["errors"] if e.startswith(("open SR", "SR annotations"))], seen[
        "errors"
    ]
    lesions = drawn_lesions(study.sr)
    present = [f for f in study.result["findings"] if f["present"] and f["lesions"]]
    assert len(lesions) == sum(len(f["lesions"]) for f in present)
    view = seen.get("srView")
    assert view, seen["errors"]
    shown = [les for les in lesions if f"/instances/{les.instance_uid}/" in view["imageId"]]
    assert shown, f"OHIF shows {view['imageId']}, no lesion's key slice"
    lines = view["annotationText"]
    print(f"SR view: {view['imageId']}; annotation text: {lines}")
    screenshot = Path(seen["screenshots"]["sr"])
    segments = segment_slices(study.seg, study.source_uids) > 0
    coverage = {les.name: line_coverage(screenshot, view, les.points) for les in shown}
    # The same lines moved 6 image pixels sideways: green there would mean the check
    # finds green anywhere, not the line where the SR puts it.
    aside = {les.name: line_coverage(screenshot, view, sideways(les.points, 6.0)) for les in shown}
    print(f"long axes drawn (fraction of each line): {coverage}; moved aside: {aside}")
    for lesion in shown:
        assert f"Long axis: {lesion.long_axis_mm:.2f} mm" in lines, (lesion, lines)
        if lesion.volume_ml is not None:
            assert f"Volume: {lesion.volume_ml:.2f} ml" in lines, (lesion, lines)
        assert coverage[lesion.name] >= 0.5, coverage
        assert aside[lesion.name] <= 0.3, aside
        # The slice is one where the SEG has the lesion, and the line ends on its mask.
        mask = ndimage.binary_dilation(
            segments[study.source_uids.index(lesion.instance_uid)].any(axis=-1), iterations=1
        )
        for column, row in np.floor(lesion.points).astype(int):
            assert mask[row, column], (lesion, column, row)


def test_broken_seg_fails_the_same_check(
    viewer: str, study: Study, orthanc: OrthancFixture, tmp_path: Path
) -> None:
    index, _, mask, colours = target_slice(study)
    broken = break_seg(study.seg, study.source_uids)
    buffer = io.BytesIO()
    broken.save_as(buffer, enforce_file_format=True)
    orthanc.server.client.upload(buffer.getvalue())
    result = run_driver(
        viewer,
        study,
        seg_description=BROKEN_DESCRIPTION,
        sr_description=None,
        source_uid=study.source_uids[index],
        prefix="broken-seg",
        tmp_path=tmp_path,
    )
    check = check_overlay(result, mask, colours)
    print(
        f"viewer run {result['seconds']} s; broken SEG overlay: {check}; errors: {result['errors']}"
    )
    assert not check.passed, check
