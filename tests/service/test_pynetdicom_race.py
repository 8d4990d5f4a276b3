"""The fix for pynetdicom's requestor race (service/pynetdicom_race.py), on a real association.

The race itself needs a reactor thread preempted between two statements; what is checked
here is the outcome in both states the reactor can find: a response taken while a
``send_*()`` call waits goes back on the queue that call reads; one taken when nothing
waits is still dropped, as pynetdicom does.
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from service import pynetdicom_race
from service.config import DicomSettings, StorageSettings
from service.receiver import Receiver
from service.store import JobStore


def test_a_response_the_reactor_took_goes_back_to_the_waiting_call(
    tmp_path: Path, sqlite_store: JobStore
) -> None:
    pynetdicom_race.install()
    pynetdicom_race.install()  # idempotent
    receiver = Receiver(
        DicomSettings(ae_title="UNICT", port=0, allowed_callers=("STORESCU",)),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        sqlite_store,
    )
    receiver.start()
    try:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="UNICT")
        assert assoc.is_established
        response = C_STORE()
        response.MessageIDBeingRespondedTo = 7
        response.Status = 0x0000
        assert not response.is_valid_request

        assoc._reactor_checkpoint.clear()  # as send_c_store() does while it waits
        assoc._serve_request(response, 1)
        assert assoc.dimse.msg_queue.get_nowait() == (1, response)

        assoc._reactor_checkpoint.set()  # nothing waits: dropped, as before
        assoc._serve_request(response, 1)
        assert assoc.dimse.msg_queue.empty()
        assoc.release()
    finally:
        receiver.stop()
