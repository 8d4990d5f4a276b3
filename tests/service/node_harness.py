"""A whole node on loopback for reliability tests: real listener, assembler, workers,
job store, pipeline and C-STORE sender, with only the network's forward pass replaced.

- :class:`Destination` is a real pynetdicom Storage SCP standing in for the PACS; it
  records every C-STORE it answered (so duplicates show) and can be scripted to refuse
  or to stall.
- :class:`PipelineProcessor` runs :func:`service.pipeline.analyse_series` (load, preprocess,
  postprocess, SEG and SR encoding, deterministic output UIDs) on the test-double engine
  of ``test_pipeline``; a job can be held at the start of processing with :meth:`hold`.
- :func:`running_node` starts a :class:`~service.node.Node` wired to both.

A plain module (not a conftest) so tests import exactly what they use.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
    generate_uid,
)
from pynetdicom import AE, evt

from service.config import (
    AssemblySettings,
    DatabaseSettings,
    DicomSettings,
    RetentionSettings,
    SelectionSettings,
    SenderSettings,
    Settings,
    StorageSettings,
    WorkersSettings,
)
from service.config import Destination as DestinationSettings
from service.node import Node
from service.pipeline import OutputOptions, OutputUIDs, analyse_series
from service.store import JobRecord, JobState
from service.worker import ClaimedJob, ProcessOutcome
from tests.conftest import free_port, make_ct_dataset, wait_until
from tests.service.dicom_fixtures import make_card
from tests.service.test_pipeline import FakeEngine

CALLING_AE = "STORESCU"
NODE_AE = "UNICT"
FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED})

#: Selection for the small synthetic series of these tests (12+ slices of 1 mm).
SELECTION = SelectionSettings(min_slices=10, slice_thickness_mm=(0.5, 5.0))


@dataclass
class Stored:
    """One C-STORE the destination answered with success."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    dataset: Dataset


@dataclass
class Destination:
    """A pynetdicom Storage SCP for SEG and SR: the PACS the node sends its results to.

    Attributes
    ----------
    statuses
        Answered in order to the next C-STOREs (then success); e.g. ``[0xA700]``.
    stall
        While set, C-STORE handlers wait on :attr:`release` before answering (and
        :attr:`stalled` is set), so a test can act while a send is in flight.
    """

    ae_title: str = "PACS"
    port: int = field(default_factory=free_port)
    stored: list[Stored] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    stall: bool = False
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        if self.stall:
            self.stalled.set()
            self.release.wait(60)
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000:
                ds = event.dataset
                self.stored.append(
                    Stored(
                        str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), ds
                    )
                )
        return status

    def start(self) -> Destination:
        ae = AE(ae_title=self.ae_title)
        for sop_class in (SegmentationStorage, Comprehensive3DSRStorage, CTImageStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def settings(self) -> DestinationSettings:
        return DestinationSettings(
            name="pacs", ae_title=self.ae_title, host="127.0.0.1", port=self.port
        )

    def of_study(self, study_uid: str) -> list[Stored]:
        with self._lock:
            return [s for s in self.stored if s.study_instance_uid == study_uid]

    def duplicates(self) -> list[str]:
        """SOP Instance UIDs stored more than once (a re-send of the same instance)."""
        with self._lock:
            counts = Counter(s.sop_instance_uid for s in self.stored)
        return sorted(uid for uid, n in counts.items() if n > 1)


class PipelineProcessor:
    """The product pipeline on the test-double engine; outputs get deterministic UIDs."""

    def __init__(self) -> None:
        self.card = make_card()
        # The harness's series are small and all air (no lungs, nothing gated): the test
        # double's sphere at the grid's centre lies in them.
        self.engine = FakeEngine(self.card, centre_x_mm=0.0)
        self.options = OutputOptions()
        self.jobs: list[ClaimedJob] = []
        self._held: dict[str, threading.Event] = {}
        self.holding: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def hold(self, series_uid: str) -> threading.Event:
        """Jobs of `series_uid` wait at the start until the returned event is set."""
        gate = threading.Event()
        self._held[series_uid] = gate
        self.holding[series_uid] = threading.Event()
        return gate

    def __call__(self, job: ClaimedJob) -> ProcessOutcome:
        with self._lock:
            self.jobs.append(job)
        gate = self._held.get(job.series_instance_uid)
        if gate is not None:
            self.holding[job.series_instance_uid].set()
            gate.wait(60)
        uids = OutputUIDs.for_result(
            job.study_instance_uid, job.series_instance_uid, job.version, self.card
        )
        with self._lock:  # the test-double engine is not meant for concurrent calls
            result = analyse_series(
                job.instance_paths, self.engine, self.card, self.options, uids=uids
            )
        outputs = (*(ds for ds in (result.seg, result.sr) if ds is not None), *result.sc)
        timings = {stage.value: seconds for stage, seconds in result.timings.items()}
        return ProcessOutcome(outputs=outputs, timings=timings)


def node_settings(
    tmp_path: Path,
    destination: Destination | None,
    *,
    quiet_period_s: float = 1.5,
    sender: SenderSettings | None = None,
    workers: WorkersSettings | None = None,
    selection: SelectionSettings = SELECTION,
    retention: RetentionSettings | None = None,
    **dicom: Any,
) -> Settings:
    """Settings of a test node on loopback (port 0, SQLite and spool in `tmp_path`)."""
    dicom.setdefault("allowed_callers", (CALLING_AE,))
    return Settings(
        dicom=DicomSettings(ae_title=NODE_AE, port=0, **dicom),
        assembly=AssemblySettings(quiet_period_s=quiet_period_s, poll_interval_s=0.1),
        selection=selection,
        destinations=(destination.settings,) if destination is not None else (),
        sender=sender or SenderSettings(max_attempts=2, backoff_s=0.1, timeout_s=10),
        storage=StorageSettings(
            spool_dir=tmp_path / "spool", min_free_mb=0, results_dir=tmp_path / "results"
        ),
        retention=retention or RetentionSettings(),
        database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'db' / 'unict.db'}"),
        workers=workers or WorkersSettings(count=1, poll_interval_s=0.05, retry_backoff_s=0.2),
    )


@contextmanager
def running_node(
    settings: Settings, processor: PipelineProcessor | None = None, *, http: bool = False
) -> Iterator[tuple[Node, PipelineProcessor]]:
    """A started node (HTTP only when asked) and its processor; stopped at the end."""
    processor = processor or PipelineProcessor()
    node = Node(settings, processor, lambda: (True, "fake engine"))
    node.start(http=http)
    try:
        yield node, processor
    finally:
        node.stop()


def ct_datasets(
    n: int, study_uid: str, series_uid: str | None = None, **options: Any
) -> list[Dataset]:
    """`n` slices (32x32, 1 mm apart) of one CT series; options go to ``make_ct_dataset``."""
    series_uid = series_uid or generate_uid()
    options.setdefault("rows", 32)
    options.setdefault("columns", 32)
    return [
        make_ct_dataset(study_uid=study_uid, series_uid=series_uid, index=i, **options)
        for i in range(n)
    ]


def send(
    port: int,
    datasets: Sequence[Dataset | Path],
    *,
    calling: str = CALLING_AE,
    syntaxes: Sequence[str] = (ExplicitVRLittleEndian,),
) -> list[int]:
    """C-STORE `datasets` (or files) on one association; return each status."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    classes = {str(d.SOPClassUID) for d in datasets if isinstance(d, Dataset)} or {CTImageStorage}
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "association refused"
    try:
        statuses = []
        for item in datasets:
            status = assoc.send_c_store(item)
            statuses.append(int(status.Status) if status else -1)
        return statuses
    finally:
        assoc.release()


def settled(node: Node, study_uid: str, count: int | None = None) -> list[JobRecord]:
    """The study's jobs once every one is final (and at least `count` of them), oldest first."""

    def done() -> list[JobRecord] | None:
        jobs = node.store.list_jobs(study_instance_uid=study_uid, limit=1000)
        if not jobs or (count is not None and len(jobs) < count):
            return None
        if any(j.state not in FINAL_STATES for j in jobs):
            return None
        return sorted(jobs, key=lambda j: j.id)

    result: list[JobRecord] = wait_until(done, timeout=120, what="the study's jobs to end")
    return result


def by_series(jobs: Sequence[JobRecord]) -> dict[str, list[JobRecord]]:
    """Jobs grouped by series UID, versions in order."""
    out: dict[str, list[JobRecord]] = {}
    for job in sorted(jobs, key=lambda j: (j.series_instance_uid, j.version)):
        out.setdefault(job.series_instance_uid, []).append(job)
    return out


def sent_uids(job: JobRecord) -> set[str]:
    """SOP Instance UIDs the job records as delivered."""
    return {s["sop_instance_uid"] for s in job.outputs.get("sent", []) if s["ok"]}


def send_raw(
    port: int,
    items: Sequence[tuple[str, str, bytes]],
    *,
    calling: str = CALLING_AE,
    syntax: str = ExplicitVRLittleEndian,
    timeout: float = 60,
) -> list[int]:
    """C-STORE encoded datasets as they are, even malformed or cut short.

    Each item is (SOP Class UID, SOP Instance UID, dataset bytes in `syntax`, no file
    meta). pynetdicom's public ``send_c_store`` decodes and re-encodes what it sends, so
    this builds the DIMSE request itself; returns each status (``-1`` when none came).
    """
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    assert assoc.is_established, "association refused"
    statuses = []
    try:
        context = assoc._get_valid_context(CTImageStorage, syntax, "scu")
        for message_id, (sop_class, sop_instance, data) in enumerate(items, start=1):
            request = C_STORE()
            request.MessageID = message_id
            request.AffectedSOPClassUID = sop_class
            request.AffectedSOPInstanceUID = sop_instance
            request.Priority = 2
            request.DataSet = io.BytesIO(data)
            assert assoc.dimse is not None and context.context_id is not None
            # As send_c_store does: pause the association's reactor while waiting.
            assoc._reactor_checkpoint.clear()
            while not assoc._is_paused:
                time.sleep(0.0001)
            try:
                assoc.dimse.send_msg(request, context.context_id)
                _, response = assoc.dimse.get_msg(block=True)
            finally:
                assoc._reactor_checkpoint.set()
            status = getattr(response, "Status", None)
            statuses.append(int(status) if status is not None else -1)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def encoded(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """`ds` encoded without file meta, as it travels in a P-DATA."""
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()
