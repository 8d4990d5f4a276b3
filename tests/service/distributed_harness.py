"""Processes of a distributed node for tests and bench: receivers, workers, a fresh database.

Used by ``tests/service/test_distributed.py`` and ``bench/bench_distributed.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml
from sqlalchemy.engine import make_url

from tests.conftest import free_port
from tests.service.node_harness import CALLING_AE, NODE_AE

REPO = Path(__file__).resolve().parents[2]
QUEUE = "unict-test"
WORKER_READY = "procrastinate queue"  # in the worker's log once it listens


@contextmanager
def fresh_database(base_url: str) -> Iterator[str]:
    """A new PostgreSQL database beside `base_url` (SQLAlchemy URL), dropped at the end.

    Raises
    ------
    psycopg.OperationalError
        The server cannot be reached.
    """
    url = make_url(base_url)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"unict_dist_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(
    path: Path,
    work: Path,
    db_url: str,
    pacs_port: int,
    *,
    dicom_port: int | None = None,
    http_port: int | None = None,
    workers: int = 1,
    lease_s: float = 4.0,
    quiet_period_s: float = 1.5,
) -> Path:
    """A config.yaml for a receiver or a worker (procrastinate queue, PyTorch, 1 thread)."""
    config: dict[str, Any] = {
        "dicom": {
            "ae_title": NODE_AE,
            "port": dicom_port or free_port(),
            "allowed_callers": [CALLING_AE],
            "max_associations": 20,
        },
        "assembly": {"quiet_period_s": quiet_period_s, "poll_interval_s": 0.2},
        "selection": {"min_slices": 10, "slice_thickness_mm": [0.5, 5.0]},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
        ],
        "sender": {"max_attempts": 2, "backoff_s": 0.1, "timeout_s": 20},
        "storage": {"spool_dir": str(work / "spool"), "results_dir": str(work / "results")},
        "database": {"url": db_url, "migrate_on_start": False},
        "http": {"host": "127.0.0.1", "port": http_port or free_port()},
        "model": {"engines": ["pytorch"], "threads": 1},
        "workers": {"count": workers, "lease_s": lease_s, "retry_backoff_s": 0.2},
        "queue": {
            "backend": "procrastinate",
            "name": QUEUE,
            "heartbeat_s": 1,
            "stalled_after_s": 3,
            "maintenance_interval_s": 0.5,
        },
        "logging": {"level": "INFO"},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def db_upgrade(config: Path) -> subprocess.CompletedProcess[str]:
    """``unict-node db-upgrade``: Alembic migrations and procrastinate's schema."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "db-upgrade", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unict_node(*args: str, log: Path, http_port: int | None = None) -> subprocess.Popen[bytes]:
    """Start ``unict-node ARGS`` with its output in `log`.

    `http_port` overrides the config's ``http.port`` (``UNICT_HTTP__PORT``): a worker
    serves the HTTP API too, so processes sharing one config file need a port each.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if http_port is not None:
        env["UNICT_HTTP__PORT"] = str(http_port)
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def http_ready(http_port: int) -> bool:
    """Whether the receiver's ``/readyz`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def worker_ready(log: Path) -> bool:
    """Whether the worker writing `log` listens on the queue."""
    return WORKER_READY in log.read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful), then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def tail(log: Path, lines: int = 30) -> str:
    """The last `lines` of a process log."""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
