"""Studies per minute of the distributed mode with 1 and 2 ``unict-node worker`` processes.

Usage: python -m bench.bench_distributed [--studies 8] [--slices 12] [--max-seconds 300]

For each worker count, on a fresh PostgreSQL database (created beside
``UNICT_TEST_POSTGRES_URL`` or ``--postgres``, dropped after): one ``unict-node serve``
receiver (``queue.backend: procrastinate``) and N workers (bundled model, PyTorch, one
thread each) are started and waited for; then ``--studies`` small synthetic CT studies
are sent at once and the clock runs from the first send to the last job ``DONE`` (results
received by a recording Storage SCP). Process start-up is not counted; the assembly quiet
period is. Each run is bounded by ``--max-seconds``. Prints a markdown table with the
ratio of 2 workers to 1.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydicom.uid import generate_uid

from service.store import JobState, JobStore
from tests.conftest import POSTGRES_ENV, free_port, wait_until
from tests.service.distributed_harness import (
    db_upgrade,
    fresh_database,
    http_ready,
    stop,
    unict_node,
    worker_ready,
    write_config,
)
from tests.service.node_harness import Destination, ct_datasets, send


@dataclass(frozen=True)
class Run:
    """One measured run."""

    workers: int
    studies: int
    done: int
    seconds: float

    @property
    def per_minute(self) -> float:
        return 60.0 * self.done / self.seconds if self.seconds > 0 else 0.0


def run(
    postgres: str, workers: int, studies: int, slices: int, max_seconds: float, work: Path
) -> Run:
    """Start a receiver and `workers` workers, send `studies` studies, time them to DONE."""
    pacs = Destination().start()
    procs = []
    try:
        with fresh_database(postgres) as db:
            config = write_config(work / "node.yaml", work, db, pacs.port, quiet_period_s=1.0)
            upgrade = db_upgrade(config)
            if upgrade.returncode != 0:
                raise RuntimeError(f"db-upgrade failed: {upgrade.stderr}")
            written = yaml.safe_load(config.read_text())
            http_port, dicom_port = int(written["http"]["port"]), int(written["dicom"]["port"])
            procs.append(unict_node("serve", "--config", str(config), log=work / "r.log"))
            logs = [work / f"w{i}.log" for i in range(workers)]
            for i, log in enumerate(logs):
                procs.append(
                    unict_node(
                        "worker",
                        "--config",
                        str(config),
                        "--name",
                        f"w{i}",
                        log=log,
                        http_port=free_port(),  # workers serve HTTP too: a port each
                    )
                )
            wait_until(
                lambda: http_ready(http_port) and all(worker_ready(log) for log in logs),
                timeout=120,
                what="the receiver and workers to start",
            )
            batches = [ct_datasets(slices, generate_uid()) for _ in range(studies)]
            store = JobStore(db)
            try:
                started = time.perf_counter()
                senders = [threading.Thread(target=send, args=(dicom_port, b)) for b in batches]
                for t in senders:
                    t.start()
                deadline = started + max_seconds
                done = 0
                while time.perf_counter() < deadline:
                    done = store.count_jobs(state=JobState.DONE)
                    if done >= studies:
                        break
                    time.sleep(0.2)
                seconds = time.perf_counter() - started
                for t in senders:
                    t.join(10)
            finally:
                store.close()
            for proc in procs:
                stop(proc)
            return Run(workers, studies, done, seconds)
    finally:
        for proc in procs:
            stop(proc)
        pacs.stop()


def table(runs: list[Run]) -> str:
    """The markdown table: one row per worker count, the ratio against the first row."""
    base = runs[0].per_minute if runs and runs[0].per_minute else 0.0
    lines = [
        "| workers | studies | done | seconds | studies/min | ratio |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ratio = f"{r.per_minute / base:.2f}" if base else "n/a"
        lines.append(
            f"| {r.workers} | {r.studies} | {r.done} | {r.seconds:.1f} | "
            f"{r.per_minute:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=8, help="studies per run")
    parser.add_argument("--slices", type=int, default=12, help="slices per study (32x32)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run"
    )
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound of each run")
    parser.add_argument(
        "--postgres",
        default=os.environ.get(POSTGRES_ENV),
        help=f"SQLAlchemy URL of a PostgreSQL database (default ${POSTGRES_ENV})",
    )
    args = parser.parse_args()
    if not args.postgres:
        parser.error(f"--postgres or {POSTGRES_ENV} is needed")
    runs = []
    for n in args.workers:
        work = Path(tempfile.mkdtemp(prefix=f"unict-bench-dist-{n}-"))
        runs.append(run(args.postgres, n, args.studies, args.slices, args.max_seconds, work))
    print(table(runs))


if __name__ == "__main__":
    main()
