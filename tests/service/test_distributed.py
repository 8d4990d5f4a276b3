"""Distributed mode end to end: two receivers, two workers, one worker killed mid-job.

Two ``unict-node serve`` processes (``queue.backend: procrastinate``: they only receive)
and two ``unict-node worker`` processes (the real small model on PyTorch) share a fresh
PostgreSQL database and a spool folder. Four studies go to the receivers (one of them
split across both at once); the first worker seen running a job is SIGKILLed. Every study
must come back to the recording PACS exactly once.

Needs ``UNICT_TEST_POSTGRES_URL`` (a database is created beside it and dropped after).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom.uid import generate_uid

from service.store import JobState, JobStore
from tests.conftest import POSTGRES_ENV, free_port, wait_until
from tests.service.distributed_harness import (
    db_upgrade,
    fresh_database,
    http_ready,
    stop,
    tail,
    unict_node,
    worker_ready,
    write_config,
)
from tests.service.node_harness import Destination, ct_datasets, send, sent_uids

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.network]

STUDIES = 4
SLICES = 12
# A bound for a hang, not a speed: one surviving worker runs the real model on every job
# left, plus the killed job's lease; on a loaded 2-core machine that took over 60 s.
SETTLE_S = 60


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database beside the one of UNICT_TEST_POSTGRES_URL, dropped after."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set: the distributed test needs PostgreSQL")
    try:
        with fresh_database(base) as url:
            yield url
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL at {POSTGRES_ENV} unreachable: {exc}")


def test_two_receivers_two_workers_one_killed_every_study_back_once(
    tmp_path: Path, database: str
) -> None:
    pacs = Destination().start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    store: JobStore | None = None
    try:
        receivers: dict[str, tuple[int, int]] = {}
        for name in ("r0", "r1"):
            dicom_port, http_port = free_port(), free_port()
            config = write_config(
                tmp_path / f"{name}.yaml",
                tmp_path,
                database,
                pacs.port,
                dicom_port=dicom_port,
                http_port=http_port,
            )
            receivers[name] = (dicom_port, http_port)
            if name == "r0":  # the schema once, before any process starts
                upgrade = db_upgrade(config)
                assert upgrade.returncode == 0, upgrade.stderr
                assert "procrastinate schema installed" in upgrade.stdout
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = unict_node("serve", "--config", str(config), log=logs[name])
        for name in ("w0", "w1"):
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = unict_node(
                "worker",
                "--config",
                str(tmp_path / "r0.yaml"),
                "--name",
                name,
                log=logs[name],
                http_port=free_port(),  # r0's config: its own HTTP port, not r0's
            )

        def all_ready() -> bool:
            for name, proc in procs.items():
                assert proc.poll() is None, f"{name} exited:\n{tail(logs[name])}"
            workers_up = all(worker_ready(logs[w]) for w in ("w0", "w1"))
            return workers_up and all(http_ready(h) for _, h in receivers.values())

        wait_until(all_ready, timeout=60, what="receivers and workers to start")
        store = JobStore(database)

        # Four studies: two to r0, one to r1, one split across both at once.
        studies = [ct_datasets(SLICES, generate_uid()) for _ in range(STUDIES)]
        (r0, _), (r1, _) = receivers["r0"], receivers["r1"]
        half = SLICES // 2
        plan = [
            (r0, studies[0]),
            (r1, studies[1]),
            (r0, studies[2][:half]),
            (r1, studies[2][half:]),
            (r1, studies[3]),
        ]
        senders = [threading.Thread(target=send, args=(port, ds)) for port, ds in plan]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)

        # Kill the first worker seen running a job, while it runs (before sending).
        def running() -> tuple[str, int] | None:
            for job in store.list_jobs(state=JobState.RUNNING):
                if job.lease_owner:
                    return job.lease_owner.split("-")[0], job.id
            return None

        victim, killed_job = wait_until(running, timeout=60, what="a job to run")
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(10)
        after_kill = store.get_job(killed_job)
        assert after_kill is not None
        killed_while_running = (
            after_kill.state is JobState.RUNNING
            and after_kill.lease_owner is not None
            and after_kill.lease_owner.startswith(victim)
        )

        def settled() -> list[Any] | None:
            jobs = store.list_jobs(limit=100)
            if len(jobs) < STUDIES or any(j.state is not JobState.DONE for j in jobs):
                return None
            return jobs

        settle_start = time.monotonic()
        try:
            jobs = wait_until(settled, timeout=SETTLE_S, what="every job DONE")
        except BaseException:  # say where each job stood, and what the survivor logged
            for job in store.list_jobs(limit=100):
                print(
                    f"job {job.id}: {job.state.value} attempts {job.attempts} "
                    f"lease {job.lease_owner} {job.error_stage} {job.error_reason}"
                )
            for name in ("w0", "w1"):
                print(f"--- {name}\n{tail(logs[name])}")
            raise
        settle_s = time.monotonic() - settle_start
        counts = Counter(s.sop_instance_uid for s in pacs.stored)
        deliveries = len(pacs.stored)
        print(
            f"\nstudies {STUDIES} x {SLICES} slices, jobs {len(jobs)}, killed {victim} on job "
            f"{killed_job} ({after_kill.state.value}), deliveries {deliveries}, distinct "
            f"{len(counts)}, attempts {sorted(j.attempts for j in jobs)}, settled in "
            f"{settle_s:.1f} s"
        )
        assert len(jobs) == STUDIES  # one job per series: none queued twice
        by_study = {j.study_instance_uid: j for j in jobs}
        assert set(by_study) == {str(s[0].StudyInstanceUID) for s in studies}
        for study_uid, job in by_study.items():
            got = {s.sop_instance_uid for s in pacs.of_study(study_uid)}
            assert got and got == sent_uids(job), study_uid
        killed = store.get_job(killed_job)
        assert killed is not None and killed.attempts == 2 and killed.lease_owner is None
        if killed_while_running:
            assert pacs.duplicates() == []  # nothing was sent twice
        else:  # killed while sending: a re-send of the same deterministic UIDs only
            assert set(counts) == set().union(*(sent_uids(j) for j in jobs))
    finally:
        if store is not None:
            store.close()
        for proc in procs.values():
            stop(proc)
        pacs.stop()
