"""``unict-node train --data`` / ``evaluate --data`` end to end on the layouts that
``unict-node generate --format`` writes: patient-level folds, the split beside the run,
a resumed run, mixed phantom training, per-fold evaluation and RAD-ChestCT as the
external set (nodule and micronodules merged). ``--config tiny`` keeps it to seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from model.datasets.radchestct import SPLIT_FILES
from model.datasets.splits import SPLIT_FILE, patient_of
from model.labels import LABEL_KEYS
from model.phantom import generate
from model.training.real_data import load_splits
from service.cli import main

#: Small and quick: one thread, no progress bar, tiny network.
COMMON = ["--config", "tiny", "--threads", "1", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    rex, ctrate = root / "rex", root / "ctrate"
    gen = ["generate", "--cases", "7"]
    assert main([*gen, "--format", "rexgroundingct", "--out", str(rex), "--seed", "0"]) == 0
    assert main([*gen, "--format", "ctrate", "--out", str(ctrate), "--seed", "50"]) == 0
    return {"rex": rex, "ctrate": ctrate, "root": root}


def _log(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _train(data: dict[str, Path], run: Path, *extra: str) -> None:
    argv = [
        "train",
        *COMMON,
        "--data",
        f"rexgroundingct:{data['rex']}",
        "--data",
        f"ctrate:{data['ctrate']}",
        "--run-dir",
        str(run),
        "--cache-dir",
        str(data["root"] / "cache"),
        "--batch-size",
        "2",
        "--warmup",
        "1",
        *extra,
    ]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def runs(data: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for fold in (0, 1):
        run = data["root"] / f"fold{fold}"
        extra = ["--phantom-ratio", "0.5", "--train-seeds", "900:3"] if fold == 1 else []
        _train(data, run, "--fold", str(fold), "--steps", "2", "--checkpoint-every", "1", *extra)
        # Resume the stopped run to step 4 and export its bundle.
        _train(
            data,
            run,
            "--fold",
            str(fold),
            "--steps",
            "4",
            "--checkpoint-every",
            "1",
            "--resume",
            "--export",
            str(run / "bundle"),
            *extra,
        )
        out[f"fold{fold}"] = run
    return out


def test_split_is_written_beside_the_run_by_patient(runs: dict[str, Path]) -> None:
    first = load_splits(runs["fold0"] / SPLIT_FILE)
    second = load_splits(runs["fold1"] / SPLIT_FILE)
    assert set(first) == {"rexgroundingct", "ctrate"}
    for kind, split in first.items():
        assert split.fold == 0 and second[kind].fold == 1
        assert len(split.part("all")) == 7
        train, test = {patient_of(n) for n in split.train}, {patient_of(n) for n in split.test}
        assert split.test and split.val and not train & test
        assert not set(split.test) & set(second[kind].test)  # folds test different patients
    bundle = runs["fold0"] / "bundle"
    assert (bundle / SPLIT_FILE).read_bytes() == (runs["fold0"] / SPLIT_FILE).read_bytes()
    card = json.loads((bundle / "model_card.json").read_text())
    assert "fold 0 of 5" in card["training_data"]
    assert (
        "50%"
        in json.loads((runs["fold1"] / "bundle" / "model_card.json").read_text())["training_data"]
    )


def test_resumed_run_continues_where_it_stopped(runs: dict[str, Path]) -> None:
    for run in runs.values():
        steps = [row["step"] for row in _log(run)]
        assert steps == [2, 4]  # the first run logged its last step, the resumed one step 4
        import torch

        assert torch.load(run / "last.pt", weights_only=False)["step"] == 4


def test_resume_with_another_fold_is_refused(data: dict[str, Path], runs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="same --data and --fold"):
        _train(data, runs["fold0"], "--fold", "2", "--steps", "5", "--resume")


def test_radchestct_cannot_be_trained_on(data: dict[str, Path], tmp_path: Path) -> None:
    rad = tmp_path / "rad"
    rad.mkdir()
    with pytest.raises(ValueError, match="external test set"):
        main(["train", *COMMON, "--data", f"radchestct:{rad}", "--run-dir", str(tmp_path / "r")])


def test_evaluate_per_fold_and_mean_on_the_test_parts(
    data: dict[str, Path], runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "rex.json"
    template = str(data["root"] / "fold{fold}" / "bundle")
    argv = ["evaluate", "--data", f"rexgroundingct:{data['rex']}", "--fold", "0,1"]
    assert main([*argv, "--checkpoint", template, "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["folds"] == [0, 1] and metrics["part"] == "test"
    assert [f["fold"] for f in metrics["per_fold"]] == [0, 1]
    for fold in metrics["per_fold"]:
        split = load_splits(runs[f"fold{fold['fold']}"] / SPLIT_FILE)["rexgroundingct"]
        assert fold["cases"] == len(split.test)
        assert set(fold["per_class"]) == set(LABEL_KEYS)
    assert metrics["cases"] == sum(f["cases"] for f in metrics["per_fold"])
    aurocs = [f["classification"]["macro_average_precision"] for f in metrics["per_fold"]]
    finite = [a for a in aurocs if a is not None and a == a]
    if finite:
        assert metrics["classification"]["macro_average_precision"] == pytest.approx(
            float(np.mean(finite))
        )
    # CT-RATE: no masks, so no Dice; only the labels CT-RATE asserts count.
    out = tmp_path / "ctrate.json"
    argv = ["evaluate", "--data", f"ctrate:{data['ctrate']}", "--fold", "0"]
    assert main([*argv, "--checkpoint", str(runs["fold0"] / "bundle"), "--out", str(out)]) == 0
    ctrate = json.loads(out.read_text())
    assert ctrate["segmentation"]["present_findings"] == 0
    assert ctrate["per_class"]["micronodules"]["known"] == 0


def test_radchestct_external_set_merges_nodules_and_micronodules(
    data: dict[str, Path], runs: dict[str, Path], tmp_path: Path
) -> None:
    rad = tmp_path / "radchestct"
    rad.mkdir()
    rows = []
    for i, seed in enumerate((5, 23, 1)):
        phantom = generate(seed)
        # RAD-ChestCT's arrays: 0.8 mm isotropic, superior slice first, HU clipped to +-1000
        # (a 96 mm cube of the chest keeps the test small).
        zoom = (phantom.grid.slice_spacing / 0.8, *(s / 0.8 for s in phantom.grid.pixel_spacing))
        d, h, w = phantom.hu.shape
        crop = phantom.hu[d // 4 : 3 * d // 4, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
        volume = np.clip(ndimage.zoom(crop, zoom, order=0), -1000, 1000)
        np.savez_compressed(rad / f"tst{i:05d}.npz", volume[::-1].astype(np.int16))
        on = dict(zip(LABEL_KEYS, phantom.present, strict=True))
        rows.append([f"tst{i:05d}", int(on["nodule"] or on["micronodules"]), int(on["emphysema"])])
    with (rad / SPLIT_FILES["test"][1]).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["NoteAcc_DEID", "nodule*lung", "emphysema*lung"])
        writer.writerows(rows)
    out = tmp_path / "rad.json"
    template = str(data["root"] / "fold{fold}" / "bundle")
    argv = ["evaluate", "--data", f"radchestct:{rad}", "--fold", "0,1", "--checkpoint", template]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["part"] == "all" and metrics["merged"] == ["nodule", "micronodules"]
    assert [f["cases"] for f in metrics["per_fold"]] == [3, 3]
    per_class = metrics["per_class"]
    assert "micronodules" not in per_class and per_class["nodule"]["known"] == 6
    assert per_class["nodule"]["positives"] == 2 * sum(r[1] for r in rows)
    assert per_class["ground_glass_opacity"]["known"] == 0  # not in this CSV: unknown
    assert metrics["report"]["bleu4"] is None  # RAD-ChestCT has no reports
