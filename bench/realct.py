"""The shared real chest CT (``../shared/realct``) through a whole node and a real Orthanc.

Used by ``bench/bench_realct.py`` (turnaround and the radiologist's figures) and by
``tests/service/test_realct.py`` (the acceptance checks). The real data is never copied
into the project: it is unpacked into a temporary folder from where it lies.

The round trip is the one a site runs: the CT is uploaded to Orthanc, Orthanc C-STOREs
the series to the node (the node counts the series' instances with a C-FIND of Orthanc,
since real scanners leave Images in Acquisition out), the node analyses it with the
bundled model and C-STOREs SEG and SR back to Orthanc, from where they are read.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import yaml
from pydicom.dataset import Dataset
from sqlalchemy import select

#: Where the shared real data lies, beside the checkout (``UNICT_REALCT`` overrides).
REALCT_DIR = Path(
    os.environ.get("UNICT_REALCT", Path(__file__).resolve().parents[2] / "shared" / "realct")
)
LIDC_ARCHIVE = REALCT_DIR / "LIDC-IDRI-0001.tar.xz"
LIDC_MASK = REALCT_DIR / "LIDC-IDRI-0001_mask.npz"
SIEMENS_J2K = REALCT_DIR / "siemens-j2k-abdomen"

STAGES = ("load", "preprocess", "infer", "postprocess", "encode", "send")


def realct_missing_reason() -> str | None:
    """Why the real case cannot be run here, or ``None`` when it can."""
    if not LIDC_ARCHIVE.exists() or not LIDC_MASK.exists():
        return f"the shared real chest CT is not at {REALCT_DIR} (set UNICT_REALCT)"
    return None


def unpack_lidc(target: Path) -> Path:
    """Unpack the LIDC series into ``target``; return the folder of its DICOM files."""
    marker = target / ".unpacked"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(LIDC_ARCHIVE) as archive:
            archive.extractall(target, filter="data")
        marker.touch()
    folders = {p.parent for p in target.rglob("*.dcm")}
    if len(folders) != 1:
        raise RuntimeError(f"expected one series folder in {target}, found {len(folders)}")
    return folders.pop()


def readers_mask() -> npt.NDArray[np.bool_]:
    """The readers' nodule mask, ``(slices, rows, columns)`` in ascending z order."""
    with np.load(LIDC_MASK) as data:
        return np.asarray(data["mask"]).astype(bool)


@dataclass(frozen=True)
class RoundTrip:
    """What one pass of the real case through the node gave.

    Attributes
    ----------
    turnaround_s
        Series complete (closed in the job store) -> SR found in Orthanc.
    stages
        Seconds per pipeline stage of the job.
    detection_s
        Last instance recorded -> series closed (the C-FIND count of Orthanc).
    seg, sr
        The SEG and SR as Orthanc stored them (``seg`` is ``None`` without a SEG).
    job
        The job's record.
    """

    turnaround_s: float
    stages: dict[str, float]
    detection_s: float
    seg: Dataset | None
    sr: Dataset
    job: Any


def _node_config(work: Path, node_port: int, orthanc_dicom_port: int, free_port: Any) -> Path:
    config = {
        "dicom": {
            "ae_title": "UNICT",
            "port": node_port,
            "bind_address": "127.0.0.1",
            "allowed_callers": ["ORTHANC"],
        },
        "assembly": {
            "quiet_period_s": 30,
            "poll_interval_s": 0.1,
            "query_sender_for_count": True,
            "sender_query": {
                "ORTHANC": {"host": "127.0.0.1", "port": orthanc_dicom_port, "ae_title": "ORTHANC"}
            },
        },
        "destinations": [
            {"name": "orthanc", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom_port}
        ],
        "storage": {
            "spool_dir": str(work / "spool"),
            "min_free_mb": 100,
            "results_dir": str(work / "results"),
        },
        "database": {"url": f"sqlite:///{work / 'unict.db'}"},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "model": {"plan_dir": str(work / "plans")},
        "workers": {"count": 1, "poll_interval_s": 0.05},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def node_with_orthanc(work: Path) -> Iterator[tuple[Any, Any]]:
    """A real Orthanc and a whole node (bundled model) wired to each other on loopback."""
    from service.config import load_settings
    from service.node import Node
    from service.processor import UniCTProcessor
    from tests.conftest import free_port
    from tests.orthanc import orthanc_server

    node_port = free_port()
    with orthanc_server(
        work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"unict": ("UNICT", "127.0.0.1", node_port)},
    ) as orthanc:
        settings = load_settings(_node_config(work, node_port, orthanc.dicom_port, free_port))
        processor = UniCTProcessor(settings)
        processor.load()
        with Node(settings, processor, processor.status) as node:
            yield node, orthanc


def _instance(orthanc: Any, sop_uid: str) -> Dataset | None:
    ids = orthanc.client.lookup(sop_uid, filter="Instance")
    if not ids:
        return None
    data = orthanc.client.instances.get_file(ids[0])
    return pydicom.dcmread(io.BytesIO(data))


def relabel(series_dir: Path, target: Path, tag: str) -> Path:
    """A copy of the series as a new study: new Study, Series and SOP Instance UIDs.

    The pixels and every other header stay as they are; repeated runs of one real case
    are then new series to the node and to Orthanc, as a day's studies are.
    """
    from pydicom.uid import generate_uid

    target.mkdir(parents=True, exist_ok=True)
    study_uid: str | None = None
    series_uid: str | None = None
    for path in sorted(series_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        study_uid = study_uid or str(generate_uid(entropy_srcs=[tag, ds.StudyInstanceUID]))
        series_uid = series_uid or str(generate_uid(entropy_srcs=[tag, ds.SeriesInstanceUID]))
        sop_uid = str(generate_uid(entropy_srcs=[tag, ds.SOPInstanceUID]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.save_as(target / path.name, enforce_file_format=True)
    return target


def round_trip(node: Any, orthanc: Any, series_dir: Path, timeout: float = 300.0) -> RoundTrip:
    """Upload ``series_dir`` to Orthanc, have Orthanc send it to the node, wait for the SR."""
    from service.store.models import Series

    files = sorted(series_dir.glob("*.dcm"))
    for path in files:
        orthanc.client.upload_file(path)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    (orthanc_series,) = orthanc.client.lookup(series_uid, filter="Series")
    orthanc.client.modalities.send("unict", orthanc_series)
    deadline = time.monotonic() + timeout
    job = None
    while job is None:
        job = next(
            (
                j
                for j in node.store.list_jobs(limit=50)
                if j.series_instance_uid == series_uid
                and j.state.value in ("DONE", "FAILED", "REJECTED")
            ),
            None,
        )
        if time.monotonic() > deadline:
            raise TimeoutError("the node did not finish the real case")
        time.sleep(0.02)
    if job.state.value != "DONE":
        raise RuntimeError(f"job {job.id} {job.state.value}: {job.error_stage}: {job.error_reason}")
    result = job.outputs["result"]
    sr = None
    while sr is None:
        sr = _instance(orthanc, result["sr_sop_instance_uid"])
        if sr is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the SR did not reach Orthanc")
            time.sleep(0.01)
    found = datetime.now(UTC)
    seg_uid = result.get("seg_sop_instance_uid")
    seg = _instance(orthanc, seg_uid) if seg_uid else None
    with node.store.engine.connect() as conn:
        last, closed = conn.execute(
            select(Series.last_received_at, Series.completed_at).where(Series.id == job.series_id)
        ).one()
    closed = closed if closed.tzinfo else closed.replace(tzinfo=UTC)
    last = last if last.tzinfo else last.replace(tzinfo=UTC)
    return RoundTrip(
        turnaround_s=(found - closed).total_seconds(),
        stages={s: float(job.timings.get(s, 0.0)) for s in STAGES},
        detection_s=(closed - last).total_seconds(),
        seg=seg,
        sr=sr,
        job=job,
    )


# ------------------------------------------------------------------ reading the outputs


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def measurement_groups(sr: Dataset) -> list[Dataset]:
    """The SR's measurement groups (TID 1410/1411 containers)."""
    return [
        item
        for item in _walk(sr.ContentSequence)
        if item.ValueType == "CONTAINER" and _concept(item) == "Measurement Group"
    ]


def report_text(sr: Dataset) -> str:
    """The SR's findings narrative (TEXT Findings)."""
    for item in _walk(sr.ContentSequence):
        if item.ValueType == "TEXT" and _concept(item) == "Findings":
            return str(item.TextValue)
    return ""


def evaluations(sr: Dataset) -> dict[str, dict[str, Any]]:
    """Row 13 of the SR: finding name -> {present, probability, and any other NUM}."""
    out: dict[str, dict[str, Any]] = {}
    for item in _walk(sr.ContentSequence):
        if item.ValueType != "CODE" or "ContentSequence" not in item:
            continue
        props = {_concept(p): p for p in item.ContentSequence}
        if "Finding" not in props or "Probability" not in props:
            continue
        entry: dict[str, Any] = {"present": item.ConceptCodeSequence[0].CodeMeaning == "Present"}
        for name, p in props.items():
            if p.ValueType == "NUM":
                entry[name] = float(p.MeasuredValueSequence[0].NumericValue)
        out[str(props["Finding"].TextValue)] = entry
    return out


def segments(seg: Dataset, source_uids: list[str]) -> dict[str, npt.NDArray[np.bool_]]:
    """SEG segment label -> mask on the source grid (slices in ``source_uids`` order)."""
    import highdicom as hd

    segmentation = hd.seg.Segmentation.from_dataset(seg)
    out: dict[str, npt.NDArray[np.bool_]] = {}
    for number in segmentation.get_segment_numbers():
        label = str(segmentation.get_segment_description(number).segment_label)
        pixels = segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids,
            segment_numbers=[number],
            assert_missing_frames_are_empty=True,
        )
        out[label] = pixels[..., 0].astype(bool)
    return out


@dataclass(frozen=True)
class SegFinding:
    """A segment seen as a finding for :func:`service.report_text.location_agreement`."""

    index: int
    present: bool
    mask: npt.NDArray[np.bool_] | None
    sides: tuple[str, ...]
    lobes: tuple[int, ...]


@dataclass(frozen=True)
class Figures:
    """What a radiologist and a PACS admin look at, measured on the round trip."""

    groups: int
    present: dict[str, float]
    outside_lungs: dict[str, float]
    nodule_dice: float | None
    agreement: tuple[int, int]
    text: str
    laa950: float | None


def figures(rt: RoundTrip, series_dir: Path, truth: npt.NDArray[np.bool_] | None) -> Figures:
    """Measure the round trip's outputs against the CT's own lung field and the truth."""
    from model.labels import DEFAULT_LABELS
    from service.lung_field import dilate_mm, lobe_side, lung_field
    from service.report_text import location_agreement
    from service.volume import load_series

    volume = load_series(sorted(series_dir.glob("*.dcm")))
    lungs = lung_field(volume.hu, volume.affine_lps)
    full = (slice(0, volume.shape[0]), slice(0, volume.shape[1]), slice(0, volume.shape[2]))
    near = lungs.sample(dilate_mm(lungs.lungs, lungs.spacing, 5.0), full).astype(bool)
    lobes = lungs.sample(lungs.lobes, full)
    masks = (
        segments(rt.seg, [str(ds.SOPInstanceUID) for ds in volume.datasets])
        if rt.seg is not None
        else {}
    )
    outside = {label: float(1.0 - near[m].mean()) for label, m in masks.items() if m.any()}
    findings = []
    for index, abnormality in enumerate(DEFAULT_LABELS):
        mask = masks.get(abnormality.name)
        codes: tuple[int, ...] = ()
        if mask is not None and mask.any():
            counts = np.bincount(lobes[mask], minlength=6)[1:]
            chosen = {int(i) + 1 for i in np.nonzero(counts >= 0.1 * mask.sum())[0]}
            chosen.add(int(np.argmax(counts)) + 1) if counts.any() else None
            codes = tuple(sorted(chosen))
        sides = tuple(s for s in ("right", "left") if any(lobe_side(c) == s for c in codes))
        findings.append(SegFinding(index, mask is not None, mask, sides, codes))
    text = report_text(rt.sr)
    agreement = location_agreement(text, findings)  # type: ignore[arg-type]
    nodule = masks.get("Pulmonary nodule / mass")
    dice = None
    if truth is not None:
        m = nodule if nodule is not None else np.zeros(truth.shape, dtype=bool)
        dice = float(2.0 * (m & truth).sum() / max(int(m.sum() + truth.sum()), 1))
    evals = evaluations(rt.sr)
    present = {name: e["Probability"] for name, e in evals.items() if e["present"]}
    laa = next(
        (e["Low attenuation area below -950 HU"] for e in evals.values() if "Low attenuation area below -950 HU" in e),
        None,
    )
    return Figures(
        groups=len(measurement_groups(rt.sr)),
        present=present,
        outside_lungs=outside,
        nodule_dice=dice,
        agreement=(agreement.agreeing, agreement.sentences),
        text=text,
        laa950=laa,
    )
