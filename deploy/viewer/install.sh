#!/usr/bin/env bash
# Fetch the viewer harness's npm parts into one folder (default .cache/viewer, gitignored):
#   ohif/dist/                   the prebuilt OHIF viewer, @ohif/app (pinned, checksum checked)
#   node_modules/playwright-core the browser driver of tests/viewer (drives Debian's chromium;
#                                it never downloads a browser)
# Idempotent: what is there at the pinned version is kept. Needs node and npm.
#   bash deploy/viewer/install.sh [FOLDER]
set -euo pipefail
cd "$(dirname "$0")/../.."

OHIF_VERSION=3.13.2
# npm's shasum of ohif-app-3.13.2.tgz (npm view @ohif/app@3.13.2 dist.shasum).
OHIF_SHA1=26a51ffcc1704c30fff403258a1d7392e9a991f3
PLAYWRIGHT_VERSION=1.65.1
dest=${1:-.cache/viewer}
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

mkdir -p "$dest"
if [ "$(cat "$dest/ohif/VERSION" 2>/dev/null)" != "$OHIF_VERSION" ] || [ ! -f "$dest/ohif/dist/index.html" ]; then
  echo "viewer: fetching @ohif/app@$OHIF_VERSION"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tgz=$(ls "$tmp"/ohif-app-*.tgz)
  echo "$OHIF_SHA1  $tgz" | sha1sum -c --quiet -
  rm -rf "$dest/ohif"
  mkdir -p "$dest/ohif"
  tar -xzf "$tgz" -C "$dest/ohif" --strip-components=1 package/dist
  echo "$OHIF_VERSION" > "$dest/ohif/VERSION"
  rm -rf "$tmp"
fi

have=$(node -p "require(require('path').resolve('$dest/node_modules/playwright-core/package.json')).version" 2>/dev/null || true)
if [ "$have" != "$PLAYWRIGHT_VERSION" ]; then
  echo "viewer: installing playwright-core@$PLAYWRIGHT_VERSION"
  npm install --prefix "$dest" --no-save --no-audit --no-fund --silent \
    "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null
fi
echo "viewer: OHIF $OHIF_VERSION and playwright-core $PLAYWRIGHT_VERSION in $dest"
