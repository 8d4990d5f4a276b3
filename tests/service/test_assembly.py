"""service.assembly: quiet periods on a fake clock, provable completeness, C-FIND counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from service.assembly import Assembler, CFindCounter
from service.config import (
    AssemblySettings,
    DicomSettings,
    QueryPeer,
    SelectionSettings,
    StorageSettings,
)
from service.receiver import Receiver, SeriesRef
from service.selection import InstanceHeader
from service.store import JobState, JobStore, PendingSeries, ReceivedInstance
from tests.conftest import (
    CTSeries,
    FakeClock,
    OrthancFixture,
    collect_garbage,
    free_port,
    ignores_pynetdicom_socket_leak,
    make_ct_dataset,
)

QUIET = AssemblySettings(quiet_period_s=10)
SELECTION = SelectionSettings(min_slices=5, slice_thickness_mm=(0.5, 3.0))


class Feeder:
    """Records instances in the store and tells the assembler, as the receiver does."""

    def __init__(self, store: JobStore, assembler: Assembler) -> None:
        self.store = store
        self.assembler = assembler
        self.study_uid = generate_uid()
        self.series_uid = generate_uid()
        self.index = 0

    def receive(self, n: int, association: int = 1, **options: object) -> SeriesRef:
        ref = None
        for _ in range(n):
            ds = make_ct_dataset(
                study_uid=self.study_uid,
                series_uid=self.series_uid,
                index=self.index,
                **options,  # type: ignore[arg-type]
            )
            self.index += 1
            header = InstanceHeader.from_dataset(ds)
            result = self.store.record_instance(
                ReceivedInstance(
                    self.study_uid,
                    self.series_uid,
                    ds.SOPInstanceUID,
                    ds.SOPClassUID,
                    Path(f"/spool/{ds.SOPInstanceUID}.dcm"),
                    100,
                    "0" * 64,
                    "STORESCU",
                    header.to_json(),
                    header.images_in_acquisition,
                )
            )
            ref = SeriesRef(
                result.series_id,
                result.version,
                result.job_id,
                self.study_uid,
                self.series_uid,
                "STORESCU",
            )
            self.assembler.instance_received(association, ref)
        assert ref is not None
        return ref


@pytest.fixture
def assembler(sqlite_store: JobStore) -> Assembler:
    return Assembler(sqlite_store, QUIET, SELECTION)


@pytest.fixture
def feeder(sqlite_store: JobStore, assembler: Assembler) -> Feeder:
    return Feeder(sqlite_store, assembler)


def test_quiet_period_completes_and_queues(
    assembler: Assembler, feeder: Feeder, clock: FakeClock, sqlite_store: JobStore
) -> None:
    feeder.receive(6)
    clock.advance(9)
    assert assembler.run_once() == []
    feeder.receive(1)  # a new instance restarts the quiet period
    clock.advance(9)
    assert assembler.run_once() == []
    clock.advance(1)
    (job,) = assembler.run_once()
    assert job.state is JobState.QUEUED and job.instance_count == 7
    assert assembler.run_once() == []


def test_gap_free_stack_proves_nothing(
    assembler: Assembler, feeder: Feeder, clock: FakeClock
) -> None:
    # A contiguous stack, association released, but no expected count: wait the quiet period.
    feeder.receive(6)
    assembler.association_ended(1, released=True)
    assert assembler.run_once() == []
    clock.advance(10)
    assert [j.state for j in assembler.run_once()] == [JobState.QUEUED]


def test_provably_complete_at_release(assembler: Assembler, feeder: Feeder) -> None:
    feeder.receive(5, images_in_acquisition=6)
    assembler.association_ended(1, released=True)
    assert assembler.run_once() == []  # 5 of 6
    feeder.receive(1, association=2, images_in_acquisition=6)
    assert assembler.run_once() == []  # reached, but association 2 still open
    assembler.association_ended(2, released=True)
    (job,) = assembler.run_once()
    assert job.state is JobState.QUEUED and job.instance_count == 6


def test_aborted_association_is_no_proof(
    assembler: Assembler, feeder: Feeder, clock: FakeClock
) -> None:
    feeder.receive(6, images_in_acquisition=6)
    assembler.association_ended(1, released=False)
    assert assembler.run_once() == []
    clock.advance(10)
    assert len(assembler.run_once()) == 1


def test_series_open_on_two_associations_waits_for_both(
    assembler: Assembler, feeder: Feeder
) -> None:
    feeder.receive(3, association=1, images_in_acquisition=6)
    feeder.receive(3, association=2, images_in_acquisition=6)
    assembler.association_ended(1, released=True)
    assert assembler.run_once() == []
    assembler.association_ended(2, released=True)
    assert len(assembler.run_once()) == 1


def test_rejection_names_the_rule(assembler: Assembler, feeder: Feeder, clock: FakeClock) -> None:
    feeder.receive(3, modality="MR")
    clock.advance(10)
    (job,) = assembler.run_once()
    assert job.state is JobState.REJECTED
    assert job.rejected_rule == "modality MR not in [CT]"


def test_too_few_slices_rejected(assembler: Assembler, feeder: Feeder, clock: FakeClock) -> None:
    feeder.receive(2)
    clock.advance(10)
    (job,) = assembler.run_once()
    assert job.rejected_rule == "2 slices < min_slices 5"


def test_counter_supplies_expected_count(sqlite_store: JobStore) -> None:
    asked: list[PendingSeries] = []

    def counter(series: PendingSeries) -> int | None:
        asked.append(series)
        return 6

    assembler = Assembler(sqlite_store, QUIET, SELECTION, counter=counter)
    feeder = Feeder(sqlite_store, assembler)
    feeder.receive(6)
    assembler.association_ended(1, released=True)
    (job,) = assembler.run_once()
    assert job.expected_count == 6 and len(asked) == 1


def test_background_thread_closes_on_release(
    tmp_path: Path, sqlite_store: JobStore, ct_series: Callable[..., CTSeries]
) -> None:
    """Real association: released with ImagesInAcquisition reached -> QUEUED at once."""
    from tests.conftest import wait_until
    from tests.service.test_receiver import scu_store

    assembler = Assembler(
        sqlite_store, AssemblySettings(quiet_period_s=3600, poll_interval_s=30), SELECTION
    )
    receiver = Receiver(
        DicomSettings(port=0, allowed_callers=("STORESCU",)),
        StorageSettings(spool_dir=tmp_path / "spool", min_free_mb=0),
        sqlite_store,
        listener=assembler,
    )
    receiver.start()
    assembler.start()
    try:
        assert scu_store(receiver.port, ct_series(6, images_in_acquisition=6).datasets) == [0] * 6
        # Woken by the release, not by the 30 s poll or the 1 h quiet period.
        wait_until(
            lambda: sqlite_store.list_jobs(state=JobState.QUEUED), timeout=10, what="job QUEUED"
        )
        assert assembler.is_alive
    finally:
        receiver.stop()
        assembler.stop()
    assert not assembler.is_alive


@pytest.fixture
def find_scp() -> Iterator[tuple[int, list[Dataset]]]:
    """A pynetdicom C-FIND SCP answering NumberOfSeriesRelatedInstances = 42."""
    queries: list[Dataset] = []

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        queries.append(query)
        answer = Dataset()
        answer.QueryRetrieveLevel = "SERIES"
        answer.SeriesInstanceUID = query.SeriesInstanceUID
        answer.NumberOfSeriesRelatedInstances = 42
        yield 0xFF00, answer

    ae = AE(ae_title="PACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)]
    )
    assert server is not None
    yield port, queries
    server.shutdown()


def pending(series_uid: str, study_uid: str, calling_ae: str = "PACS") -> PendingSeries:
    from datetime import UTC, datetime

    return PendingSeries(1, 1, study_uid, series_uid, 1, calling_ae, 3, None, datetime.now(UTC))


@pytest.mark.network
@ignores_pynetdicom_socket_leak
def test_c_find_counter(find_scp: tuple[int, list[Dataset]]) -> None:
    port, queries = find_scp
    counter = CFindCounter("UNICT", {"PACS": QueryPeer(host="127.0.0.1", port=port)}, timeout_s=5)
    series_uid, study_uid = generate_uid(), generate_uid()
    assert counter(pending(series_uid, study_uid)) == 42
    (query,) = queries
    assert (query.QueryRetrieveLevel, query.SeriesInstanceUID) == ("SERIES", series_uid)
    assert counter(pending(series_uid, study_uid, calling_ae="UNKNOWN")) is None
    dead = CFindCounter(
        "UNICT", {"PACS": QueryPeer(host="127.0.0.1", port=free_port())}, timeout_s=2
    )
    assert dead(pending(series_uid, study_uid)) is None
    collect_garbage()


@pytest.mark.orthanc
def test_c_find_counter_against_orthanc(
    orthanc: OrthancFixture, ct_series: Callable[..., CTSeries]
) -> None:
    series = ct_series(7)
    for path in series.paths:
        orthanc.server.client.upload_file(path)
    peer = QueryPeer(host="127.0.0.1", port=orthanc.server.dicom_port, ae_title=orthanc.server.aet)
    counter = CFindCounter(orthanc.node_aet, {"ORTHANC": peer}, timeout_s=10)
    assert counter(pending(series.series_uid, series.study_uid, calling_ae="ORTHANC")) == 7
