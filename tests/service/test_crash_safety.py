"""Crash safety: ``kill -9`` of a real ``unict-node serve`` process at each stage, restart,
nothing lost and no result delivered twice (issue 6, point 1).

The node runs as a subprocess with a configuration of the test's own (SQLite, spool, the
bundled model on the PyTorch engine). The PACS is a pynetdicom Storage SCP in the test
process that records every C-STORE it answered. One run injects the faults in turn:

1. mid-association (series A half sent, association open) while series B is received but
   not yet queued (inside its quiet period);
2. during inference (a job ``RUNNING``);
3. during sending (the PACS holds the C-STORE; it stores it, the node never hears back).

After each restart every received instance is still recorded with its file (same SHA-256);
at the end each series' job is ``DONE`` exactly once, and the PACS holds exactly one SEG/SR
per job: the re-run after the kill during sending produced the same SOP Instance UIDs, so
the PACS kept one copy.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from service.store import JobRecord, JobState, JobStore
from tests.conftest import free_port, wait_until
from tests.service.node_harness import (
    CALLING_AE,
    FINAL_STATES,
    NODE_AE,
    Destination,
    ct_datasets,
    send,
    sent_uids,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

N = 12
QUIET_S = 12.0  # longer than a restart, so a retried series lands in the same version
START_TIMEOUT_S = 180.0


class NodeProcess:
    """``unict-node serve`` as a subprocess: start, wait until ready, kill -9."""

    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config = config
        self.http_port = http_port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n----- start {self.starts} -----\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"node exited with {self.process.returncode}:\n{self.tail()}")
            try:
                response = httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2)
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"node not ready after {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.process is not None and self.process.poll() is None, "node not running"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        assert self.process.returncode == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def destination() -> Iterator[Destination]:
    pacs = Destination().start()
    yield pacs
    pacs.stop()


@pytest.fixture
def node_process(tmp_path: Path, destination: Destination) -> Iterator[NodeProcess]:
    http_port, dicom_port = free_port(), free_port()
    config = {
        "dicom": {
            "ae_title": NODE_AE,
            "port": dicom_port,
            "bind_address": "127.0.0.1",
            "allowed_callers": [CALLING_AE],
        },
        "assembly": {"quiet_period_s": QUIET_S, "poll_interval_s": 0.2},
        "selection": {"min_slices": 10},
        "destinations": [
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": destination.port}
        ],
        "sender": {"max_attempts": 2, "backoff_s": 0.2, "timeout_s": 20},
        "storage": {"spool_dir": "spool", "min_free_mb": 0, "results_dir": "results"},
        "database": {"url": "sqlite:///db/unict.db"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "model": {"engines": ["pytorch"], "threads": 1, "plan_dir": "plans"},
        "workers": {
            "count": 1,
            "lease_s": 3,
            "max_attempts": 5,
            "retry_backoff_s": 0.5,
            "poll_interval_s": 0.2,
        },
        "logging": {"level": "INFO"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    node = NodeProcess(path, http_port, tmp_path / "node.log")
    node.dicom_port = dicom_port  # type: ignore[attr-defined]
    yield node
    node.stop()


def check_every_instance_kept(store: JobStore, expected: dict[str, set[str]]) -> None:
    """Every instance the node acknowledged is recorded, with its file, content unchanged."""
    for series_uid, sop_uids in expected.items():
        jobs = [j for j in store.list_jobs(limit=1000) if j.series_instance_uid == series_uid]
        assert jobs, f"series {series_uid} lost"
        latest = max(jobs, key=lambda j: j.version)
        records = store.job_instances(latest.id)
        assert {r.sop_instance_uid for r in records} >= sop_uids
        for record in records:
            assert hashlib.sha256(record.path.read_bytes()).hexdigest() == record.sha256


def states(store: JobStore) -> dict[int, JobState]:
    return {j.id: j.state for j in store.list_jobs(limit=1000)}


def wait_for(store: JobStore, predicate: Callable[[list[JobRecord]], bool], what: str) -> None:
    wait_until(lambda: predicate(store.list_jobs(limit=1000)), timeout=180, what=what)


def open_association(port: int) -> object:
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    return assoc


def test_kill_9_at_every_stage_loses_nothing_and_delivers_once(
    node_process: NodeProcess, destination: Destination, tmp_path: Path
) -> None:
    node = node_process
    port: int = node.dicom_port  # type: ignore[attr-defined]
    study = generate_uid()
    series_a: list[Dataset] = ct_datasets(N, study)
    series_b: list[Dataset] = ct_datasets(N, study)
    acknowledged: dict[str, set[str]] = {}
    faults: list[str] = []

    node.start()
    store = JobStore(f"sqlite:///{tmp_path / 'db' / 'unict.db'}")
    try:
        # --- 1. B received, not yet queued; A mid-association ------------------------------
        assert send(port, series_b) == [0] * N
        acknowledged[series_b[0].SeriesInstanceUID] = {ds.SOPInstanceUID for ds in series_b}
        assoc = open_association(port)
        statuses = [int(assoc.send_c_store(ds).Status) for ds in series_a[: N // 2]]  # type: ignore[attr-defined]
        assert statuses == [0] * (N // 2)
        acknowledged[series_a[0].SeriesInstanceUID] = {
            ds.SOPInstanceUID for ds in series_a[: N // 2]
        }
        assert set(states(store).values()) == {JobState.RECEIVING}
        node.kill9()
        faults.append("mid-association + received-not-queued")
        assoc.abort()  # type: ignore[attr-defined]

        node.start()
        check_every_instance_kept(store, acknowledged)
        # The router sends series A again, whole (instances already stored are no-ops).
        assert send(port, series_a) == [0] * N
        acknowledged[series_a[0].SeriesInstanceUID] = {ds.SOPInstanceUID for ds in series_a}

        # --- 2. during inference -----------------------------------------------------------
        wait_for(
            store, lambda jobs: any(j.state is JobState.RUNNING for j in jobs), "a job RUNNING"
        )
        node.kill9()
        assert JobState.RUNNING in states(store).values()
        faults.append("during inference")

        # --- 3. during sending: the PACS holds the C-STORE until the node is dead ----------
        destination.stall = True
        node.start()
        check_every_instance_kept(store, acknowledged)
        assert destination.stalled.wait(180), node.tail()
        node.kill9()
        assert JobState.SENDING in states(store).values()
        faults.append("during sending")
        destination.stall = False
        destination.release.set()  # the PACS stores what it held; the node never knew

        # --- restart and let everything finish ---------------------------------------------
        node.start()
        wait_for(
            store,
            lambda jobs: len(jobs) >= 2 and all(j.state in FINAL_STATES for j in jobs),
            "every job final",
        )
        check_every_instance_kept(store, acknowledged)
        jobs = store.list_jobs(limit=1000)
    finally:
        store.close()

    print(f"\nfaults injected and survived: {len(faults)}: {', '.join(faults)}")
    by_series: dict[str, list[JobRecord]] = {}
    for job in jobs:
        by_series.setdefault(job.series_instance_uid, []).append(job)
    assert set(by_series) == set(acknowledged)
    delivered: set[str] = set()
    for versions in by_series.values():
        versions.sort(key=lambda j: j.version)
        latest = versions[-1]
        assert latest.state is JobState.DONE, (latest.error_stage, latest.error_reason)
        assert latest.instance_count == N
        # An earlier version exists only if a restart outlasted the quiet period: it was
        # then closed early and turned away with a reason, never DONE.
        for early in versions[:-1]:
            assert early.state is not JobState.DONE
            assert early.rejected_rule or early.error_reason
        outputs = sent_uids(latest)
        assert outputs, latest.outputs
        delivered |= outputs
        print(
            f"series v{latest.version}: DONE after {latest.attempts} attempt(s), "
            f"{len(outputs)} output(s)"
        )
    # Exactly the DONE jobs' outputs are in the PACS, each SOP instance once; the one held
    # during the kill was stored, and stored again under the same UID by the re-run.
    stored = destination.of_study(study)
    assert {s.sop_instance_uid for s in stored} == delivered
    print(f"C-STOREs answered by the PACS: {len(stored)}; distinct instances: {len(delivered)}")
    assert len(stored) - len(delivered) <= 1
