"""``kill -9`` while job-store rows lag behind acknowledged instances (issue 18).

The Storage SCP answers success once an instance's file and folder are ``fsync``-ed; its
row is written afterwards, in a batch, by the recorder. A listener process is killed
(SIGKILL) in the middle of an association while rows are pending (its job store is made
slow by the child process itself, so the batches lag), then started again on the same
spool and database: every instance that got a success status is recorded, with a file of
the same SHA-256 as what was sent, and the recovery at start says how many it recorded.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from service.store import JobStore, RetryPolicy, run_migrations
from tests.service.node_harness import CALLING_AE, NODE_AE, ct_datasets

pytestmark = [pytest.mark.network]

# The listener alone, in a process of its own; with LAG the job store takes 0.3 s per batch.
CHILD = """
import sys, time
from pathlib import Path
from service.config import DicomSettings, StorageSettings
from service.receiver import Receiver
from service.store import JobStore, RetryPolicy
from service.store.ingest import IngestStore

url, spool, lag = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
if lag:
    record = IngestStore.record_instances
    def slow(self, batch):
        time.sleep(lag)
        return record(self, batch)
    IngestStore.record_instances = slow
store = JobStore(url, retry=RetryPolicy())
receiver = Receiver(
    DicomSettings(ae_title="UNICT", port=0, allowed_callers=("STORESCU",)),
    StorageSettings(spool_dir=spool, min_free_mb=0),
    store,
)
receiver.start()
print(receiver.port, flush=True)
time.sleep(3600)
"""


def start_listener(
    url: str, spool: Path, lag: float, log: Path
) -> tuple[subprocess.Popen[str], int]:
    with log.open("a") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(spool), str(lag)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert child.stdout is not None
    line = child.stdout.readline()  # the port, once bound (recovery done before)
    assert line.strip().isdigit(), log.read_text()
    return child, int(line)


def test_kill_9_with_rows_pending_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'unict.db'}"
    run_migrations(url)
    spool, log = tmp_path / "spool", tmp_path / "listener.log"
    child, port = start_listener(url, spool, 0.3, log)
    study = generate_uid()
    datasets = ct_datasets(25, study)

    acknowledged: set[str] = set()
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(datasets[0].SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        for ds in datasets[:25]:
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0:
                acknowledged.add(str(ds.SOPInstanceUID))
        # Killed in the middle of the association, rows of the last batches pending.
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()  # type: ignore[union-attr]
    finally:
        assoc.abort()
        assoc.join()  # pynetdicom's reactor gone: its socket is closed
        if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            assoc.dul.socket.socket.close()
    assert len(acknowledged) == 25

    store = JobStore(url, retry=RetryPolicy())
    try:
        before = {
            i.sop_instance_uid for job in store.list_jobs() for i in store.job_instances(job.id)
        }
        assert len(before) < 25, "no row was pending at the kill: the test proves nothing"

        child, _ = start_listener(url, spool, 0.0, log)  # recovery runs before it binds
        try:
            recorded = {
                i.sop_instance_uid: i
                for job in store.list_jobs()
                for i in store.job_instances(job.id)
            }
        finally:
            child.kill()
            child.wait(timeout=10)
            child.stdout.close()  # type: ignore[union-attr]
    finally:
        store.close()
    assert acknowledged <= set(recorded), sorted(acknowledged - set(recorded))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for uid in acknowledged:
        row = recorded[uid]
        data = Path(row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        spooled = dcmread(row.path)
        assert spooled.SOPInstanceUID == uid
        assert spooled.PixelData == by_uid[uid].PixelData
    text = log.read_text()
    assert f"spool recovery: {25 - len(before)} acknowledged instances recorded" in text, text[
        -3000:
    ]
