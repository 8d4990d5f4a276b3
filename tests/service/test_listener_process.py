"""Several listener processes on one port (``dicom.listener_processes``, issue 18).

One series is sent split over twelve associations at once, by twelve DCMTK ``storescu``
processes; the receiver's process passes each connection to the least busy of the three
listener processes. The series is still one version with one job holding
every instance once, the assembler in the parent heard of every association (whichever
process served it), and the metrics of the children reach the parent's counters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.config import DicomSettings, StorageSettings
from service.instance_handler import SeriesRef
from service.listener_process import ID_BITS
from service.metrics import NodeMetrics
from service.receiver import Receiver
from service.store import JobStore, RetryPolicy, run_migrations
from tests.conftest import wait_until
from tests.service.node_harness import CALLING_AE, NODE_AE, ct_datasets

STORESCU = Path("/usr/bin/storescu")  # DCMTK's, not pynetdicom's console script

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(not STORESCU.exists(), reason="DCMTK storescu not installed (apt dcmtk)"),
]

ASSOCIATIONS = 12
PER_ASSOCIATION = 3


class Heard:
    """An assembler stand-in that records what it is told."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instances: dict[int, list[SeriesRef]] = {}
        self.ended: dict[int, bool] = {}

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        with self.lock:
            self.instances.setdefault(association_id, []).append(series)

    def association_ended(self, association_id: int, *, released: bool) -> None:
        with self.lock:
            self.ended[association_id] = released


def test_one_series_over_associations_served_by_three_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'unict.db'}"
    run_migrations(url)
    store = JobStore(url, retry=RetryPolicy())
    heard, metrics = Heard(), NodeMetrics(store)
    receiver = Receiver(
        DicomSettings(
            ae_title=NODE_AE,
            port=0,
            allowed_callers=(CALLING_AE,),
            listener_processes=3,
            max_associations=ASSOCIATIONS,  # the node's limit, over all its processes
        ),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        store,
        listener=heard,
        metrics=metrics,
    )
    study, series_uid = generate_uid(), generate_uid()
    datasets = ct_datasets(ASSOCIATIONS * PER_ASSOCIATION, study, series_uid)
    folders = []
    for i in range(ASSOCIATIONS):
        folder = tmp_path / f"sender{i}"
        folder.mkdir()
        for ds in datasets[i::ASSOCIATIONS]:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        folders.append(folder)
    receiver.start()
    try:
        assert receiver.is_bound
        senders = [
            subprocess.Popen(
                [
                    str(STORESCU),
                    "-aet",
                    CALLING_AE,
                    "-aec",
                    NODE_AE,
                    "+sd",
                    "127.0.0.1",
                    str(receiver.port),
                    str(folder),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
            for folder in folders
        ]
        for sender in senders:
            out, _ = sender.communicate(timeout=60)
            assert sender.returncode == 0, out.decode(errors="replace")
        assert wait_until(lambda: len(heard.ended) == ASSOCIATIONS, timeout=30)
    finally:
        receiver.stop()
    try:
        (job,) = store.list_jobs()
        assert (job.instance_count, job.version) == (len(datasets), 1)
        rows = store.job_instances(job.id)
        assert sorted(r.sop_instance_uid for r in rows) == sorted(
            str(ds.SOPInstanceUID) for ds in datasets
        )
        assert all(Path(r.path).is_file() for r in rows)
    finally:
        store.close()

    processes = {association_id >> ID_BITS for association_id in heard.ended}
    assert len(processes) >= 2, f"every association landed on process {processes}"
    assert all(heard.ended.values())  # each released
    assert sum(len(v) for v in heard.instances.values()) == len(datasets)
    assert {ref.job_id for refs in heard.instances.values() for ref in refs} == {job.id}
    received = metrics.registry.get_sample_value("unict_instances_received_total")
    assert received == len(datasets)


CHILD = """
import sys, time
from pathlib import Path
from service.config import DicomSettings, StorageSettings
from service.receiver import Receiver
from service.store import JobStore, RetryPolicy

if __name__ == "__main__":
    store = JobStore(sys.argv[1], retry=RetryPolicy())
    receiver = Receiver(
        DicomSettings(ae_title="UNICT", port=0, allowed_callers=("STORESCU",), listener_processes=3),
        StorageSettings(spool_dir=Path(sys.argv[2]), min_free_mb=0),
        store,
    )
    receiver.start()
    print(receiver.port, *(p.pid for p in receiver._children._processes), flush=True)
    time.sleep(3600)
"""


def test_listener_processes_go_when_the_node_is_killed(tmp_path: Path) -> None:
    """kill -9 of the receiver's process: its listener processes end too (no orphan keeps
    serving without an assembler), and the port is free for the restart at once."""
    url = f"sqlite:///{tmp_path / 'unict.db'}"
    run_migrations(url)
    script = tmp_path / "node.py"
    script.write_text(CHILD)
    with (tmp_path / "node.log").open("w") as log:  # the killed node's resource tracker talks
        node = subprocess.Popen(
            [sys.executable, str(script), url, str(tmp_path / "spool")],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
    assert node.stdout is not None
    port, *children = map(int, node.stdout.readline().split())
    node.stdout.close()
    assert len(children) == 2 and all(Path(f"/proc/{pid}").exists() for pid in children)
    node.kill()
    node.wait(timeout=10)
    assert wait_until(lambda: not any(_alive(pid) for pid in children), timeout=10)
    with socket.socket() as probe:  # nothing listens any more: the restart can bind
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
