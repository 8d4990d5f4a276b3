"""Patient-level splits of a dataset, the paper's protocol: 5 folds of 70/15/15.

Every scan of one patient lands in the same part (CT-RATE and ReXGroundingCT name a
scan ``{split}_{patient}_{scan}_{reconstruction}``; a patient is ``{split}_{patient}``),
so no patient is seen in training and tested. The patients are shuffled once with
``seed``; fold ``k`` starts the order ``k / folds`` of the way in and takes the first 15 %
as test, the next 15 % as validation and the rest as training, so the test parts of the
five folds are disjoint. The split is deterministic in (names, fold, folds, seed) and is
written beside the run (:meth:`FoldSplit.save`), so a resumed run and the evaluation use
the very same one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: File name of the split beside a run (and in an exported bundle).
SPLIT_FILE = "split.json"
#: Folds of the protocol.
FOLDS = 5
#: Train, validation, test fractions of the patients.
FRACTIONS = (0.70, 0.15, 0.15)

_CTRATE_NAME = re.compile(r"^(train|valid)_([0-9]+)_[a-z]+_[0-9]+(?:\.nii(?:\.gz)?)?$")


def patient_of(name: str) -> str:
    """The patient of a scan name: ``{split}_{patient}`` for CT-RATE / ReXGroundingCT
    names, else the name itself (RAD-ChestCT releases one scan per accession and no
    patient key)."""
    match = _CTRATE_NAME.match(name)
    if match is None:
        return name
    return f"{match.group(1)}_{match.group(2)}"


@dataclass(frozen=True)
class FoldSplit:
    """One fold's scan names per part, and how it was drawn."""

    dataset: str
    fold: int
    folds: int
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def part(self, name: str) -> tuple[str, ...]:
        """The names of part ``name`` (``train``, ``val``, ``test``; ``all``: every one)."""
        if name == "all":
            return self.train + self.val + self.test
        if name not in ("train", "val", "test"):
            raise ValueError(f"split part must be train, val, test or all, got {name!r}")
        parts: dict[str, tuple[str, ...]] = {
            "train": self.train,
            "val": self.val,
            "test": self.test,
        }
        return parts[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the patient counts of each part."""
        out = asdict(self)
        out["patients"] = {
            part: len({patient_of(n) for n in getattr(self, part)})
            for part in ("train", "val", "test")
        }
        return out

    def save(self, path: Path) -> Path:
        """Write the split as JSON (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> FoldSplit:
        """Read a split written by :meth:`save`."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            dataset=str(data["dataset"]),
            fold=int(data["fold"]),
            folds=int(data["folds"]),
            seed=int(data["seed"]),
            train=tuple(data["train"]),
            val=tuple(data["val"]),
            test=tuple(data["test"]),
        )


def patient_split(
    names: Iterable[str],
    fold: int,
    *,
    dataset: str = "",
    folds: int = FOLDS,
    seed: int = 0,
    fractions: tuple[float, float, float] = FRACTIONS,
) -> FoldSplit:
    """Fold ``fold`` of a patient-level ``folds``-fold split of ``names``.

    Parameters
    ----------
    names
        Scan names (duplicates are ignored).
    fold
        ``0 .. folds - 1``.
    dataset
        Recorded in the split (e.g. ``"rexgroundingct"``).
    folds, seed, fractions
        The protocol (module docstring).

    Raises
    ------
    ValueError
        If ``fold`` is out of range or there are fewer than 3 patients (one per part).
    """
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    unique = sorted(set(names))
    patients = sorted({patient_of(n) for n in unique})
    if len(patients) < 3:
        raise ValueError(
            f"a train/validation/test split needs at least 3 patients, got {len(patients)}"
        )
    order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
    start = round(fold * len(order) / folds)
    order = order[start:] + order[:start]
    n_test = max(1, round(fractions[2] * len(order)))
    n_val = max(1, round(fractions[1] * len(order)))
    if n_test + n_val >= len(order):
        n_test = n_val = 1
    test_p, val_p = set(order[:n_test]), set(order[n_test : n_test + n_val])
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for name in unique:
        p = patient_of(name)
        parts["test" if p in test_p else "val" if p in val_p else "train"].append(name)
    return FoldSplit(
        dataset=dataset,
        fold=fold,
        folds=folds,
        seed=seed,
        train=tuple(parts["train"]),
        val=tuple(parts["val"]),
        test=tuple(parts["test"]),
    )
