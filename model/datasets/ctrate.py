"""CT-RATE: reading its volumes, tables and labels into :class:`~model.datasets.sample.Sample`.

Layout (the Hugging Face release ``ibrahimhamamci/CT-RATE``; ``root`` may be the
repository folder or its ``dataset/`` folder)::

    dataset/train/train_{p}/train_{p}_{s}/train_{p}_{s}_{r}.nii.gz   (also valid/..., *_fixed/)
    dataset/metadata/train_metadata.csv            (validation_metadata.csv)
    dataset/radiology_text_reports/train_reports.csv   (validation_reports.csv)
    dataset/multi_abnormality_labels/train_predicted_labels.csv  (valid_predicted_labels.csv)
    dataset/metadata/no_chest_train.txt            (no_chest_valid.txt; optional)

Volumes are int16 NIfTI ``(H, W, D)`` (mostly 512 x 512 x N), slices on the last axis.
The reader follows the dataset's own loader (CT-CLIP ``data_inference_nii.py``):

* **Rescale**: ``HU = value * RescaleSlope + RescaleIntercept`` from ``metadata.csv``,
  applied to nibabel's ``get_fdata`` (which already applies any NIfTI ``scl_slope``).
* **Spacing**: ``XYSpacing`` (``"[row, column]"``, DICOM Pixel Spacing order; NIfTI axes
  0 and 1) and ``ZSpacing`` (axis 2) from ``metadata.csv`` replace the header's: the
  headers of the public NIfTI files are not always right. The header still gives the
  axis directions and the origin; the volume is then reoriented to our convention with
  :func:`~model.datasets.sample.canonical_axes`.
* **Report**: ``Findings_EN`` then ``Impressions_EN`` (non-empty parts joined by a space).
* **Presence** from the 18 report-derived labels, mapped to the ten UniCT abnormalities
  where CT-RATE has a matching column (:data:`CTRATE_TO_LABEL`); the others are
  *unknown* (``Sample.present_known`` False), never "absent":

  ===================================  ====================================================
  UniCT label (code)                   from the CT-RATE labels
  ===================================  ====================================================
  bronchial wall thickening (1a)       Peribronchial thickening
  bronchiectasis (1b)                  Bronchiectasis
  emphysema (1c)                       Emphysema
  septal thickening (1d)               Interlobular septal thickening
  micronodules (1e)                    unknown (CT-RATE has no micronodule label)
  linear opacities (2a)                unknown (spread over Atelectasis and Pulmonary
                                       fibrotic sequela, which also cover other findings)
  atelectasis / consolidation (2b)     Consolidation; if only Atelectasis is positive,
                                       unknown (it may be subsegmental, i.e. 2a)
  ground-glass opacity (2c)            Lung opacity (approximate: CT-RATE's opacity is
                                       broader than ground glass)
  pulmonary nodule / mass (2d)         Lung nodule (approximate: may include micronodules)
  pleural effusion / thickening (2e)   Pleural effusion
  ===================================  ====================================================

  :func:`ctrate_labels` is the converse used by the phantom writer
  (:mod:`model.phantom.layouts`).
"""

from __future__ import annotations

import ast
import csv
import logging
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt

from model.datasets.sample import LPS_TO_RAS, Affine, FloatArray, Sample, canonical_axes
from model.labels import LABEL_KEYS, NUM_LABELS

logger = logging.getLogger(__name__)

#: The 18 multi-abnormality label columns of CT-RATE, in the release's order.
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: Columns of ``{train,validation}_metadata.csv``, in the release's order.
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex",
    "PatientAge", "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient",
    "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent",
    "Exposure", "FilterType", "GeneratorPower", "FocalSpots", "ConvolutionKernel",
    "PatientPosition", "RevolutionTime", "SingleCollimationWidth", "TotalCollimationWidth",
    "TableSpeed", "TableFeedPerRotation", "SpiralPitchFactor", "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol",
    "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel",
    "PhotometricInterpretation", "Rows", "Columns", "XYSpacing", "RescaleIntercept",
    "RescaleSlope", "RescaleType", "NumberofSlices", "ZSpacing", "StudyDate",
)  # fmt: skip

#: Columns of ``{train,validation}_reports.csv``.
REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)

#: CT-RATE split -> (metadata/reports file stem, labels file stem).
_TABLE_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train", "train"),
    "valid": ("validation", "valid"),
}
SPLITS: tuple[str, ...] = tuple(_TABLE_STEMS)

#: ``split_patient_scan_reconstruction.nii.gz``, e.g. ``valid_53_a_1.nii.gz``.
VOLUME_NAME = re.compile(r"^(train|valid)_([1-9][0-9]*)_([a-z]+)_([1-9][0-9]*)\.nii\.gz$")

#: UniCT label key -> the CT-RATE column read as that label (exact or approximate).
CTRATE_TO_LABEL: dict[str, str] = {
    "bronchial_wall_thickening": "Peribronchial thickening",
    "bronchiectasis": "Bronchiectasis",
    "emphysema": "Emphysema",
    "septal_thickening": "Interlobular septal thickening",
    "consolidation": "Consolidation",
    "ground_glass_opacity": "Lung opacity",
    "nodule": "Lung nodule",
    "pleural_effusion": "Pleural effusion",
}
#: Labels with no CT-RATE column: always unknown.
UNMAPPED_LABELS: tuple[str, ...] = ("micronodules", "linear_opacities")


# --------------------------------------------------------------------------- label maps


def _flag(value: str | None) -> bool | None:
    """A label cell as a boolean; ``None`` when blank or not a number."""
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if np.isnan(number):
        return None
    return number >= 0.5


def present_from_ctrate(
    row: Mapping[str, str],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """The ten UniCT labels asserted by one row of CT-RATE's labels CSV.

    Parameters
    ----------
    row
        Column name -> cell text (``csv.DictReader`` row).

    Returns
    -------
    tuple of numpy.ndarray
        ``(present, known)``, both ``(10,)`` bool in label order; ``present`` is False
        wherever ``known`` is False. See the module docstring for the mapping.
    """
    present = np.zeros(NUM_LABELS, dtype=np.bool_)
    known = np.zeros(NUM_LABELS, dtype=np.bool_)
    for key, column in CTRATE_TO_LABEL.items():
        value = _flag(row.get(column))
        index = LABEL_KEYS.index(key)
        if value is None:
            continue
        if key == "consolidation" and not value and _flag(row.get("Atelectasis")):
            continue  # atelectasis alone: 2b or subsegmental (2a); unknown
        present[index], known[index] = value, True
    return present, known


def ctrate_labels(
    present: Sequence[bool] | npt.NDArray[np.bool_], sentences: Mapping[str, str] | None = None
) -> dict[str, int]:
    """CT-RATE's 18 labels for a case with the given UniCT findings (phantom writer).

    Parameters
    ----------
    present
        ``(10,)`` presence in label order.
    sentences
        Label key -> the report sentence describing that finding; ``Atelectasis`` is set
        when the sentence of linear opacities (2a) or consolidation (2b) says
        "atelectasis", as CT-RATE's report-derived labels would.

    Returns
    -------
    dict
        Each of :data:`CTRATE_LABELS` -> 0 or 1: a column is 1 when one of its UniCT
        sources is present (the columns of :data:`CTRATE_TO_LABEL`, plus ``Pulmonary
        fibrotic sequela`` from linear opacities); the others (cardiovascular,
        mediastinal, medical material, mosaic attenuation) are 0.
    """
    flags = {key: bool(present[i]) for i, key in enumerate(LABEL_KEYS)}
    out = dict.fromkeys(CTRATE_LABELS, 0)
    for key, column in CTRATE_TO_LABEL.items():
        if flags[key]:
            out[column] = 1
    if flags["linear_opacities"]:
        out["Pulmonary fibrotic sequela"] = 1
    for key in ("linear_opacities", "consolidation"):
        if flags[key] and "atelectasis" in (sentences or {}).get(key, "").lower():
            out["Atelectasis"] = 1
    return out


# --------------------------------------------------------------------------- geometry


def parse_xy_spacing(text: str) -> tuple[float, float]:
    """``XYSpacing`` (``"[0.75, 0.75]"``, or one number) as ``(row, column)`` mm."""
    value = ast.literal_eval(text.strip())
    if isinstance(value, (int, float)):
        return float(value), float(value)
    items = [float(v) for v in value]
    if len(items) == 1:
        return items[0], items[0]
    if len(items) != 2:
        raise ValueError(f"XYSpacing {text!r} is not [row, column]")
    return items[0], items[1]


def nifti_affine_ras(affine_lps: Affine) -> Affine:
    """NIfTI affine of a volume of ours written as ``(H, W, D)`` (CT-RATE's axis order).

    Parameters
    ----------
    affine_lps
        4x4 voxel ``(d, h, w)`` -> LPS of the ``(D, H, W)`` array.

    Returns
    -------
    numpy.ndarray
        4x4 voxel ``(h, w, d)`` -> RAS of ``array.transpose(1, 2, 0)``.
    """
    to_ours = np.array(
        [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    out: Affine = LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64) @ to_ours
    return out


def with_spacing(affine_ras: Affine, spacing: Sequence[float]) -> Affine:
    """The affine with the length of each voxel axis replaced by ``spacing`` (mm).

    Directions and origin are kept; an axis of zero length takes the NIfTI default
    direction (the identity's).
    """
    out = np.array(affine_ras, dtype=np.float64)
    for axis in range(3):
        column = out[:3, axis]
        norm = float(np.linalg.norm(column))
        direction = column / norm if norm > 0 else np.eye(3)[axis]
        out[:3, axis] = direction * float(spacing[axis])
    return out


def load_ctrate_volume(path: Path, metadata: Mapping[str, str] | None) -> tuple[FloatArray, Affine]:
    """A CT-RATE NIfTI in Hounsfield units, on its stored axes.

    Parameters
    ----------
    path
        The ``.nii.gz`` file.
    metadata
        Its ``metadata.csv`` row, or ``None`` to take the stored values as HU and the
        header's spacing as right.

    Returns
    -------
    tuple
        ``(hu, affine_ras)``: float32 array on the file's axes and its voxel -> RAS
        affine, with the spacing of ``metadata`` when given.
    """
    image = nib.load(str(path))
    hu = np.asarray(image.get_fdata(dtype=np.float32), dtype=np.float32)  # type: ignore[attr-defined]
    if hu.ndim == 4 and hu.shape[3] == 1:
        hu = hu[..., 0]
    if hu.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {hu.shape}")
    affine = np.asarray(image.affine, dtype=np.float64)  # type: ignore[attr-defined]
    if metadata is None:
        return hu, affine
    slope = float(metadata.get("RescaleSlope") or 1.0)
    intercept = float(metadata.get("RescaleIntercept") or 0.0)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    row_mm, col_mm = parse_xy_spacing(metadata["XYSpacing"])
    spacing = (row_mm, col_mm, float(metadata["ZSpacing"]))
    header = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(header, spacing, rtol=1e-3):
        logger.debug("%s: header spacing %s replaced by metadata %s", path.name, header, spacing)
    return hu, with_spacing(affine, spacing)


def read_ctrate_volume(path: Path, metadata: Mapping[str, str] | None) -> tuple[FloatArray, Affine]:
    """:func:`load_ctrate_volume`, reoriented to our ``(D, H, W)`` convention with an LPS affine."""
    hu, affine_ras = load_ctrate_volume(path, metadata)
    (hu,), affine_lps = canonical_axes((hu,), affine_ras)
    return hu, affine_lps


# --------------------------------------------------------------------------- tables


def dataset_dir(root: Path) -> Path:
    """The ``dataset/`` folder of a CT-RATE tree (``root`` itself when it is that folder)."""
    root = Path(root)
    return root / "dataset" if (root / "dataset").is_dir() else root


def table_paths(root: Path, split: str) -> dict[str, Path]:
    """Paths of the metadata, reports, labels and no-chest files of a split."""
    if split not in _TABLE_STEMS:
        raise ValueError(f"CT-RATE split must be one of {', '.join(SPLITS)}, got {split!r}")
    base = dataset_dir(root)
    stem, label_stem = _TABLE_STEMS[split]
    return {
        "metadata": base / "metadata" / f"{stem}_metadata.csv",
        "reports": base / "radiology_text_reports" / f"{stem}_reports.csv",
        "labels": base / "multi_abnormality_labels" / f"{label_stem}_predicted_labels.csv",
        "no_chest": base / "metadata" / f"no_chest_{split}.txt",
    }


def read_table(path: Path) -> dict[str, dict[str, str]]:
    """A CT-RATE CSV as ``VolumeName`` -> row; empty when the file does not exist."""
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        rows = {}
        for row in csv.DictReader(handle):
            name = (row.get("VolumeName") or "").strip()
            if name:
                rows[name] = {k: (v or "") for k, v in row.items() if k is not None}
        return rows


@dataclass
class CtRateTables:
    """The tables of one or more CT-RATE splits, keyed by ``VolumeName``."""

    metadata: dict[str, dict[str, str]] = field(default_factory=dict)
    reports: dict[str, dict[str, str]] = field(default_factory=dict)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    no_chest: set[str] = field(default_factory=set)

    def update(self, other: CtRateTables) -> None:
        """Add another split's rows."""
        self.metadata.update(other.metadata)
        self.reports.update(other.reports)
        self.labels.update(other.labels)
        self.no_chest |= other.no_chest


def load_tables(root: Path, splits: Sequence[str] = SPLITS) -> CtRateTables:
    """Read the tables of ``splits`` under a CT-RATE tree (missing files give no rows)."""
    tables = CtRateTables()
    for split in splits:
        paths = table_paths(root, split)
        no_chest = set()
        if paths["no_chest"].is_file():
            no_chest = {
                line.strip() for line in paths["no_chest"].read_text().splitlines() if line.strip()
            }
        tables.update(
            CtRateTables(
                metadata=read_table(paths["metadata"]),
                reports=read_table(paths["reports"]),
                labels=read_table(paths["labels"]),
                no_chest=no_chest,
            )
        )
    return tables


def report_text(row: Mapping[str, str] | None) -> str:
    """``Findings_EN`` then ``Impressions_EN``, the non-empty ones joined by a space."""
    if row is None:
        return ""
    parts = [(row.get(col) or "").strip() for col in ("Findings_EN", "Impressions_EN")]
    return " ".join(p for p in parts if p and p.lower() != "nan")


def _name_key(path: Path) -> tuple[int, str, int, str, int, str]:
    match = VOLUME_NAME.match(path.name)
    if match is None:
        return (1, "", 0, "", 0, path.name)
    split, patient, scan, recon = match.groups()
    return (0, split, int(patient), scan, int(recon), path.name)


def volume_paths(root: Path, split: str, *, fixed: bool = False) -> list[Path]:
    """The volumes of a split on disk, in (patient, scan, reconstruction) order."""
    folder = dataset_dir(root) / (f"{split}_fixed" if fixed else split)
    if not folder.is_dir():
        return []
    found = [p for p in folder.rglob("*.nii.gz") if VOLUME_NAME.match(p.name)]
    return sorted(found, key=_name_key)


# --------------------------------------------------------------------------- reader


def read_ctrate(
    root: Path,
    split: str | None = None,
    *,
    fixed: bool = False,
    names: Collection[str] | None = None,
    skip_no_chest: bool = True,
) -> Iterator[Sample]:
    """Read CT-RATE volumes with their reports and labels.

    Parameters
    ----------
    root
        The CT-RATE tree (the repository folder or its ``dataset/`` folder).
    split
        ``"train"`` or ``"valid"``; both when ``None``.
    fixed
        Read the ``{split}_fixed/`` volumes instead of ``{split}/``.
    names
        Only these ``VolumeName`` values.
    skip_no_chest
        Skip the volumes listed in ``metadata/no_chest_{split}.txt``.

    Yields
    ------
    Sample
        One per volume found on disk, without masks; ``present``/``present_known`` from
        the labels CSV (``None`` when the volume has no row), ``report`` from the reports
        CSV. See the module docstring for the conventions.

    Raises
    ------
    KeyError
        If a volume has no ``metadata.csv`` row (its rescale and spacing are unknown).
    """
    splits = SPLITS if split is None else (split,)
    tables = load_tables(root, splits)
    wanted = None if names is None else set(names)
    for name_split in splits:
        for path in volume_paths(root, name_split, fixed=fixed):
            name = path.name
            if (wanted is not None and name not in wanted) or (
                skip_no_chest and name in tables.no_chest
            ):
                continue
            meta = tables.metadata.get(name)
            if meta is None:
                raise KeyError(
                    f"{name}: no row in the {name_split} metadata.csv (rescale and spacing unknown)"
                )
            hu, affine_lps = read_ctrate_volume(path, meta)
            label_row = tables.labels.get(name)
            present = known = None
            if label_row is not None:
                present, known = present_from_ctrate(label_row)
            yield Sample(
                name=name,
                hu=hu,
                affine_lps=affine_lps,
                masks=None,
                present=present,
                report=report_text(tables.reports.get(name)),
                present_known=known,
            )
