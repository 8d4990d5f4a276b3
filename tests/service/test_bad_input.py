"""Bad input, sent over real associations to a whole node: each item ends with its expected
outcome (REJECTED with the rule, FAILED with the stage and reason, or refused with a DIMSE
status), the node keeps running, and the rest of the study is still analysed and sent.

Only the network's forward pass is a test double (``node_harness.PipelineProcessor``);
receiving, assembly, selection, volume loading, SEG/SR encoding and sending are the
product's.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE

from service.pipeline import OutputUIDs
from service.receiver import STATUS_CANNOT_UNDERSTAND, SUPPORTED_TRANSFER_SYNTAXES
from service.selection import ENHANCED_CT_IMAGE_STORAGE
from service.stages import Stage
from service.store import JobRecord, JobState
from tests.conftest import make_ct_dataset, wait_until
from tests.service.node_harness import (
    Destination,
    PipelineProcessor,
    by_series,
    ct_datasets,
    encoded,
    node_settings,
    running_node,
    send,
    send_raw,
    sent_uids,
    settled,
)

pytestmark = pytest.mark.network

N = 12
IIA = {"images_in_acquisition": N}  # closes a series as soon as its association is released
DCMCJPEG = Path("/usr/bin/dcmcjpeg")


@dataclass
class NodeUnderTest:
    node: object  # service.node.Node
    processor: PipelineProcessor
    destination: Destination
    spool: Path

    @property
    def port(self) -> int:
        return int(self.node.dicom_port)  # type: ignore[attr-defined]

    def settled(self, study_uid: str, count: int | None = None) -> list[JobRecord]:
        return settled(self.node, study_uid, count)  # type: ignore[arg-type]

    @property
    def ready(self) -> bool:
        return bool(self.node.ready)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def nut(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeUnderTest]:
    """One node for the module; every test uses a study of its own."""
    tmp = tmp_path_factory.mktemp("bad-input")
    destination = Destination().start()
    settings = node_settings(tmp, destination, quiet_period_s=2)
    settings = settings.model_copy(
        update={"workers": settings.workers.model_copy(update={"count": 2})}
    )
    try:
        with running_node(settings) as (node, processor):
            yield NodeUnderTest(node, processor, destination, settings.storage.spool_dir)
    finally:
        destination.stop()


def good(study: str) -> list[Dataset]:
    """The study's usable series: it must come out DONE whatever else the study holds."""
    return ct_datasets(N, study, images_in_acquisition=N, description="Chest good")


def assert_done_and_delivered(nut: NodeUnderTest, job: JobRecord) -> None:
    assert job.state is JobState.DONE, (job.error_stage, job.error_reason, job.rejected_rule)
    delivered = sent_uids(job)
    assert len(delivered) == 2  # SEG + SR
    assert delivered <= {
        s.sop_instance_uid for s in nut.destination.of_study(job.study_instance_uid)
    }


def tilted(degrees: float) -> tuple[float, ...]:
    """Rows along x, columns tilted about x: the slice normal leaves z by `degrees`."""
    a = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, round(math.cos(a), 8), round(math.sin(a), 8))


# --------------------------------------------------------------------------- builders


def _edit(datasets: list[Dataset], index: int, change: Callable[[Dataset], None]) -> list[Dataset]:
    change(datasets[index])
    return datasets


def missing(keyword: str) -> Callable[[str], list[list[Dataset]]]:
    def build(study: str) -> list[list[Dataset]]:
        return [_edit(ct_datasets(N, study, **IIA), 5, lambda ds: delattr(ds, keyword))]

    return build


def non_uniform(study: str) -> list[list[Dataset]]:
    series = ct_datasets(N, study, **IIA)
    for ds in series[6:]:
        ds.ImagePositionPatient = [0.0, 0.0, float(ds.ImagePositionPatient[2]) + 0.6]
    return [series]


def gap(study: str) -> list[list[Dataset]]:
    series = ct_datasets(N, study, **IIA)
    del series[6]
    return [series]


def oblique_along_normal(degrees: float) -> Callable[[str], list[list[Dataset]]]:
    """A truly oblique stack: positions step along the tilted normal."""

    def build(study: str) -> list[list[Dataset]]:
        iop = tilted(degrees)
        normal = np.cross(iop[:3], iop[3:])
        series = ct_datasets(N, study, orientation=iop, **IIA)
        for i, ds in enumerate(series):
            ds.ImagePositionPatient = [round(float(v), 6) for v in normal * i]
        return [series]

    return build


def gantry_tilt(study: str) -> list[list[Dataset]]:
    # Tilted image planes, table positions straight along z: a sheared grid.
    return [ct_datasets(N, study, orientation=tilted(8), **IIA)]


def reverse_order(study: str) -> list[list[Dataset]]:
    return [list(reversed(ct_datasets(N, study, **IIA)))]


def multi_phase(study: str) -> list[list[Dataset]]:
    series_uid = generate_uid()
    arterial = ct_datasets(N, study, series_uid, **IIA)
    venous = ct_datasets(N, study, series_uid, **IIA)
    for ds in venous:
        ds.AcquisitionNumber = 2
        ds.InstanceNumber = int(ds.InstanceNumber) + N
    return [arterial + venous]


def enhanced_ct(study: str, frames: int = N) -> Dataset:
    """A minimal Enhanced CT Image Storage instance of `frames` 32x32 frames."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-1"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.SliceThickness = 1.0
    measures.PixelSpacing = [0.7, 0.7]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for i in range(frames):
        position, item = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(i)]
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.zeros((frames, 32, 32), dtype=np.int16).tobytes()
    return ds


@dataclass(frozen=True)
class Case:
    build: Callable[[str], list[list[Dataset]]]
    state: JobState
    reason: str
    """A fragment of the rejected rule or of the failure reason."""


CASES = {
    "non-CT modality": Case(
        lambda s: [ct_datasets(N, s, modality="PT", **IIA)],
        JobState.REJECTED,
        "modality PT not in [CT]",
    ),
    "localizer in the study": Case(
        lambda s: [ct_datasets(3, s, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))],
        JobState.REJECTED,
        "image type LOCALIZER excluded",
    ),
    "missing ImagePositionPatient": Case(
        missing("ImagePositionPatient"),
        JobState.FAILED,
        "of the series has no ImagePositionPatient",
    ),
    "missing PixelSpacing": Case(
        missing("PixelSpacing"), JobState.FAILED, "of the series has no PixelSpacing"
    ),
    "non-uniform slice spacing": Case(non_uniform, JobState.FAILED, "not uniformly spaced"),
    "a gap": Case(gap, JobState.FAILED, "not uniformly spaced"),
    "gantry tilt 8 deg": Case(gantry_tilt, JobState.DONE, ""),
    "oblique 8 deg": Case(oblique_along_normal(8), JobState.DONE, ""),
    "oblique 30 deg": Case(
        oblique_along_normal(30), JobState.REJECTED, "obliquity 30.0 deg > max_obliquity_deg 10"
    ),
    "reverse slice order": Case(reverse_order, JobState.DONE, ""),
    "multi-phase, duplicate positions": Case(
        multi_phase, JobState.FAILED, "slice position(s) occur more than once"
    ),
    "enhanced multi-frame CT": Case(
        lambda s: [[enhanced_ct(s)]],
        JobState.FAILED,
        "is multi-frame; only single-frame series are supported",
    ),
}


@pytest.fixture(scope="module")
def case_studies(nut: NodeUnderTest) -> dict[str, tuple[str, str]]:
    """Send every case at once, each in a study of its own with a good series after it.

    Returns case name -> (study UID, the good series' UID). One round trip for all cases
    keeps the module quick; each case is then checked by its own test.
    """
    out: dict[str, tuple[str, str]] = {}
    for name, case in CASES.items():
        study = generate_uid()
        companion = good(study)
        statuses = send(nut.port, [ds for series in case.build(study) for ds in series] + companion)
        assert set(statuses) == {0x0000}, name
        out[name] = (study, companion[0].SeriesInstanceUID)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_series_has_its_outcome_and_the_rest_of_the_study_is_done(
    nut: NodeUnderTest, case_studies: dict[str, tuple[str, str]], name: str
) -> None:
    case = CASES[name]
    study, companion = case_studies[name]
    jobs = by_series(nut.settled(study, count=2))
    (done,) = jobs.pop(companion)
    assert_done_and_delivered(nut, done)
    (bad_jobs,) = jobs.values()
    (job,) = bad_jobs  # one job, no second version
    assert job.state is case.state, (job.error_stage, job.error_reason, job.rejected_rule)
    if case.state is JobState.REJECTED:
        assert case.reason in (job.rejected_rule or "")
    elif case.state is JobState.FAILED:
        assert job.error_stage == Stage.LOAD.value
        assert case.reason in (job.error_reason or "")
        assert job.attempts == 1  # a data problem is not retried
    else:
        assert_done_and_delivered(nut, job)
    assert nut.ready
    assert nut.destination.duplicates() == []


def test_reverse_order_is_analysed_ascending(nut: NodeUnderTest) -> None:
    study = generate_uid()
    series = list(reversed(ct_datasets(N, study, images_in_acquisition=N)))
    assert set(send(nut.port, series)) == {0}
    (job,) = nut.settled(study)
    assert job.state is JobState.DONE
    (claimed,) = [j for j in nut.processor.jobs if j.job_id == job.id]
    z = [
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in claimed.instance_paths
    ]
    assert z == sorted(z)


def test_non_ct_sop_class_is_refused_at_negotiation(nut: NodeUnderTest) -> None:
    study = generate_uid()
    mr = ct_datasets(1, study)[0]
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", nut.port, ae_title="UNICT")
    assert assoc.is_established
    try:
        (mr_context,) = [c for c in assoc.rejected_contexts if c.abstract_syntax == MRImageStorage]
        assert mr_context.result == 0x03  # abstract syntax not supported (PS3.8 §9.3.3.2)
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(mr)
    finally:
        assoc.release()
    assert nut.node.store.list_jobs(study_instance_uid=study) == []  # type: ignore[attr-defined]


def _jpeg_lossless(ds: Dataset, work: Path) -> Dataset:
    """JPEG Lossless SV1 by DCMTK (pydicom has no encoder for it)."""
    src, out = work / f"{ds.SOPInstanceUID}.dcm", work / f"{ds.SOPInstanceUID}.jpeg.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run(
        [str(DCMCJPEG), "+e1", str(src), str(out)], check=True, capture_output=True, timeout=60
    )
    return pydicom.dcmread(out)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless])
def test_compressed_transfer_syntax_is_decoded(
    nut: NodeUnderTest, syntax: pydicom.uid.UID, tmp_path: Path
) -> None:
    assert syntax in SUPPORTED_TRANSFER_SYNTAXES, f"no decoder installed for {syntax.name}"
    study = generate_uid()
    series = ct_datasets(N, study, images_in_acquisition=N)
    for ds in series:  # a real image, not one value per slice
        ds.PixelData = (
            np.random.default_rng(int(ds.InstanceNumber))
            .integers(-1024, 2000, (32, 32), dtype=np.int16)
            .tobytes()
        )
    if syntax == JPEGLosslessSV1:
        if not DCMCJPEG.exists():
            pytest.skip("DCMTK dcmcjpeg not installed")
        compressed = [_jpeg_lossless(ds, tmp_path) for ds in series]
    else:
        compressed = []
        for ds in series:
            copy = pydicom.dcmread(_roundtrip(ds, tmp_path))
            copy.compress(syntax, generate_instance_uid=False)
            compressed.append(copy)
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in compressed} == {syntax}
    assert set(send(nut.port, compressed, syntaxes=[syntax])) == {0}
    (job,) = nut.settled(study)
    assert_done_and_delivered(nut, job)
    # What the node spooled decodes to the pixels that were sent.
    (claimed,) = [j for j in nut.processor.jobs if j.job_id == job.id]
    for path in claimed.instance_paths:
        spooled = pydicom.dcmread(path)
        original = next(ds for ds in series if ds.SOPInstanceUID == spooled.SOPInstanceUID)
        assert spooled.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(
            spooled.pixel_array, np.frombuffer(original.PixelData, dtype=np.int16).reshape(32, 32)
        )


def _roundtrip(ds: Dataset, work: Path) -> Path:
    path = work / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_truncated_and_corrupt_instances_are_refused(nut: NodeUnderTest) -> None:
    study = generate_uid()
    series = ct_datasets(N, study)
    first, last = series[0], series[-1]
    cut = encoded(first)[:-100]  # the connection of a router gave out mid-object
    garbage = bytearray(encoded(last))
    rng = random.Random(11)
    for i in range(200, 260):  # header bytes overwritten
        garbage[i] = rng.randrange(256)
    short = series[5]
    short.PixelData = short.PixelData[:-64]  # pixel data shorter than the image
    statuses = send_raw(
        nut.port,
        [
            (first.SOPClassUID, first.SOPInstanceUID, cut),
            (last.SOPClassUID, last.SOPInstanceUID, bytes(garbage)),
        ],
    )
    assert statuses == [STATUS_CANNOT_UNDERSTAND] * 2
    assert send(nut.port, [short]) == [STATUS_CANNOT_UNDERSTAND]
    # The sender resends the good ones: slices 2..11 with the repaired one.
    short.PixelData = make_ct_dataset(
        study_uid=study, series_uid=short.SeriesInstanceUID, index=5, rows=32, columns=32
    ).PixelData
    assert set(send(nut.port, series[1:-1])) == {0}
    (job,) = nut.settled(study)
    assert_done_and_delivered(nut, job)
    assert job.instance_count == N - 2
    refused = {first.SOPInstanceUID, last.SOPInstanceUID}
    spooled = [p.name for p in nut.spool.rglob("*") if p.is_file()]
    assert not [name for name in spooled if name.split(".dcm")[0].rsplit(".", 1)[0] in refused]
    assert not list(nut.spool.rglob("*.part"))
    assert nut.ready


def test_duplicate_instance_with_different_content_makes_a_new_version(
    nut: NodeUnderTest,
) -> None:
    study = generate_uid()
    series = ct_datasets(N, study, images_in_acquisition=N)
    changed = pydicom.dcmread(_roundtrip(series[3], nut.spool.parent))
    changed.PixelData = np.full((32, 32), 77, dtype=np.int16).tobytes()
    assert set(send(nut.port, [*series, changed])) == {0}
    v1, v2 = nut.settled(study, count=2)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.state is JobState.FAILED and v1.superseded_by == v2.id
    assert v1.error_reason is not None and "changed content of an instance" in v1.error_reason
    assert_done_and_delivered(nut, v2)
    assert v2.instance_count == N
    # Only the new version's result reached the PACS.
    assert {s.sop_instance_uid for s in nut.destination.of_study(study)} == sent_uids(v2)


def test_instance_after_the_job_started_supersedes_it(nut: NodeUnderTest) -> None:
    study = generate_uid()
    series = ct_datasets(N + 1, study)
    gate = nut.processor.hold(series[0].SeriesInstanceUID)
    try:
        assert set(send(nut.port, series[:N])) == {0}
        assert nut.processor.holding[series[0].SeriesInstanceUID].wait(60)
        assert send(nut.port, series[N:]) == [0]  # late: the job is running
    finally:
        gate.set()
    v1, v2 = nut.settled(study, count=2)
    assert v1.state is JobState.FAILED and v1.superseded_by == v2.id
    assert "before sending; outputs not sent" in (v1.error_reason or "")
    assert_done_and_delivered(nut, v2)
    assert v2.instance_count == N + 1
    card = nut.processor.card
    expected = OutputUIDs.for_result(study, series[0].SeriesInstanceUID, 2, card)
    assert {s.sop_instance_uid for s in nut.destination.of_study(study)} == {
        expected.seg_instance,
        expected.sr_instance,
    }


def test_two_series_interleaved_in_one_association(nut: NodeUnderTest) -> None:
    study = generate_uid()
    a = ct_datasets(N, study, images_in_acquisition=N)
    b = ct_datasets(N, study, images_in_acquisition=N, thickness=2.0)
    assert set(send(nut.port, [ds for pair in zip(a, b, strict=True) for ds in pair])) == {0}
    jobs = by_series(nut.settled(study, count=2))
    for series in (a, b):
        (job,) = jobs[series[0].SeriesInstanceUID]
        assert_done_and_delivered(nut, job)
        assert job.instance_count == N
        paths = nut.node.store.job_instances(job.id)  # type: ignore[attr-defined]
        assert {i.sop_instance_uid for i in paths} == {ds.SOPInstanceUID for ds in series}


def test_one_study_split_across_associations(nut: NodeUnderTest) -> None:
    study = generate_uid()
    a = ct_datasets(N, study, images_in_acquisition=N)
    b = ct_datasets(N, study, images_in_acquisition=N)
    half = N // 2
    assert set(send(nut.port, a[:half])) == {0}
    assert set(send(nut.port, b)) == {0}
    assert set(send(nut.port, a[half:])) == {0}
    jobs = by_series(nut.settled(study, count=2))
    for series in (a, b):
        (job,) = jobs[series[0].SeriesInstanceUID]  # one version: no early close, no mix
        assert_done_and_delivered(nut, job)
        assert job.instance_count == N


def test_iso_2022_patient_name(nut: NodeUnderTest, caplog: pytest.LogCaptureFixture) -> None:
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    study = generate_uid()
    series = ct_datasets(N, study, images_in_acquisition=N)
    for ds in series:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = name
    with caplog.at_level(logging.DEBUG):
        assert set(send(nut.port, series)) == {0}
        (job,) = nut.settled(study)
    assert_done_and_delivered(nut, job)
    spooled = pydicom.dcmread(nut.node.store.job_instances(job.id)[0].path)  # type: ignore[attr-defined]
    assert "ISO 2022 IR 87" in spooled.SpecificCharacterSet
    assert str(spooled.PatientName) == name
    for stored in nut.destination.of_study(study):
        assert str(stored.dataset.PatientName) == name
    assert "Yamada" not in caplog.text and "山田" not in caplog.text
    assert "PHANTOM-1" not in caplog.text


def test_node_survives_everything_above(nut: NodeUnderTest) -> None:
    wait_until(lambda: nut.ready, timeout=30, what="node ready")
    assert nut.destination.duplicates() == []
    assert not list(nut.spool.rglob("*.part"))
    assert shutil.disk_usage(nut.spool).free > 0
