"""ReXGroundingCT: findings with 3D masks on CT-RATE volumes, read as :class:`Sample`.

ReXGroundingCT (``rajpurkarlab/ReXGroundingCT``) describes each scan by one JSON entry::

    {"name": "train_1741_b_2.nii.gz",
     "findings": {"0": "Irregularly circumscribed nodular consolidation ..."},
     "categories": {"0": "2b"},
     "shape": [H, W, D], ...}

The release gathers the entries in ``dataset.json`` as ``{"train": [...], "val": [...],
"test": [...]}``; this reader also accepts a JSON list of entries, a single entry, or a
folder of per-scan JSON files. Each scan with findings has a mask NIfTI named like the
scan, of shape ``(F, H, W, D)``: one channel per finding (channel ``i`` is finding
``"i"``), non-zero values labelling its entities (connected lesions 1..k), identity
affine, on the voxel grid of the CT volume. The CT volumes are CT-RATE's, found by file
name (flat or in CT-RATE's ``{split}/{split}_{p}/{split}_{p}_{s}/`` tree), with
rescale and spacing from CT-RATE's ``metadata.csv`` (:mod:`model.datasets.ctrate`).

Mapping to the ten UniCT labels (:data:`model.labels.DEFAULT_LABELS`, codes 1a-1e and
2a-2e): each finding counts for the label of its category code; codes outside the ten
(``1f`` other non-focal, ``2f`` honeycombing, ``2g`` pneumothorax, ``2h`` other focal)
are ignored. A label is present when one finding has its code; its mask is the union of
those findings' channels (the training split annotates up to three representative
entities per finding, so masks can be partial). The report is the findings' sentences in
index order, or "No abnormalities detected." for a scan without findings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from model.datasets.ctrate import CtRateTables, load_ctrate_volume, load_tables, read_table
from model.datasets.sample import Sample, canonical_axes
from model.labels import DEFAULT_LABELS, NUM_LABELS
from model.phantom.reports import NO_ABNORMALITY

logger = logging.getLogger(__name__)

#: The JSON file of the release.
DATASET_JSON = "dataset.json"
#: ReXGroundingCT category code -> index of the UniCT label.
CODE_TO_INDEX: dict[str, int] = {a.code: i for i, a in enumerate(DEFAULT_LABELS)}
#: The release's 14 category codes; the four outside the UniCT labels are ignored.
ALL_CODES: tuple[str, ...] = tuple(
    f"{group}{letter}"
    for group, letters in (("1", "abcdef"), ("2", "abcdefgh"))
    for letter in letters
)

Entry = dict[str, Any]


def _entries_of(data: Any, origin: str, splits: Collection[str] | None) -> list[tuple[str, Entry]]:
    if isinstance(data, dict) and "name" in data:
        return [("", data)]
    if isinstance(data, list):
        return [("", e) for e in data if isinstance(e, dict) and "name" in e]
    if isinstance(data, dict):
        out: list[tuple[str, Entry]] = []
        for split, items in data.items():
            if isinstance(items, list) and (splits is None or split in splits):
                out.extend((split, e) for e in items if isinstance(e, dict) and "name" in e)
        return out
    raise ValueError(f"{origin}: not a ReXGroundingCT JSON (entry, list or split mapping)")


def load_entries(source: Path, splits: Collection[str] | None = None) -> list[tuple[str, Entry]]:
    """The scan entries of a JSON file or folder, with the split each came from.

    Parameters
    ----------
    source
        ``dataset.json`` (or any JSON file of entries), or a folder holding
        ``dataset.json`` or per-scan JSON files.
    splits
        Keep only these split keys of a ``{"train": [...], "val": [...]}`` file
        (entries of lists or single-entry files have split ``""`` and are always kept).
    """
    source = Path(source)
    if source.is_dir():
        files = (
            [source / DATASET_JSON]
            if (source / DATASET_JSON).is_file()
            else sorted(source.glob("*.json"))
        )
    else:
        files = [source]
    entries: list[tuple[str, Entry]] = []
    for path in files:
        entries.extend(_entries_of(json.loads(path.read_text(encoding="utf-8")), str(path), splits))
    return entries


class _FileIndex:
    """File name -> path under a folder (its direct files first, then any depth)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._deep: dict[str, Path] | None = None

    def find(self, name: str, subfolders: Sequence[str] = ()) -> Path | None:
        for candidate in (self.folder / name, *(self.folder / sub / name for sub in subfolders)):
            if candidate.is_file():
                return candidate
        if self._deep is None:
            self._deep = {}
            if self.folder.is_dir():
                for path in sorted(self.folder.rglob("*.nii*")):
                    self._deep.setdefault(path.name, path)
        return self._deep.get(name)


def _ctrate_subfolders(name: str) -> list[str]:
    """Where CT-RATE keeps ``train_12_a_1.nii.gz``: ``dataset/train/train_12/train_12_a``."""
    parts = name.split("_")
    if len(parts) < 4:
        return []
    split, patient, scan = parts[0], parts[1], parts[2]
    nested = f"{split}/{split}_{patient}/{split}_{patient}_{scan}"
    return [nested, f"dataset/{nested}"]


def _channel_keys(findings: Mapping[str, Any], categories: Mapping[str, Any]) -> list[str]:
    keys = set(findings) | set(categories)

    def order(key: str) -> tuple[int, int | str]:
        return (0, int(key)) if key.strip().lstrip("-").isdigit() else (1, key)

    return sorted(keys, key=order)


def _metadata_tables(metadata: Path | None, volume_dir: Path) -> CtRateTables:
    if metadata is None:
        return load_tables(volume_dir)
    metadata = Path(metadata)
    if metadata.is_file():
        return CtRateTables(metadata=read_table(metadata))
    return load_tables(metadata)


def read_rexgroundingct(
    source: Path,
    volume_dir: Path | None = None,
    mask_dir: Path | None = None,
    *,
    metadata: Path | None = None,
    splits: Collection[str] | None = None,
    names: Collection[str] | None = None,
) -> Iterator[Sample]:
    """Read ReXGroundingCT scans with their masks, presence and findings text.

    Parameters
    ----------
    source
        ``dataset.json``, another JSON file of entries, or a folder with them (see
        :func:`load_entries`).
    volume_dir
        Where the CT-RATE volumes are (flat, or CT-RATE's tree); default: ``ct_rate/``
        beside the JSON when it exists, else the JSON's folder.
    mask_dir
        Where the mask NIfTI files are (flat or one folder per split); default:
        ``segmentations/`` beside the JSON when it exists, else the JSON's folder.
    metadata
        A CT-RATE ``metadata.csv`` or CT-RATE tree giving rescale and spacing; default:
        the tables under ``volume_dir``. A volume without a metadata row is taken as
        Hounsfield units with the header's geometry.
    splits
        Split keys of ``dataset.json`` to read (e.g. ``{"train"}``); all when ``None``.
    names
        Only these scan names.

    Yields
    ------
    Sample
        Masks ``(10, D, H, W)`` (the union of each label's finding channels; all zero
        for a scan without findings; ``None`` when a scan's mask file is missing),
        ``present`` from the categories (every entry known), ``report`` the findings.

    Raises
    ------
    FileNotFoundError
        If a scan's CT volume cannot be found.
    ValueError
        If a mask is not on the CT volume's grid.
    """
    source = Path(source)
    root = source if source.is_dir() else source.parent
    if volume_dir is None:
        volume_dir = root / "ct_rate" if (root / "ct_rate").is_dir() else root
    if mask_dir is None:
        mask_dir = root / "segmentations" if (root / "segmentations").is_dir() else root
    tables = _metadata_tables(metadata, Path(volume_dir))
    volumes, masks_index = _FileIndex(Path(volume_dir)), _FileIndex(Path(mask_dir))
    wanted = None if names is None else set(names)
    for split, entry in load_entries(source, splits):
        name = str(entry["name"])
        if wanted is not None and name not in wanted:
            continue
        volume_path = volumes.find(name, _ctrate_subfolders(name))
        if volume_path is None:
            raise FileNotFoundError(f"{name}: CT volume not found under {volume_dir}")
        meta = tables.metadata.get(name)
        if meta is None:
            logger.warning("%s: no CT-RATE metadata row; values taken as HU, header geometry", name)
        hu, affine_ras = load_ctrate_volume(volume_path, meta)
        shape = entry.get("shape")
        if shape is not None and tuple(int(s) for s in shape) != hu.shape:
            raise ValueError(
                f"{name}: JSON shape {list(shape)} differs from the CT volume's {list(hu.shape)}"
            )
        findings: Mapping[str, Any] = entry.get("findings") or {}
        categories: Mapping[str, Any] = entry.get("categories") or {}
        keys = _channel_keys(findings, categories)
        present = np.zeros(NUM_LABELS, dtype=np.bool_)
        masks: npt.NDArray[np.uint8] | None = np.zeros((NUM_LABELS, *hu.shape), dtype=np.uint8)
        channels = None
        if keys:
            mask_path = masks_index.find(name, [split] if split else [])
            if mask_path is None:
                logger.warning("%s: mask file not found under %s; masks left out", name, mask_dir)
                masks = None
            else:
                channels = np.asanyarray(nib.load(str(mask_path)).dataobj)  # type: ignore[attr-defined]
                if channels.ndim == 3:
                    channels = channels[None]
                if channels.ndim != 4 or channels.shape[1:] != hu.shape:
                    raise ValueError(
                        f"{name}: mask shape {channels.shape} is not (F, {', '.join(map(str, hu.shape))})"
                    )
        direct = all(
            k.isdigit() and int(k) < (len(channels) if channels is not None else 0) for k in keys
        )
        for position, key in enumerate(keys):
            code = str(categories.get(key, "")).strip().lower()
            index = CODE_TO_INDEX.get(code)
            if index is None:
                continue
            present[index] = True
            if masks is not None and channels is not None:
                channel = int(key) if direct else position
                if channel < len(channels):
                    masks[index] |= (channels[channel] != 0).astype(np.uint8)
        texts = [str(findings[k]).strip() for k in keys if str(findings.get(k, "")).strip()]
        arrays: tuple[npt.NDArray[Any], ...] = (hu,) if masks is None else (hu, masks)
        oriented, affine_lps = canonical_axes(arrays, affine_ras)
        yield Sample(
            name=name,
            hu=oriented[0],
            affine_lps=affine_lps,
            masks=None if masks is None else oriented[1],
            present=present,
            report=" ".join(texts) if texts else NO_ABNORMALITY,
        )
