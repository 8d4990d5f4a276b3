"""The node's own subcommands: serve, check-config, db-upgrade, jobs.

Each handler takes the parsed arguments and returns an exit code; ``service.cli`` wires
them into ``unict-node``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from service.config import Settings, load_settings
from service.errors import ConfigError, IllegalTransition, JobNotFound
from service.logs import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("config.yaml")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config`` (default ./config.yaml)."""
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config.yaml of the node"
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The validated settings of ``--config``; a bad file exits with status 2 and the reason."""
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Start the listener, the assembler, the workers and HTTP; run until SIGTERM/SIGINT."""
    from service.node import Node
    from service.processor import UniCTProcessor

    settings = settings_from_args(args)
    setup_logging(settings.logging)
    processor = UniCTProcessor(settings)
    if settings.queue.backend == "embedded":
        try:
            processor.load()
        except Exception:
            # Keep receiving (nothing is lost) but stay unready: /readyz says why.
            logger.error("the node starts without a model; jobs wait until it loads")
        engine_status = processor.status
    else:
        # A receiver only: the model is loaded by `unict-node worker` processes.
        def engine_status() -> tuple[bool, str]:
            return True, f"in `unict-node worker` processes (queue {settings.queue.name})"

    node = Node(settings, processor, engine_status)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node.start()
    dicom = settings.dicom
    logger.info(
        "UniCT Node ready: DICOM %s@%s:%d, HTTP http://%s:%d, engine: %s",
        dicom.ae_title,
        dicom.bind_address,
        node.dicom_port,
        settings.http.host,
        node.http_port,
        engine_status()[1],
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        node.stop()
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate config.yaml, the model bundle and the engines; print what the node would run."""
    from engines.registry import availability_report
    from model.bundle import load_bundle

    settings = settings_from_args(args)
    ok = True
    report: dict[str, Any] = {
        "config": str(args.config),
        "dicom": f"{settings.dicom.ae_title}@{settings.dicom.bind_address}:{settings.dicom.port}",
        "allowed_callers": list(settings.dicom.allowed_callers),
        "destinations": [
            f"{d.name}: {d.address}" for d in settings.destinations
        ],
        "database": settings.database.url.split("@")[-1],
        "spool_dir": str(settings.storage.spool_dir),
        "http": f"{settings.http.host}:{settings.http.port}",
    }
    try:
        bundle = load_bundle(settings.model.checkpoint_path)
        report["model"] = f"{bundle.card.name} {bundle.card.version} ({bundle.directory})"
    except (OSError, ValueError) as exc:
        report["model"] = f"NOT LOADABLE: {exc}"
        ok = False
    engines = availability_report(settings.model.engines)
    report["engines"] = {
        name: ("available" if a.available else f"unavailable: {a.reason}") for name, a in engines
    }
    if not any(a.available for _, a in engines):
        ok = False
    print(json.dumps(report, indent=2))
    print("configuration OK" if ok else "configuration has problems", file=sys.stderr)
    return 0 if ok else 1


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply the Alembic migrations to the configured database."""
    from service.store import run_migrations

    settings = settings_from_args(args)
    run_migrations(settings.database.url)
    print(f"database at head: {settings.database.url.split('@')[-1]}")
    if settings.queue.backend == "procrastinate":
        from service.queue import apply_procrastinate_schema

        installed = apply_procrastinate_schema(settings.database.url)
        print("procrastinate schema " + ("installed" if installed else "already present"))
    return 0


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``unict-node worker``."""
    add_config_argument(parser)
    parser.add_argument(
        "--name",
        help="this worker's name (lease owner prefix; default: worker-HOSTNAME-PID)",
    )


def cmd_worker(args: argparse.Namespace) -> int:
    """Run jobs from the procrastinate queue (``queue.backend: procrastinate``) until SIGTERM.

    The HTTP API (``http.host``/``http.port``, same token rules as ``serve``) is up from
    before the model loads until the last running job has finished: ``/healthz``,
    ``/readyz`` (database, engine, queue, spool_space), ``/metrics`` and ``/jobs``.
    """
    import os
    import socket

    from service.http import api_token, create_app
    from service.http_server import ServerThread
    from service.metrics import NodeMetrics
    from service.processor import UniCTProcessor
    from service.queue import (
        QueueStatus,
        apply_procrastinate_schema,
        queue_hook,
        run_procrastinate_worker,
    )
    from service.readiness import WorkerStatus
    from service.sender import Sender
    from service.store import JobStore, RetryPolicy, run_migrations
    from service.worker import Workers

    settings = settings_from_args(args)
    setup_logging(settings.logging)
    if settings.queue.backend != "procrastinate":
        print(
            "unict-node worker needs queue.backend: procrastinate "
            "(with embedded, `unict-node serve` runs the workers itself)",
            file=sys.stderr,
        )
        return 2
    processor = UniCTProcessor(settings)
    if settings.database.migrate_on_start:
        run_migrations(settings.database.url)
        apply_procrastinate_schema(settings.database.url)
    workers_settings = settings.workers
    store = JobStore(
        settings.database.url,
        retry=RetryPolicy(
            max_attempts=workers_settings.max_attempts,
            backoff_s=workers_settings.retry_backoff_s,
            max_backoff_s=workers_settings.max_retry_backoff_s,
        ),
        on_queued=queue_hook(settings),
    )
    metrics = NodeMetrics(store)
    sender = Sender(settings.destinations, settings.sender, calling_ae=settings.dicom.ae_title)
    name = args.name or f"worker-{socket.gethostname()}-{os.getpid()}"
    workers = Workers(store, processor, sender, workers_settings, name=name, metrics=metrics)
    queue_status = QueueStatus(settings.queue.name)
    status = WorkerStatus(store, processor.status, queue_status.status, settings.storage)
    app = create_app(
        status, token=api_token(settings.http), metrics=metrics, destinations=settings.destinations
    )
    http = ServerThread(app, settings.http.host, settings.http.port)
    try:
        settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
        # Up before the model loads: /healthz answers, /readyz says "engine: not loaded yet".
        http.start()
        logger.info("worker %s: HTTP http://%s:%d", name, settings.http.host, http.port)
        processor.load()  # a worker without its model would only fail jobs: fail loudly instead
        logger.info("worker %s ready: engine %s", name, processor.status()[1])
        run_procrastinate_worker(settings, store, workers, queue_status)
    finally:
        http.stop()
        store.close()
    return 0


def _job_line(job: Any) -> str:
    total = sum(v for k, v in job.timings.items() if k != "process_total") if job.timings else 0.0
    why = job.error_reason or job.rejected_rule or ""
    return (
        f"{job.id:>6}  {job.state.value:<9} v{job.version:<2} {job.instance_count:>5} inst  "
        f"{total:7.1f} s  {job.updated_at:%Y-%m-%d %H:%M:%S}  {job.series_instance_uid}  {why}"
    ).rstrip()


def cmd_jobs(args: argparse.Namespace) -> int:
    """List, show or retry jobs from the command line."""
    from service.queue import queue_hook
    from service.store import JobState, JobStore

    settings = settings_from_args(args)
    # With the procrastinate queue, a retry defers its delivery in the same transaction.
    store = JobStore(settings.database.url, on_queued=queue_hook(settings))
    if args.action == "list":
        state = JobState(args.state.upper()) if args.state else None
        jobs = store.list_jobs(state=state, limit=args.limit, offset=args.offset)
        if args.json:
            print(json.dumps([j.to_dict() for j in jobs], indent=2, default=str))
        else:
            print(
                f"{'id':>6}  {'state':<9} ver {'count':>5}       {'time':>7}    {'updated':<19}  series"
            )
            for job in jobs:
                print(_job_line(job))
        return 0
    if args.job_id is None:
        print("a job id is needed", file=sys.stderr)
        return 2
    try:
        if args.action == "retry":
            job = store.retry(args.job_id)
            print(f"job {job.id} re-queued ({job.state.value})")
            return 0
        record = store.get_job(args.job_id)
    except (JobNotFound, IllegalTransition) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if record is None:
        print(f"no job {args.job_id}", file=sys.stderr)
        return 1
    print(json.dumps(record.to_dict(), indent=2, default=str))
    return 0


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``unict-node jobs``."""
    add_config_argument(parser)
    parser.add_argument("action", nargs="?", default="list", choices=["list", "show", "retry"])
    parser.add_argument("job_id", nargs="?", type=int, help="job id (show, retry)")
    parser.add_argument("--state", help="list only jobs in this state (e.g. FAILED)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
