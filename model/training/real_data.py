"""The public datasets as training and evaluation cases: ``--data KIND:DIR``.

``rexgroundingct:DIR`` (masks, presence of the ten labels, findings text),
``ctrate:DIR`` (reports and the labels CT-RATE can assert; no masks) and
``radchestct:DIR`` (labels only; the external test set) are read with
:mod:`model.datasets`, brought onto the model grid by the same
:func:`model.transforms.preprocess` as phantoms and the node, and cached as ``.npz``
files in the format of :mod:`model.training.data`, plus what real data needs beside it:
which labels the source asserts (``known``) and whether it has masks (``has_masks``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import PreprocessConfig
from model.datasets.ctrate import SPLITS as CTRATE_SPLITS
from model.datasets.ctrate import load_tables, volume_paths
from model.datasets.radchestct import SPLIT_FILES as RADCHESTCT_SPLITS
from model.datasets.sample import Sample
from model.datasets.splits import FOLDS, FoldSplit, patient_split
from model.labels import NUM_LABELS

logger = logging.getLogger(__name__)

#: Dataset kinds ``--data`` takes.
KINDS = ("rexgroundingct", "ctrate", "radchestct")
#: Kinds a model can train on (RAD-ChestCT is the external test set: labels only).
TRAINABLE_KINDS = ("rexgroundingct", "ctrate")


@dataclass(frozen=True)
class DataSpec:
    """One ``--data KIND:DIR``."""

    kind: str
    root: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.root}"


def parse_data_spec(text: str) -> DataSpec:
    """``"rexgroundingct:/data/rex"`` -> :class:`DataSpec` (for argparse ``type=``)."""
    import argparse

    kind, sep, root = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not root:
        raise argparse.ArgumentTypeError(
            f"expected KIND:DIR with KIND one of {', '.join(KINDS)}, got {text!r}"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: {path} does not exist")
    return DataSpec(kind, path)


def scan_names(spec: DataSpec) -> list[str]:
    """The scan names a dataset holds, without reading any volume (sorted)."""
    if spec.kind == "rexgroundingct":
        from model.datasets.rexgroundingct import load_entries

        return sorted({str(entry["name"]) for _, entry in load_entries(spec.root)})
    if spec.kind == "ctrate":
        tables = load_tables(spec.root, CTRATE_SPLITS)
        return sorted(
            p.name
            for split in CTRATE_SPLITS
            for p in volume_paths(spec.root, split)
            if p.name not in tables.no_chest
        )
    prefixes = tuple(prefix for prefix, _ in RADCHESTCT_SPLITS.values())
    return sorted(
        p.stem for p in spec.root.rglob("*.npz") if p.stem.startswith(prefixes) and p.stem.isalnum()
    )


def read_samples(spec: DataSpec, names: Sequence[str]) -> Iterator[Sample]:
    """The samples of ``names`` (in the reader's order)."""
    from model.datasets import read_ctrate, read_radchestct, read_rexgroundingct

    wanted = set(names)
    if spec.kind == "rexgroundingct":
        yield from read_rexgroundingct(spec.root, names=wanted)
    elif spec.kind == "ctrate":
        yield from read_ctrate(spec.root, names=wanted)
    else:
        yield from read_radchestct(spec.root, names=wanted)


def _cache_name(spec: DataSpec, name: str) -> str:
    digest = hashlib.sha1(str(spec.root.resolve()).encode()).hexdigest()[:8]
    stem = name.removesuffix(".gz").removesuffix(".nii")
    return f"{spec.kind}-{digest}-{stem}.npz"


def save_sample_case(sample: Sample, cfg: PreprocessConfig, path: Path) -> None:
    """Preprocess one sample onto the model grid and write it in the cache format."""
    from model.datasets.sample import to_model_input

    model_input = to_model_input(sample, cfg)
    image = model_input.image
    if model_input.masks is not None:
        masks = model_input.masks >= 0.5
        has_masks = True
    else:
        masks = np.zeros((NUM_LABELS, *image.shape), dtype=bool)
        has_masks = False
    present = sample.present if sample.present is not None else np.zeros(NUM_LABELS, dtype=np.bool_)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        image=image.astype(np.float16),
        masks=np.packbits(masks, axis=None),
        mask_shape=np.array(masks.shape),
        present=np.asarray(present, dtype=bool),
        known=sample.known,
        has_masks=np.array(has_masks),
        report=np.array(sample.report),
        seed=np.array(-1),
        name=np.array(sample.name),
    )
    tmp.replace(path)


def build_real_cache(
    spec: DataSpec, names: Sequence[str], cfg: PreprocessConfig, directory: Path
) -> list[Path]:
    """Cache (or reuse) the cases of ``names``; returns their paths in ``names`` order.

    Raises
    ------
    FileNotFoundError
        If a name is not in the dataset.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / _cache_name(spec, name) for name in names}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing:
        logger.info("preprocessing %d %s scans into %s", len(missing), spec.kind, directory)
        done = set()
        for sample in read_samples(spec, missing):
            save_sample_case(sample, cfg, paths[sample.name])
            done.add(sample.name)
        lost = sorted(set(missing) - done)
        if lost:
            raise FileNotFoundError(
                f"{spec}: {len(lost)} scan(s) of the split not found: {', '.join(lost[:5])}"
            )
    return [paths[name] for name in names]


def save_splits(path: Path, fold: int, splits: Sequence[tuple[DataSpec, FoldSplit]]) -> Path:
    """Write the fold's split of every ``--data`` dataset beside a run (atomically)."""
    payload = {
        "fold": fold,
        "datasets": [{"root": str(spec.root), **split.to_dict()} for spec, split in splits],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load_splits(path: Path) -> dict[str, FoldSplit]:
    """The splits of :func:`save_splits`, by dataset kind."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    out = {}
    for item in data["datasets"]:
        split = FoldSplit(
            dataset=str(item["dataset"]),
            fold=int(item["fold"]),
            folds=int(item["folds"]),
            seed=int(item["seed"]),
            train=tuple(item["train"]),
            val=tuple(item["val"]),
            test=tuple(item["test"]),
        )
        out[split.dataset] = split
    return out


def fold_splits(
    specs: Sequence[DataSpec], fold: int, *, folds: int = FOLDS, seed: int = 0
) -> list[tuple[DataSpec, FoldSplit]]:
    """The patient-level split of fold ``fold`` of each dataset (each split on its own)."""
    kinds = [spec.kind for spec in specs]
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"each dataset kind at most once in --data, got {', '.join(kinds)}")
    return [
        (spec, patient_split(scan_names(spec), fold, dataset=spec.kind, folds=folds, seed=seed))
        for spec in specs
    ]
