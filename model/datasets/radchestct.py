"""RAD-ChestCT: ``.npz`` volumes and abnormality x location labels, read as :class:`Sample`.

RAD-ChestCT (Draelos et al. 2021) ships one compressed NumPy file per scan, named by its
``NoteAcc_DEID`` (``trn00001.npz``, ``val...``, ``tst...``), whose single array (key
``ct`` in the preprocessing code, ``arr_0`` when saved positionally; both are read) is an
int16 volume in Hounsfield units clipped to [-1000, 1000], resampled to 0.8 mm isotropic
and stored **axial first**: ``(slices, rows, columns)`` with slices from superior to
inferior (the preprocessing sorts slice positions in decreasing order), rows anterior
to posterior and columns right to left (only Image Orientation (Patient)
``[1, 0, 0, 0, 1, 0]`` was accepted). The files carry no position: the reader centres
the volume on the origin. There are no masks and the reports are not public.

Labels: ``img{train,valid,test}_Abnormality_and_Location_Labels.csv`` with
``NoteAcc_DEID`` and one 0/1 column per ``abnormality*location`` (84 x 52). An
abnormality is positive when any of its locations is. Mapping to the ten UniCT labels
(abnormality names as in the release; a name missing from the CSV leaves its label
unknown):

======================================  ==============================================
UniCT label (code)                      RAD-ChestCT abnormalities
======================================  ==============================================
bronchial wall thickening (1a)          bronchial_wall_thickening
bronchiectasis (1b)                     bronchiectasis
emphysema (1c)                          emphysema
septal thickening / reticulation (1d)   septal_thickening, reticulation
micronodules (1e)                       unknown: RAD-ChestCT's nodule labels include
                                        them; UniCT evaluates on RAD-ChestCT with
                                        nodules and micronodules merged
linear opacities (2a)                   bandlike_or_linear, scarring (approximate)
atelectasis / consolidation (2b)        consolidation; atelectasis alone -> unknown
ground-glass opacity (2c)               groundglass
pulmonary nodule / mass (2d)            nodule, nodulegr1cm, mass
pleural effusion / thickening (2e)      pleural_effusion, pleural_thickening
======================================  ==============================================
"""

from __future__ import annotations

import csv
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from model.datasets.sample import Affine, Sample
from model.labels import LABEL_KEYS, NUM_LABELS

#: Isotropic spacing (mm) of the released volumes.
SPACING_MM = 0.8
#: RAD-ChestCT split -> (file name prefix, labels CSV).
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("trn", "imgtrain_Abnormality_and_Location_Labels.csv"),
    "valid": ("val", "imgvalid_Abnormality_and_Location_Labels.csv"),
    "test": ("tst", "imgtest_Abnormality_and_Location_Labels.csv"),
}
#: UniCT label key -> RAD-ChestCT abnormalities counted for it.
RADCHESTCT_TO_LABEL: dict[str, tuple[str, ...]] = {
    "bronchial_wall_thickening": ("bronchial_wall_thickening",),
    "bronchiectasis": ("bronchiectasis",),
    "emphysema": ("emphysema",),
    "septal_thickening": ("septal_thickening", "reticulation"),
    "linear_opacities": ("bandlike_or_linear", "scarring"),
    "consolidation": ("consolidation",),
    "ground_glass_opacity": ("groundglass",),
    "nodule": ("nodule", "nodulegr1cm", "mass"),
    "pleural_effusion": ("pleural_effusion", "pleural_thickening"),
}
_NOTE = re.compile(r"^(trn|val|tst)\w*$")


def abnormality_flags(row: Mapping[str, str]) -> dict[str, bool]:
    """Abnormality -> positive anywhere, from one ``abnormality*location`` row."""
    flags: dict[str, bool] = {}
    for column, value in row.items():
        if column is None or "*" not in column:
            continue
        name = column.split("*", 1)[0].strip()
        try:
            positive = float(value) >= 0.5 if value and value.strip() else False
        except ValueError:
            positive = False
        flags[name] = flags.get(name, False) or positive
    return flags


def present_from_radchestct(
    flags: Mapping[str, bool],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """``(present, known)`` of the ten labels from abnormality flags (module docstring)."""
    present = np.zeros(NUM_LABELS, dtype=np.bool_)
    known = np.zeros(NUM_LABELS, dtype=np.bool_)
    for key, names in RADCHESTCT_TO_LABEL.items():
        available = [n for n in names if n in flags]
        if not available:
            continue
        index = LABEL_KEYS.index(key)
        value = any(flags[n] for n in available)
        if key == "consolidation" and not value and flags.get("atelectasis", False):
            continue
        present[index], known[index] = value, True
    return present, known


def radchestct_affine(shape: Sequence[int], spacing_mm: Sequence[float]) -> Affine:
    """LPS affine of a volume in our convention, centred on the origin."""
    affine = np.zeros((4, 4), dtype=np.float64)
    affine[2, 0], affine[1, 1], affine[0, 2] = spacing_mm  # axis 0 +S, 1 +P, 2 +L
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    affine[3, 3] = 1.0
    return affine


def load_npz_volume(path: Path) -> npt.NDArray[np.generic]:
    """The volume array of a RAD-ChestCT ``.npz`` (key ``ct``, ``arr_0``, or the only one)."""
    with np.load(path) as archive:
        for key in ("ct", "arr_0"):
            if key in archive.files:
                return np.asarray(archive[key])
        if len(archive.files) == 1:
            return np.asarray(archive[archive.files[0]])
    raise KeyError(f"{path}: no 'ct' or 'arr_0' array")


def _read_labels(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            (row.get("NoteAcc_DEID") or "").strip(): {
                k: (v or "") for k, v in row.items() if k is not None
            }
            for row in csv.DictReader(handle)
        }


def read_radchestct(
    root: Path,
    split: str | None = None,
    *,
    labels_dir: Path | None = None,
    spacing_mm: Sequence[float] = (SPACING_MM, SPACING_MM, SPACING_MM),
    names: Collection[str] | None = None,
) -> Iterator[Sample]:
    """Read RAD-ChestCT volumes with their abnormality labels.

    Parameters
    ----------
    root
        Folder holding the ``.npz`` files (searched at any depth).
    split
        ``"train"``, ``"valid"`` or ``"test"`` (by file prefix); all when ``None``.
    labels_dir
        Folder of the labels CSVs; default ``root``.
    spacing_mm
        ``(slice, row, column)`` spacing of the stored arrays.
    names
        Only these ``NoteAcc_DEID`` values.

    Yields
    ------
    Sample
        HU float32 in our convention (slices flipped to inferior -> superior), no masks,
        ``present``/``present_known`` from the labels (``None`` without a labels row),
        empty report.
    """
    root = Path(root)
    labels_dir = root if labels_dir is None else Path(labels_dir)
    splits = tuple(SPLIT_FILES) if split is None else (split,)
    if any(s not in SPLIT_FILES for s in splits):
        raise ValueError(
            f"RAD-ChestCT split must be one of {', '.join(SPLIT_FILES)}, got {split!r}"
        )
    labels: dict[str, dict[str, str]] = {}
    for s in splits:
        labels.update(_read_labels(labels_dir / SPLIT_FILES[s][1]))
    prefixes = tuple(SPLIT_FILES[s][0] for s in splits)
    wanted = None if names is None else set(names)
    paths = sorted(
        p for p in root.rglob("*.npz") if _NOTE.match(p.stem) and p.stem.startswith(prefixes)
    )
    for path in paths:
        name = path.stem
        if wanted is not None and name not in wanted:
            continue
        volume = load_npz_volume(path)
        if volume.ndim != 3:
            raise ValueError(f"{path}: expected (slices, rows, columns), got shape {volume.shape}")
        hu = np.ascontiguousarray(volume[::-1], dtype=np.float32)
        present = known = None
        if name in labels:
            present, known = present_from_radchestct(abnormality_flags(labels[name]))
        yield Sample(
            name=name,
            hu=hu,
            affine_lps=radchestct_affine(hu.shape, spacing_mm),
            masks=None,
            present=present,
            report="",
            present_known=known,
        )
