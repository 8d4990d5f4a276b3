"""Generated phantoms written in the layouts of the public datasets, and as DICOM cases.

The readers of :mod:`model.datasets` read real ReXGroundingCT and CT-RATE; these writers
produce the same layouts from phantoms, so the readers (and a site's own pipeline) can be
tested end to end against known ground truth.

**CT-RATE** (:func:`write_ctrate`, ``out`` is the repository folder)::

    dataset/{split}/{split}_{p}/{split}_{p}_a/{split}_{p}_a_1.nii.gz
    dataset/metadata/{train|validation}_metadata.csv
    dataset/radiology_text_reports/{train|validation}_reports.csv
    dataset/multi_abnormality_labels/{train|valid}_predicted_labels.csv
    phantoms.json                      (ours: VolumeName -> phantom seed and grid)

* Volumes: int16 NIfTI of shape ``(H, W, D)`` (``hu.transpose(1, 2, 0)``: rows,
  columns, slices from inferior to superior) holding the stored values
  ``HU + 1024``; sform and qform (code 1) map voxels to RAS
  (:func:`model.datasets.ctrate.nifti_affine_ras`), with the phantom's true geometry.
* ``metadata.csv``: the release's 44 columns (:data:`~model.datasets.ctrate.METADATA_COLUMNS`);
  ``RescaleSlope`` 1, ``RescaleIntercept`` -1024, ``XYSpacing`` ``"[row, column]"``,
  ``ZSpacing``, ``Rows``, ``Columns``, ``NumberofSlices``, ``ImagePositionPatient`` and
  ``ImageOrientationPatient`` of the first slice; unknown acquisition fields blank.
* Reports: ``VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
  Impressions_EN``; ``Findings_EN`` is the phantom's report, ``Impressions_EN`` empty
  (so Findings + Impressions is the report exactly).
* Labels: ``VolumeName`` + the 18 CT-RATE abnormalities
  (:func:`model.datasets.ctrate.ctrate_labels`: Peribronchial thickening <- 1a,
  Bronchiectasis <- 1b, Emphysema <- 1c, Interlobular septal thickening <- 1d,
  Pulmonary fibrotic sequela <- 2a, Consolidation <- 2b, Atelectasis <- 2a/2b when their
  sentence says atelectasis, Lung opacity <- 2c, Lung nodule <- 2d, Pleural effusion <- 2e;
  micronodules (1e) set none; the eight cardiac, vascular, mediastinal and device
  columns are 0).

**ReXGroundingCT** (:func:`write_rexgroundingct`)::

    dataset.json                        {"train": [entry, ...]} or {"val": [...]}
    segmentations/{name}                (F, H, W, D) masks, one per scan with findings
    ct_rate/...                         the CT volumes and tables, as CT-RATE above

One JSON entry per scan, in the release's ``dataset.json`` (merged split by split):
``name`` (the CT-RATE volume name), ``findings`` ``{"0": sentence, ...}`` (one finding
per present abnormality, its sentence of the phantom report), ``categories`` ``{"0":
"2d", ...}`` (the label's code) and ``shape`` ``[H, W, D]``. The mask NIfTI has identity
affine and channel ``i`` for finding ``"i"`` on the CT's ``(H, W, D)`` voxel grid, each
connected lesion numbered 1..k (26-connectivity). A scan without findings has an entry
with empty ``findings``/``categories`` and no mask file.

**DICOM** (:func:`write_dicom_cases`)::

    case_{seed}/dicom/IM00001.dcm ...   CT Image Storage series (write_ct_series)
    case_{seed}/masks.npy               (10, D, H, W) uint8, slice d = instance d + 1
    case_{seed}/truth.json              present labels, lesions, report, geometry, UIDs
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydicom.uid import generate_uid
from scipy import ndimage

from model.datasets.ctrate import (
    CTRATE_LABELS,
    METADATA_COLUMNS,
    REPORT_COLUMNS,
    ctrate_labels,
    nifti_affine_ras,
    table_paths,
)
from model.labels import DEFAULT_LABELS, LABEL_KEYS
from model.phantom.case import Phantom
from model.phantom.dicom_series import RESCALE_INTERCEPT, write_ct_series
from model.phantom.grid import grid_summary

Split = Literal["train", "valid"]

#: CT-RATE split -> the split key of ReXGroundingCT's ``dataset.json``.
REX_SPLIT: dict[str, str] = {"train": "train", "valid": "val"}
#: The fixed study date written in the tables (the phantoms have no acquisition date).
STUDY_DATE = "20240101"

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _num(value: float) -> str:
    """A number as the shortest text that reads back exactly (integers without ``.0``)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _vec(values: Iterable[float]) -> str:
    return "[" + ", ".join(_num(v) for v in values) + "]"


def ctrate_name(split: str, patient: int, scan: str = "a", reconstruction: int = 1) -> str:
    """A CT-RATE ``VolumeName``, e.g. ``train_12_a_1.nii.gz``."""
    if split not in REX_SPLIT or patient < 1 or reconstruction < 1:
        raise ValueError(
            f"invalid CT-RATE name parts {split!r}, {patient}, {scan!r}, {reconstruction}"
        )
    return f"{split}_{patient}_{scan}_{reconstruction}.nii.gz"


def finding_sentences(phantom: Phantom) -> dict[str, str]:
    """Label key -> the sentence of the phantom's report describing that finding.

    The report states one sentence per present abnormality, in label order, before any
    normal statement (:func:`model.phantom.reports.compose_report`).
    """
    keys = [key for key, on in zip(LABEL_KEYS, phantom.present, strict=True) if on]
    sentences = [s for s in _SENTENCE_END.split(phantom.report.strip()) if s]
    if len(sentences) < len(keys):
        raise ValueError(f"report of seed {phantom.spec.seed} has fewer sentences than findings")
    return dict(zip(keys, sentences, strict=False))


def entity_labels(mask: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """Connected components (26-connectivity) of a binary mask, numbered 1..k."""
    labelled, count = ndimage.label(np.asarray(mask) != 0, structure=np.ones((3, 3, 3), dtype=bool))
    if count < 256:
        return np.asarray(labelled, dtype=np.uint8)
    return np.asarray(labelled, dtype=np.uint16)


def _metadata_row(name: str, phantom: Phantom) -> dict[str, str]:
    affine = phantom.affine_lps
    depth, rows, cols = phantom.hu.shape
    row_mm, col_mm = phantom.grid.pixel_spacing
    z_mm = float(np.linalg.norm(affine[:3, 0]))
    row_cos = affine[:3, 2] / np.linalg.norm(affine[:3, 2])  # along a row: next column
    col_cos = affine[:3, 1] / np.linalg.norm(affine[:3, 1])  # along a column: next row
    origin = affine[:3, 3]
    row = dict.fromkeys(METADATA_COLUMNS, "")
    row.update(
        {
            "VolumeName": name,
            "Manufacturer": "UniCT Node phantom",
            "SeriesDescription": "Chest CT",
            "ManufacturerModelName": "model.phantom",
            "ReconstructionDiameter": _num(round(max(rows * row_mm, cols * col_mm), 4)),
            "ConvolutionKernel": "STANDARD",
            "PatientPosition": "FFS",
            "ImagePositionPatient": _vec(round(float(v), 4) for v in origin),
            "ImageOrientationPatient": _vec((*row_cos, *col_cos)),
            "SliceLocation": _num(round(float(origin[2]), 4)),
            "SamplesPerPixel": "1",
            "PhotometricInterpretation": "MONOCHROME2",
            "Rows": str(rows),
            "Columns": str(cols),
            "XYSpacing": _vec((row_mm, col_mm)),
            "RescaleIntercept": _num(RESCALE_INTERCEPT),
            "RescaleSlope": "1",
            "RescaleType": "HU",
            "NumberofSlices": str(depth),
            "ZSpacing": _num(z_mm),
            "StudyDate": STUDY_DATE,
        }
    )
    return row


def _write_csv(path: Path, columns: Iterable[str], rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def _merge_json_list(path: Path, items: list[dict[str, Any]], key: str) -> None:
    """Write ``items`` into a JSON list file, replacing earlier items with the same ``key``."""
    existing: list[dict[str, Any]] = []
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
    names = {item[key] for item in items}
    merged = [item for item in existing if item.get(key) not in names] + items
    path.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")


def write_nifti_volume(phantom: Phantom, path: Path) -> tuple[int, int, int]:
    """Write the phantom's volume as a CT-RATE NIfTI (stored ``HU + 1024``, ``(H, W, D)``).

    Returns
    -------
    tuple
        The NIfTI shape ``(H, W, D)``.
    """
    stored = phantom.hu.astype(np.int32) - RESCALE_INTERCEPT
    if stored.min() < np.iinfo(np.int16).min or stored.max() > np.iinfo(np.int16).max:
        raise ValueError("phantom HU range does not fit int16 stored values")
    data = np.ascontiguousarray(stored.astype(np.int16).transpose(1, 2, 0))
    affine = nifti_affine_ras(phantom.affine_lps)
    image = nib.Nifti1Image(data, affine)  # type: ignore[no-untyped-call]
    image.set_sform(affine, code=1)  # type: ignore[no-untyped-call]
    image.set_qform(affine, code=1)  # type: ignore[no-untyped-call]
    image.header.set_xyzt_units("mm")  # type: ignore[no-untyped-call]
    image.set_data_dtype(np.int16)  # type: ignore[no-untyped-call]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    shape = data.shape
    return (int(shape[0]), int(shape[1]), int(shape[2]))


class CtRateWriter:
    """Accumulates phantoms into one split of a CT-RATE tree; :meth:`close` writes the tables.

    Parameters
    ----------
    out
        The tree's root (``dataset/`` is created in it).
    split
        ``"train"`` or ``"valid"``; the split's three tables are rewritten on close.
    """

    def __init__(self, out: Path, split: Split = "train") -> None:
        if split not in REX_SPLIT:
            raise ValueError(f"split must be train or valid, got {split!r}")
        self.out = Path(out)
        self.split = split
        self.metadata: list[dict[str, str]] = []
        self.reports: list[dict[str, str]] = []
        self.labels: list[dict[str, Any]] = []
        self.phantoms: list[dict[str, Any]] = []

    def volume_path(self, name: str) -> Path:
        """Where CT-RATE keeps the volume ``name``."""
        split, patient, scan = name.split("_")[:3]
        base = self.out / "dataset" / split / f"{split}_{patient}" / f"{split}_{patient}_{scan}"
        return base / name

    def add(self, phantom: Phantom, patient: int) -> tuple[str, tuple[int, int, int]]:
        """Write one phantom as patient ``patient``; returns its name and NIfTI shape."""
        name = ctrate_name(self.split, patient)
        shape = write_nifti_volume(phantom, self.volume_path(name))
        grid = phantom.grid
        self.metadata.append(_metadata_row(name, phantom))
        self.reports.append(
            {
                "VolumeName": name,
                "ClinicalInformation_EN": "Not given.",
                "Technique_EN": (
                    f"Non-contrast chest CT, axial sections of {_num(grid.slice_thickness)} mm."
                ),
                "Findings_EN": phantom.report,
                "Impressions_EN": "",
            }
        )
        self.labels.append(
            {"VolumeName": name, **ctrate_labels(phantom.present, finding_sentences(phantom))}
        )
        self.phantoms.append(
            {"VolumeName": name, "seed": phantom.spec.seed, "grid": grid_summary(grid)}
        )
        return name, shape

    def close(self) -> None:
        """Write ``metadata.csv``, the reports and the labels of the split, and ``phantoms.json``."""
        paths = table_paths(self.out, self.split)
        _write_csv(paths["metadata"], METADATA_COLUMNS, self.metadata)
        _write_csv(paths["reports"], REPORT_COLUMNS, self.reports)
        _write_csv(paths["labels"], ("VolumeName", *CTRATE_LABELS), self.labels)
        self.out.mkdir(parents=True, exist_ok=True)
        _merge_json_list(self.out / "phantoms.json", self.phantoms, "VolumeName")


def write_ctrate(
    phantoms: Iterable[Phantom], out: Path, *, split: Split = "train", first_patient: int = 1
) -> list[Path]:
    """Write phantoms as one split of a CT-RATE tree (see the module docstring).

    Parameters
    ----------
    phantoms
        The cases (consumed one at a time).
    out
        The tree's root.
    split
        ``"train"`` or ``"valid"``; that split's tables are rewritten.
    first_patient
        Patient number of the first case (``train_{first_patient}_a_1.nii.gz``); the
        next cases count up.

    Returns
    -------
    list of pathlib.Path
        The volumes written.
    """
    writer = CtRateWriter(out, split)
    paths = []
    for offset, phantom in enumerate(phantoms):
        name, _ = writer.add(phantom, first_patient + offset)
        paths.append(writer.volume_path(name))
    writer.close()
    return paths


def write_rexgroundingct(
    phantoms: Iterable[Phantom], out: Path, *, split: Split = "train", first_patient: int = 1
) -> list[dict[str, Any]]:
    """Write phantoms in the ReXGroundingCT layout (see the module docstring).

    Parameters
    ----------
    phantoms
        The cases (consumed one at a time).
    out
        Root: ``dataset.json``, ``segmentations/`` and the CT-RATE tree ``ct_rate/``.
    split
        CT-RATE split of the volume names; the entries go under ``"train"`` or ``"val"``
        of ``dataset.json`` (other splits already there are kept).
    first_patient
        Patient number of the first case; the next cases count up.

    Returns
    -------
    list of dict
        The JSON entries written.
    """
    out = Path(out)
    volumes = CtRateWriter(out / "ct_rate", split)
    mask_dir = out / "segmentations"
    mask_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for offset, phantom in enumerate(phantoms):
        name, shape = volumes.add(phantom, first_patient + offset)
        sentences = finding_sentences(phantom)
        findings: dict[str, str] = {}
        categories: dict[str, str] = {}
        channels = []
        for index, key in enumerate(LABEL_KEYS):
            if not phantom.present[index]:
                continue
            idx = str(len(findings))
            findings[idx] = sentences[key]
            categories[idx] = DEFAULT_LABELS[index].code
            channels.append(entity_labels(phantom.masks[index].transpose(1, 2, 0)))
        if channels:
            dtype = np.uint16 if any(c.dtype == np.uint16 for c in channels) else np.uint8
            stack = np.stack([c.astype(dtype) for c in channels])
            image = nib.Nifti1Image(stack, np.eye(4))  # type: ignore[no-untyped-call]
            image.set_data_dtype(dtype)  # type: ignore[no-untyped-call]
            nib.save(image, str(mask_dir / name))
        entries.append(
            {"name": name, "findings": findings, "categories": categories, "shape": list(shape)}
        )
    volumes.close()
    json_path = out / "dataset.json"
    data: dict[str, Any] = {}
    if json_path.is_file():
        data = json.loads(json_path.read_text(encoding="utf-8"))
    data[REX_SPLIT[split]] = entries
    json_path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return entries


def _lesion_record(lesion: Any) -> dict[str, Any]:
    index = LABEL_KEYS.index(lesion.label)
    return {
        "label": lesion.label,
        "code": DEFAULT_LABELS[index].code,
        "center_lps": [round(float(v), 3) for v in lesion.center_lps],
        "size_mm": round(float(lesion.size_mm), 2),
        "location": lesion.location,
    }


def write_dicom_case(
    phantom: Phantom, case_dir: Path, *, patient_name: str, patient_id: str
) -> dict[str, Any]:
    """Write one phantom as a DICOM CT series with its ground truth beside it.

    Parameters
    ----------
    phantom
        The case.
    case_dir
        Receives ``dicom/`` (the series, instance ``n`` = slice ``n - 1``), ``masks.npy``
        (``(10, D, H, W)`` uint8 on the series' grid) and ``truth.json``.
    patient_name, patient_id
        Patient Module values.

    Returns
    -------
    dict
        The content of ``truth.json``.
    """
    case_dir = Path(case_dir)
    study_uid, series_uid = generate_uid(), generate_uid()
    files = write_ct_series(
        phantom.hu,
        phantom.affine_lps,
        case_dir / "dicom",
        patient_name=patient_name,
        patient_id=patient_id,
        study_uid=study_uid,
        series_uid=series_uid,
        slice_thickness=phantom.grid.slice_thickness,
        accession_number=f"PH{phantom.spec.seed}"[:16],
        series_description="Chest CT phantom",
    )
    np.save(case_dir / "masks.npy", phantom.masks.astype(np.uint8))
    truth = {
        "seed": phantom.spec.seed,
        "patient_name": patient_name,
        "patient_id": patient_id,
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "instances": len(files),
        "shape": list(phantom.hu.shape),
        "affine_lps": phantom.affine_lps.tolist(),
        "grid": grid_summary(phantom.grid),
        "labels": [{"key": a.key, "code": a.code, "name": a.name} for a in DEFAULT_LABELS],
        "present": [key for key, on in zip(LABEL_KEYS, phantom.present, strict=True) if on],
        "present_vector": [bool(v) for v in phantom.present],
        "lesions": [_lesion_record(les) for les in phantom.lesions],
        "report": phantom.report,
        "masks": "masks.npy",
        "dicom": "dicom",
    }
    (case_dir / "truth.json").write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return truth


def write_dicom_cases(
    phantoms: Iterable[Phantom],
    out: Path,
    *,
    patient_name: str | None = None,
    patient_id: str | None = None,
) -> list[Path]:
    """Write phantoms as DICOM cases ``out/case_{seed}/`` (see :func:`write_dicom_case`).

    Parameters
    ----------
    phantoms
        The cases (consumed one at a time).
    out
        Parent folder.
    patient_name, patient_id
        Used for every case when given (one patient, one study per case); otherwise
        ``Phantom^Case{seed}`` and ``PHANTOM-{seed}``.

    Returns
    -------
    list of pathlib.Path
        The case folders.
    """
    dirs = []
    for phantom in phantoms:
        seed = phantom.spec.seed
        case_dir = Path(out) / f"case_{seed}"
        write_dicom_case(
            phantom,
            case_dir,
            patient_name=patient_name or f"Phantom^Case{seed}",
            patient_id=patient_id or f"PHANTOM-{seed}",
        )
        dirs.append(case_dir)
    return dirs
