"""service.receiver: real associations on loopback (pynetdicom, DCMTK, Orthanc)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import DicomSettings, StorageSettings, TlsSettings
from service.receiver import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    Receiver,
    SeriesRef,
)
from service.store import JobState, JobStore
from tests.conftest import CTSeries, OrthancFixture, free_port, wait_until

STORESCU = Path("/usr/bin/storescu")
ECHOSCU = Path("/usr/bin/echoscu")
needs_dcmtk = pytest.mark.skipif(
    not (STORESCU.exists() and ECHOSCU.exists()),
    reason="DCMTK not installed (apt-get install dcmtk)",
)
pytestmark = pytest.mark.network


class RecordingListener:
    """Collects the receiver's notifications."""

    def __init__(self) -> None:
        self.received: list[tuple[int, SeriesRef]] = []
        self.ended: list[tuple[int, bool]] = []
        self.ended_event = threading.Event()

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        self.received.append((association_id, series))

    def association_ended(self, association_id: int, *, released: bool) -> None:
        self.ended.append((association_id, released))
        self.ended_event.set()


@pytest.fixture
def listener() -> RecordingListener:
    return RecordingListener()


@pytest.fixture
def start_receiver(
    tmp_path: Path, sqlite_store: JobStore, listener: RecordingListener
) -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(port: int = 0, min_free_mb: int = 0, **dicom: Any) -> Receiver:
        dicom.setdefault("allowed_callers", ("STORESCU", "ORTHANC", "UNICT_DEMO"))
        receiver = Receiver(
            DicomSettings(ae_title="UNICT", port=port, **dicom),
            StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=min_free_mb),
            sqlite_store,
            listener=listener,
        )
        receiver.start()
        started.append(receiver)
        assert receiver.is_bound
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def scu_store(
    port: int,
    datasets: Sequence[Dataset],
    *,
    calling: str = "STORESCU",
    ssl_context: ssl.SSLContext | None = None,
) -> list[int]:
    """Store `datasets` on one association; return the statuses."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    tls = (ssl_context, "localhost") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="UNICT", tls_args=tls)
    assert assoc.is_established, "association refused"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_stores_spool_and_records_before_success(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    listener: RecordingListener,
    ct_series: Callable[..., CTSeries],
) -> None:
    receiver = start_receiver()
    series = ct_series(4, images_in_acquisition=4)
    assert scu_store(receiver.port, series.datasets) == [0x0000] * 4
    wait_until(listener.ended_event.is_set, what="association end")
    (job,) = sqlite_store.list_jobs()
    assert job.state is JobState.RECEIVING
    assert (job.study_instance_uid, job.series_instance_uid) == (
        series.study_uid,
        series.series_uid,
    )
    assert (job.instance_count, job.expected_count, job.calling_ae) == (4, 4, "STORESCU")
    instances = sqlite_store.job_instances(job.id)
    for record in instances:
        # Atomically placed under study/series, content hash recorded.
        assert record.path.parent == receiver.spool_dir / series.study_uid / series.series_uid
        assert hashlib.sha256(record.path.read_bytes()).hexdigest() == record.sha256
        assert dcmread(record.path).SOPInstanceUID == record.sop_instance_uid
    assert not list((receiver.spool_dir).rglob("*.part"))
    assert {ref.series_id for _, ref in listener.received} == {job.series_id}
    assert listener.ended == [(listener.received[0][0], True)]


def test_duplicate_store_is_idempotent(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
) -> None:
    receiver = start_receiver()
    series = ct_series(2)
    assert scu_store(receiver.port, [*series.datasets, series.datasets[0]]) == [0] * 3
    assert scu_store(receiver.port, series.datasets[:1]) == [0]
    (job,) = sqlite_store.list_jobs()
    assert job.instance_count == 2
    assert len(list(receiver.spool_dir.rglob("*.dcm"))) == 2


def test_echo_and_unknown_caller_rejected(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    ae = AE(ae_title="UNICT_DEMO")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="UNICT")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(Verification)
    assoc = intruder.associate("127.0.0.1", receiver.port, ae_title="UNICT")
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    # rejected-permanent, service-user, calling AE title not recognised
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (1, 1, 3)


def test_host_not_allowed_is_rejected(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(allowed_hosts=("10.99.0.0/16",))
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="UNICT")
    assert assoc.is_rejected
    allowed = start_receiver(allowed_hosts=("127.0.0.1",))
    assoc = ae.associate("127.0.0.1", allowed.port, ae_title="UNICT")
    assert assoc.is_established
    assoc.release()


def test_out_of_space_refuses_with_a700(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
    tmp_path: Path,
) -> None:
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    receiver = start_receiver(min_free_mb=free_mb + 10_000)
    assert scu_store(receiver.port, ct_series(1).datasets) == [STATUS_OUT_OF_RESOURCES]
    assert sqlite_store.list_jobs() == []


def test_missing_uid_cannot_be_understood(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
) -> None:
    receiver = start_receiver()
    ds = ct_series(1).datasets[0]
    del ds.SeriesInstanceUID
    assert scu_store(receiver.port, [ds]) == [STATUS_CANNOT_UNDERSTAND]
    assert sqlite_store.list_jobs() == []


def test_mismatch_and_unsupported_class_statuses(
    tmp_path: Path, sqlite_store: JobStore, ct_series: Callable[..., CTSeries]
) -> None:
    receiver = Receiver(
        DicomSettings(allowed_callers=("STORESCU",)),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        sqlite_store,
    )
    (tmp_path / "spool").mkdir()
    series = ct_series(1)
    path, ds = series.paths[0], series.datasets[0]

    def on_store(source: Path, sop_class: str, sop_instance: str) -> int:
        return receiver.store_file(
            source,
            caller="STORESCU",
            connection=0,
            requested_class=sop_class,
            requested_instance=sop_instance,
        ).status

    assert on_store(path, CTImageStorage, generate_uid()) == STATUS_DATASET_MISMATCH
    assert on_store(path, "1.2.840.10008.5.1.4.1.1.4", ds.SOPInstanceUID) == (
        STATUS_SOP_CLASS_NOT_SUPPORTED
    )
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    assert on_store(garbage, CTImageStorage, ds.SOPInstanceUID) == (STATUS_CANNOT_UNDERSTAND)
    assert on_store(path, CTImageStorage, ds.SOPInstanceUID) == 0


@needs_dcmtk
def test_dcmtk_storescu_and_echoscu_interoperate(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
) -> None:
    receiver = start_receiver()
    env = {**os.environ, "TCP_NODELAY": "1"}
    port = str(receiver.port)
    echo = subprocess.run(
        [str(ECHOSCU), "-aet", "STORESCU", "-aec", "UNICT", "127.0.0.1", port],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
    series = ct_series(6)
    store = subprocess.run(
        [str(STORESCU), "-aec", "UNICT", "127.0.0.1", port, *map(str, series.paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stderr
    (job,) = sqlite_store.list_jobs()
    assert job.instance_count == 6 and job.calling_ae == "STORESCU"

    refused = subprocess.run(
        [str(ECHOSCU), "-aet", "NOT_ALLOWED", "-aec", "UNICT", "127.0.0.1", port],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout


OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(
    OPENSSL is None, reason="openssl not installed (needed to make a test certificate)"
)
@pytest.mark.parametrize("processes", [1, 2])
def test_tls_listener(
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
    tmp_path: Path,
    processes: int,
) -> None:
    """TLS in the receiver's process, and (2) in a listener process the connection is
    passed to (a tie goes to the child)."""
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(
        [
            str(OPENSSL),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    receiver = start_receiver(
        tls=TlsSettings(enabled=True, cert_file=cert, key_file=key), listener_processes=processes
    )
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assert scu_store(receiver.port, ct_series(2).datasets, ssl_context=client) == [0, 0]
    assert sqlite_store.list_jobs()[0].instance_count == 2
    # (A plain-DICOM client on the TLS port is not tried here: pynetdicom's server leaks the
    # accepted socket when the TLS handshake fails, which the strict warnings flag.)


@pytest.mark.orthanc
def test_orthanc_c_stores_a_series_to_the_receiver(
    orthanc: OrthancFixture,
    start_receiver: Callable[..., Receiver],
    sqlite_store: JobStore,
    ct_series: Callable[..., CTSeries],
) -> None:
    start_receiver(port=orthanc.node_port)
    series = ct_series(8)
    client = orthanc.server.client
    for path in series.paths:
        client.upload_file(path)
    (series_id,) = client.lookup(series.series_uid, filter="Series")
    client.modalities.send(orthanc.modality, series_id, timeout=60)  # POST /modalities/unict/store
    (job,) = sqlite_store.list_jobs()
    assert job.series_instance_uid == series.series_uid
    assert job.calling_ae == orthanc.server.aet
    assert {i.sop_instance_uid for i in sqlite_store.job_instances(job.id)} == {
        ds.SOPInstanceUID for ds in series.datasets
    }


def test_port_in_use_fails_loudly(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    with pytest.raises(OSError):
        start_receiver(port=receiver.port)
    assert free_port() != receiver.port


def _associate_rq(called: str, calling: str) -> bytes:
    """An A-ASSOCIATE-RQ PDU for Verification, encoded as a DICOM requestor sends it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_stop_leaves_a_rejected_association_to_close(
    tmp_path: Path, sqlite_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopping while a rejected association waits for its peer to close neither waits
    for it nor fails in any thread (pynetdicom's reactor thread died on an A-ABORT in
    that state: a flaky CI error before the node had its own acceptor)."""
    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    receiver = Receiver(
        DicomSettings(ae_title="UNICT", port=0, allowed_callers=("STORESCU",)),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        sqlite_store,
    )
    receiver.start()
    try:
        with socket.create_connection(("127.0.0.1", receiver.port), timeout=10) as peer:
            peer.sendall(_associate_rq("UNICT", "NOT_ALLOWED"))
            assert peer.recv(1)[0] == 0x03  # A-ASSOCIATE-RJ
            assert len(receiver.associations) == 1  # awaiting the peer's close
            start = time.monotonic()
            receiver.stop()
            stopped_in = time.monotonic() - start
    finally:
        receiver.stop()
    assert not receiver.is_bound
    assert stopped_in < 5.0  # the closing association is not waited for
    assert wait_until(lambda: not receiver_threads_alive(), timeout=10)
    assert not died, [str(args.exc_value) for args in died]


def receiver_threads_alive() -> bool:
    return any(t.name.startswith("StorageSCP") and t.is_alive() for t in threading.enumerate())
