"""service.sender: C-STORE SCU with per-instance statuses, retries and backoff."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.status import code_to_category

from service.config import Destination, SenderSettings
from service.errors import SendError
from service.sender import Sender, SendFailure, is_retryable_status
from tests.conftest import (
    CTSeries,
    OrthancFixture,
    collect_garbage,
    free_port,
    ignores_pynetdicom_socket_leak,
)

pytestmark = pytest.mark.network

SETTINGS = SenderSettings(max_attempts=3, backoff_s=1, max_backoff_s=1.5, timeout_s=5)


@dataclass
class StoreSCP:
    """An in-process destination whose answers the test scripts."""

    port: int
    received: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # answered in order, then 0x0000
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: evt.Event) -> int:
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000:
                self.received.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[union-attr]
        return status


@pytest.fixture
def scp() -> Iterator[Callable[[str], StoreSCP]]:
    servers = []

    def start(ae_title: str = "PACS") -> StoreSCP:
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        state = StoreSCP(free_port())
        server = ae.start_server(
            ("127.0.0.1", state.port), block=False, evt_handlers=[(evt.EVT_C_STORE, state.handle)]
        )
        assert server is not None
        servers.append(server)
        return state

    yield start
    for server in servers:
        server.shutdown()


def destination(name: str, port: int, ae_title: str = "PACS") -> Destination:
    return Destination(name=name, ae_title=ae_title, host="127.0.0.1", port=port)


def test_sends_every_output_to_every_destination(
    scp: Callable[[str], StoreSCP], ct_series: Callable[..., CTSeries]
) -> None:
    a, b = scp("PACS"), scp("ARCHIVE")
    series = ct_series(3)
    sleeps: list[float] = []
    sender = Sender(
        [destination("pacs", a.port), destination("archive", b.port, "ARCHIVE")],
        SETTINGS,
        calling_ae="UNICT",
        sleep=sleeps.append,
    )
    # Datasets in memory and files on disk alike.
    results = sender([series.datasets[0], *series.paths[1:]])
    uids = [ds.SOPInstanceUID for ds in series.datasets]
    assert a.received == uids and b.received == uids
    assert [(r.destination, r.ok, r.status, r.attempts) for r in results] == (
        [("pacs", True, 0, 1)] * 3 + [("archive", True, 0, 1)] * 3
    )
    assert sleeps == []
    assert results[0].to_json()["status_hex"] == "0x0000"


def test_transient_status_is_retried_with_backoff(
    scp: Callable[[str], StoreSCP], ct_series: Callable[..., CTSeries]
) -> None:
    pacs = scp("PACS")
    pacs.statuses = [0x0000, 0xA700, 0xA701]  # 2nd and 3rd instance: out of resources
    series = ct_series(3)
    sleeps: list[float] = []
    sender = Sender(
        [destination("pacs", pacs.port)], SETTINGS, calling_ae="UNICT", sleep=sleeps.append
    )
    results = sender(series.datasets)
    assert all(r.ok for r in results)
    assert [r.attempts for r in results] == [1, 2, 2]  # only the failed ones were re-sent
    assert sleeps == [1.0]
    assert sorted(pacs.received) == sorted(ds.SOPInstanceUID for ds in series.datasets)


def test_permanent_status_fails_without_retry(
    scp: Callable[[str], StoreSCP], ct_series: Callable[..., CTSeries]
) -> None:
    pacs = scp("PACS")
    pacs.statuses = [0xA900]
    sleeps: list[float] = []
    sender = Sender(
        [destination("pacs", pacs.port)], SETTINGS, calling_ae="UNICT", sleep=sleeps.append
    )
    with pytest.raises(SendFailure) as info:
        sender(ct_series(2).datasets)
    failure = info.value
    assert isinstance(failure, SendError) and not failure.retryable
    assert "status 0xA900" in failure.reason
    assert [(r.ok, r.status) for r in failure.results] == [(False, 0xA900), (True, 0)]
    assert sleeps == []


@pytest.mark.parametrize(
    ("status", "category", "retryable"),
    [
        (0x0000, "Success", None),
        (0x0001, "Warning", None),  # attribute list error
        (0x0107, "Warning", None),  # attribute list error (PS3.7 C.4.2)
        (0x0116, "Warning", None),  # attribute value out of range
        (0xB000, "Warning", None),  # coercion of data elements
        (0xB006, "Warning", None),  # elements discarded
        (0xB007, "Warning", None),  # data set does not match SOP class
        (0xB123, "Warning", None),  # any other 0xBxxx
        (0xA700, "Failure", True),  # out of resources: may succeed later
        (0xA900, "Failure", False),  # data set does not match SOP class
        (0xC000, "Failure", False),  # cannot understand
        (0x0122, "Failure", False),  # SOP class not supported
    ],
)
def test_each_status_category_against_a_real_scp(
    scp: Callable[[str], StoreSCP],
    ct_series: Callable[..., CTSeries],
    status: int,
    category: str,
    retryable: bool | None,
) -> None:
    """Success and warning mean stored (one attempt); a failure fails the instance, and is
    re-sent only when retryable."""
    assert code_to_category(status) == category
    pacs = scp("PACS")
    pacs.statuses = [status] * SETTINGS.max_attempts
    sleeps: list[float] = []
    sender = Sender(
        [destination("pacs", pacs.port)], SETTINGS, calling_ae="UNICT", sleep=sleeps.append
    )
    series = ct_series(1)
    if retryable is None:
        (result,) = sender(series.datasets)
        assert (result.ok, result.status, result.attempts) == (True, status, 1)
        assert result.detail == ("stored" if status == 0 else f"stored, warning 0x{status:04X}")
        assert sleeps == []
        return
    with pytest.raises(SendFailure) as info:
        sender(series.datasets)
    (result,) = info.value.results
    assert (result.ok, result.status) == (False, status)
    assert info.value.retryable is retryable
    assert result.attempts == (SETTINGS.max_attempts if retryable else 1)


@ignores_pynetdicom_socket_leak
def test_unreachable_destination_retries_then_fails(ct_series: Callable[..., CTSeries]) -> None:
    sleeps: list[float] = []
    sender = Sender(
        [destination("down", free_port())], SETTINGS, calling_ae="UNICT", sleep=sleeps.append
    )
    with pytest.raises(SendFailure) as info:
        sender(ct_series(1).datasets)
    assert info.value.retryable
    (result,) = info.value.results
    assert (result.ok, result.status, result.attempts) == (False, None, 3)
    assert "no association" in result.detail
    assert sleeps == [1.0, 1.5]  # doubling, capped at max_backoff_s
    collect_garbage()


def test_rejected_association_is_reported(
    scp: Callable[[str], StoreSCP], ct_series: Callable[..., CTSeries]
) -> None:
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(CTImageStorage)
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        sender = Sender(
            [destination("picky", port, "PICKY")],
            SETTINGS,
            calling_ae="UNICT",
            sleep=lambda s: None,
        )
        with pytest.raises(SendFailure, match="association rejected"):
            sender(ct_series(1).datasets)
    finally:
        server.shutdown()


def test_dataset_without_file_meta_is_sent(
    scp: Callable[[str], StoreSCP], ct_series: Callable[..., CTSeries]
) -> None:
    pacs = scp("PACS")
    ds = ct_series(1).datasets[0]
    bare = Dataset()
    bare.update(ds)
    sender = Sender([destination("pacs", pacs.port)], SETTINGS, calling_ae="UNICT")
    (result,) = sender([bare])
    assert result.ok and pacs.received == [ds.SOPInstanceUID]


def test_retryable_status_ranges() -> None:
    assert is_retryable_status(0xA700) and is_retryable_status(0xA7FF)
    assert not is_retryable_status(0xA900) and not is_retryable_status(0xC000)


@pytest.mark.orthanc
def test_sends_to_a_real_orthanc(
    orthanc: OrthancFixture, ct_series: Callable[..., CTSeries]
) -> None:
    server = orthanc.server
    series = ct_series(2)
    sender = Sender(
        [
            Destination(
                name="orthanc", ae_title=server.aet, host="127.0.0.1", port=server.dicom_port
            )
        ],
        SETTINGS,
        calling_ae=orthanc.node_aet,
    )
    results = sender(series.datasets)
    assert all(r.ok for r in results)
    for ds in series.datasets:
        assert server.client.lookup(ds.SOPInstanceUID, filter="Instance")
