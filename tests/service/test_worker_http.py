"""``unict-node worker`` serves the HTTP API: health, readiness by name, metrics, jobs.

One worker process (the real small model on PyTorch) on a fresh PostgreSQL database,
polled over real HTTP until ``/readyz`` answers 200 with its named checks, then stopped
with SIGTERM: it must exit 0 promptly.

Needs ``UNICT_TEST_POSTGRES_URL`` (a database is created beside it and dropped after).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import POSTGRES_ENV, free_port, wait_until
from tests.service.distributed_harness import (
    db_upgrade,
    fresh_database,
    stop,
    tail,
    unict_node,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKER_CHECKS = {"database", "engine", "queue", "spool_space"}
STOP_WITHIN_S = 15.0


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database beside the one of UNICT_TEST_POSTGRES_URL, dropped after."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set: the worker's HTTP test needs PostgreSQL")
    try:
        with fresh_database(base) as url:
            yield url
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_ENV} unreachable: {exc}")


def get(url: str) -> httpx.Response | None:
    """GET `url`, or ``None`` while nothing listens."""
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def test_worker_serves_health_readiness_metrics_and_stops_on_sigterm(
    tmp_path: Path, database: str
) -> None:
    http_port = free_port()
    config = write_config(
        tmp_path / "worker.yaml", tmp_path, database, free_port(), http_port=http_port
    )
    upgrade = db_upgrade(config)
    assert upgrade.returncode == 0, upgrade.stderr
    log = tmp_path / "worker.log"
    proc = unict_node("worker", "--config", str(config), "--name", "w0", log=log)
    base = f"http://127.0.0.1:{http_port}"
    try:

        def answered(path: str) -> httpx.Response | None:
            assert proc.poll() is None, f"the worker exited:\n{tail(log)}"
            response = get(base + path)
            return response if response is not None and response.status_code == 200 else None

        healthz = wait_until(lambda: answered("/healthz"), timeout=60, what="/healthz 200")
        assert healthz.json() == {"status": "alive"}
        readyz = wait_until(lambda: answered("/readyz"), timeout=90, what="/readyz 200")
        body: dict[str, Any] = readyz.json()
        assert body["ready"] is True
        checks = body["checks"]
        assert set(checks) == WORKER_CHECKS, checks
        assert all(c["ok"] for c in checks.values()), checks
        assert checks["database"]["detail"] == "reachable"
        assert "on pytorch" in checks["engine"]["detail"]
        assert checks["queue"]["detail"] == "procrastinate worker on queue unict-test"
        assert "MB free" in checks["spool_space"]["detail"]

        # The rest of the API, as `serve` has it (no token on loopback with none set).
        metrics = httpx.get(f"{base}/metrics", timeout=5)
        assert metrics.status_code == 200
        assert 'unict_stage_seconds_count{stage="infer"} 0.0' in metrics.text
        assert "unict_job_store_up 1.0" in metrics.text
        assert 'unict_jobs{state="QUEUED"} 0.0' in metrics.text
        jobs = httpx.get(f"{base}/jobs", timeout=5)
        assert jobs.status_code == 200 and jobs.json()["total"] == 0
        assert httpx.get(f"{base}/jobs/1", timeout=5).status_code == 404

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not stop within {STOP_WITHIN_S} s:\n{tail(log)}")
        assert code == 0, tail(log)
        print(f"\nworker stopped {time.monotonic() - started:.1f} s after SIGTERM")
        assert get(base + "/healthz") is None  # the HTTP API went with it
    finally:
        stop(proc)
