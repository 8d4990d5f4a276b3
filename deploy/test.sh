#!/usr/bin/env bash
# Set up (deploy/setup.sh) and run the whole test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
export UNICT_TEST_POSTGRES_URL=${UNICT_TEST_POSTGRES_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}
export PYTHONDONTWRITEBYTECODE=1
.venv/bin/python -m ruff check service model engines tests bench
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
