"""Fuzzing the receive path with hypothesis (issue 6, point 5): malformed datasets over real
associations, malformed PDUs over a raw socket. The listener never crashes, answers every
C-STORE with a status, and the spool never holds a half-written or unreadable file, nor a
file the job store does not know.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.config import DicomSettings, StorageSettings
from service.receiver import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_SUCCESS,
    Receiver,
)
from service.store import JobStore, RetryPolicy, run_migrations
from tests.conftest import wait_until
from tests.service.node_harness import CALLING_AE, NODE_AE, ct_datasets, encoded, send_raw

pytestmark = [pytest.mark.network, pytest.mark.slow]

EXAMPLES = 60
STATUSES: Counter[int] = Counter()  # every status the fuzzed C-STOREs got, for the summary
ALLOWED = {STATUS_SUCCESS, STATUS_CANNOT_UNDERSTAND, STATUS_DATASET_MISMATCH}


@dataclass
class Listening:
    receiver: Receiver
    store: JobStore
    spool: Path

    def check_spool(self) -> None:
        """No partial file, every file complete and readable, and known to the store."""
        assert not list(self.spool.rglob("*.part"))
        known = {
            str(i.path)
            for job in self.store.list_jobs(limit=10_000)
            for i in self.store.job_instances(job.id)
        }
        for path in self.spool.rglob("*.dcm"):
            ds = pydicom.dcmread(path)
            assert "PixelData" in ds and len(ds.PixelData) >= 32 * 32 * 2
            assert str(path) in known, f"{path.name} is not recorded"

    def echo(self) -> None:
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.receiver.port, ae_title=NODE_AE)
        assert assoc.is_established, (
            assoc.is_rejected,
            assoc.acceptor.primitive and assoc.acceptor.primitive.diagnostic,
            len(self.receiver.associations),
        )
        assert assoc.send_c_echo().Status == 0
        assoc.release()


@pytest.fixture(scope="module")
def listening(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listening]:
    tmp = tmp_path_factory.mktemp("fuzz")
    url = f"sqlite:///{tmp / 'unict.db'}"
    run_migrations(url)
    store = JobStore(url, retry=RetryPolicy())
    receiver = Receiver(
        DicomSettings(
            ae_title=NODE_AE,
            port=0,
            allowed_callers=(CALLING_AE,),
            max_associations=64,
            acse_timeout_s=1.0,  # fuzzed connections that never associate free their slot soon
        ),
        StorageSettings(spool_dir=tmp / "spool", min_free_mb=0),
        store,
    )
    receiver.start()
    try:
        yield Listening(receiver, store, tmp / "spool")
    finally:
        receiver.stop()
        store.close()


STUDY = generate_uid()
TEMPLATE = ct_datasets(1, STUDY)[0]
TEMPLATE_BYTES = encoded(TEMPLATE)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The template dataset with bytes overwritten, cut, inserted or spliced."""
    data = bytearray(TEMPLATE_BYTES)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "truncate", "insert", "length"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:  # a huge or odd element length at some 4-byte boundary
            at -= at % 2
            data[at : at + 4] = struct.pack(
                "<I", draw(st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 3, 1]))
            )
    # An empty dataset is announced but never sent by pynetdicom's client, so the node
    # (rightly) waits for it: not a malformed dataset, a client that stalls.
    return bytes(data) or b"\x00"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(data=mutated(), claimed_uid=st.sampled_from(["template", "fresh"]))
def test_malformed_datasets_over_an_association(
    listening: Listening, data: bytes, claimed_uid: str
) -> None:
    uid = TEMPLATE.SOPInstanceUID if claimed_uid == "template" else generate_uid()
    (status,) = send_raw(listening.receiver.port, [(TEMPLATE.SOPClassUID, uid, data)], timeout=15)
    STATUSES[status] += 1
    assert status in ALLOWED, hex(status)
    assert listening.receiver.is_bound
    listening.check_spool()


# --------------------------------------------------------------------------- raw PDUs


@pytest.fixture(scope="module")
def associate_rq() -> bytes:
    """The bytes of a real A-ASSOCIATE-RQ (pynetdicom's), caught by a plain socket."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    caught: list[bytes] = []

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            header = conn.recv(6, socket.MSG_WAITALL)
            (length,) = struct.unpack(">I", header[2:6])
            caught.append(header + conn.recv(length, socket.MSG_WAITALL))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context(TEMPLATE.SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert not assoc.is_established
    thread.join(10)
    server.close()
    (rq,) = caught
    assert rq[0] == 0x01
    return rq


def test_probes_hold_a_slot_only_until_the_acse_timeout(tmp_path: Path) -> None:
    """TCP health probes (connect, close) must not lock the node out for long."""
    url = f"sqlite:///{tmp_path / 'unict.db'}"
    run_migrations(url)
    store = JobStore(url)
    receiver = Receiver(
        DicomSettings(
            ae_title=NODE_AE,
            port=0,
            allowed_callers=(CALLING_AE,),
            max_associations=2,
            acse_timeout_s=1.0,
        ),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        store,
    )
    receiver.start()
    try:
        for _ in range(2):
            socket.create_connection(("127.0.0.1", receiver.port), timeout=15).close()
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(Verification)
        started = time.monotonic()

        def echo() -> bool:
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title=NODE_AE)
            if not assoc.is_established:
                return False
            assoc.release()
            return True

        wait_until(echo, timeout=30, what="a free association slot")
        assert time.monotonic() - started < 10
    finally:
        receiver.stop()
        store.close()


def pdu(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(payload)) + payload


def p_data(items: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF of PDV items (context id, message control header, data)."""
    body = b"".join(struct.pack(">IBB", len(d) + 2, cid, mch) + d for cid, mch, d in items)
    return pdu(0x04, body)


raw_pdus = st.one_of(
    st.binary(max_size=256),  # anything at all
    st.builds(pdu, st.integers(0, 255), st.binary(max_size=128)),  # any PDU type
    st.builds(  # fragments of DIMSE messages on context 1 after a real association request
        lambda items: ("after-rq", p_data(items)),
        st.lists(
            st.tuples(st.sampled_from([1, 3, 255]), st.integers(0, 3), st.binary(max_size=96)),
            min_size=1,
            max_size=4,
        ),
    ),
)


def _exchange(port: int, payload: bytes, rq: bytes | None) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(5)
        if rq is not None:
            sock.sendall(rq)
            kind = sock.recv(1)
            assert kind == b"\x02", f"association not accepted: {kind!r}"
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):  # until the node closes (abort) or the timeout
                pass
        except OSError:  # timeout, reset, or already closed by the node's abort (ENOTCONN)
            pass


# pynetdicom 3.0.4's reactor thread raises (AttributeError: no CommandField, KeyError in
# its DIMSE message table) on a P-DATA whose command set is garbage; the association still
# ends and the listener goes on, which is what this test checks. The thread's traceback is
# pynetdicom's, not the node's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(message=raw_pdus)
def test_malformed_pdus_over_a_raw_socket(
    listening: Listening, associate_rq: bytes, message: bytes | tuple[str, bytes]
) -> None:
    if isinstance(message, tuple):
        _exchange(listening.receiver.port, message[1], associate_rq)
    else:
        _exchange(listening.receiver.port, message, None)
    assert listening.receiver.is_bound
    listening.check_spool()


def test_still_serving_after_the_fuzzing(listening: Listening) -> None:
    # Connections that never associated hold their slot for acse_timeout_s at most.
    wait_until(lambda: not listening.receiver.associations, timeout=30)
    listening.echo()
    print(f"\nfuzzed C-STOREs by status: { {hex(k): v for k, v in STATUSES.items()} }")
    if STATUSES:  # (when the fuzz tests ran in this session)
        assert STATUSES[STATUS_CANNOT_UNDERSTAND] > 0
    good = ct_datasets(1, STUDY)[0]
    (status,) = send_raw(
        listening.receiver.port, [(good.SOPClassUID, good.SOPInstanceUID, encoded(good))]
    )
    assert status == STATUS_SUCCESS
    listening.check_spool()
