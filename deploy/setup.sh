#!/usr/bin/env bash
# Set up a new machine for UniCT Node: system packages, a virtual environment in .venv,
# the node and its test dependencies. Idempotent: a second run only checks.
#   bash deploy/setup.sh          # node + tests (Orthanc, DCMTK, dicom3tools, PostgreSQL)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
[ -x /usr/sbin/Orthanc ] || need_apt+=(orthanc orthanc-dicomweb)
[ -x /usr/bin/storescu ] || need_apt+=(dcmtk)
[ -x /usr/bin/dciodvfy ] || need_apt+=(dicom3tools)
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
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
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup: done (.venv ready)"
