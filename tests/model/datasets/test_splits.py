"""Patient-level splits (:mod:`model.datasets.splits`): the paper's 5 folds of 70/15/15."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.datasets.splits import FoldSplit, patient_of, patient_split


def _names(patients: int) -> list[str]:
    """CT-RATE names: two scans of every third patient, two reconstructions of each scan."""
    names = []
    for p in range(1, patients + 1):
        for scan in ("a", "b") if p % 3 == 0 else ("a",):
            names += [f"train_{p}_{scan}_1.nii.gz", f"train_{p}_{scan}_2.nii.gz"]
    return names


def test_patient_of_ctrate_names_and_others() -> None:
    assert patient_of("train_12_b_2.nii.gz") == "train_12"
    assert patient_of("valid_3_a_1") == "valid_3"
    assert patient_of("trn00017") == "trn00017"


def test_parts_are_patient_disjoint_and_70_15_15() -> None:
    names = _names(200)
    split = patient_split(names, 0, dataset="ctrate")
    parts = {part: {patient_of(n) for n in split.part(part)} for part in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert sorted(split.part("all")) == sorted(names)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [140, 30, 30]


def test_five_folds_have_disjoint_test_parts_and_are_deterministic() -> None:
    names = _names(100)
    splits = [patient_split(names, k) for k in range(5)]
    tests = [{patient_of(n) for n in s.test} for s in splits]
    for i in range(5):
        for j in range(i + 1, 5):
            assert not tests[i] & tests[j]
    assert patient_split(names, 3) == splits[3]
    assert patient_split(names, 3, seed=1) != splits[3]


def test_split_round_trips_through_json(tmp_path: Path) -> None:
    split = patient_split(_names(10), 2, dataset="rexgroundingct")
    loaded = FoldSplit.load(split.save(tmp_path / "split.json"))
    assert loaded == split
    assert split.to_dict()["patients"]["test"] == 2


def test_bad_folds_and_too_few_patients_are_refused() -> None:
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.4"):
        patient_split(_names(10), 5)
    with pytest.raises(ValueError, match="at least 3 patients"):
        patient_split(_names(2), 0)
    with pytest.raises(ValueError, match="train, val, test or all"):
        patient_split(_names(10), 0).part("holdout")
