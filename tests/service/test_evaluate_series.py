"""``unict-node evaluate --dicom``: a series through the node's own analysis, with and
without a reference mask; the shared real chest CT when it is there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bench.realct import LIDC_MASK, readers_mask, realct_missing_reason, unpack_lidc
from model.labels import LABEL_KEYS
from service.cli import main
from service.evaluate_series import compare_with_mask, dice_of


def test_lesion_detection_and_dice_on_known_masks() -> None:
    reference = np.zeros((10, 20, 20), dtype=bool)
    reference[2:5, 2:6, 2:6] = True  # lesion 1: 48 voxels, found exactly
    reference[6:8, 14:16, 14:16] = True  # lesion 2: 8 voxels, missed
    reported = np.zeros_like(reference)
    reported[2:5, 2:6, 2:6] = True
    reported[8:10, 0:2, 18:20] = True  # a false positive of 8 voxels
    result = compare_with_mask(reported, reference, voxel_ml=0.5)
    assert result["dice"] == pytest.approx(2 * 48 / (56 + 56))
    assert [les["detected"] for les in result["marked_lesions"]] == [True, False]
    assert [les["dice"] for les in result["marked_lesions"]] == [1.0, 0.0]
    assert result["marked_lesions"][0]["volume_ml"] == 24.0
    assert result["marked_lesions"][1]["slice_range"] == (6, 7)
    assert (result["detected"], result["false_positive_lesions"]) == (1, 1)
    assert result["false_positive_ml"] == [4.0]
    absent = compare_with_mask(None, reference, voxel_ml=1.0)
    assert absent["dice"] == 0.0 and absent["detected"] == 0
    assert dice_of(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dicom")
    assert main(["generate", "--format", "dicom", "--out", str(out), "--seed", "5"]) == 0
    (case,) = sorted(out.glob("case_*"))
    return case


def test_a_generated_series_with_its_label_masks(dicom_case: Path, tmp_path: Path) -> None:
    truth = json.loads((dicom_case / "truth.json").read_text())
    masks = np.load(dicom_case / "masks.npy")
    label = "nodule"
    assert masks[LABEL_KEYS.index(label)].any()
    out = tmp_path / "series.json"
    argv = [
        "evaluate",
        "--dicom",
        str(dicom_case / "dicom"),
        "--mask",
        str(dicom_case / "masks.npy"),
    ]
    assert main([*argv, "--mask-label", label, "--out", str(out), "--threads", "1"]) == 0
    result = json.loads(out.read_text())
    assert result["series_instance_uid"] == truth["series_instance_uid"]
    assert [f["key"] for f in result["findings"]] == list(LABEL_KEYS)
    for f in result["findings"]:
        assert 0.0 <= f["probability"] <= 1.0
        assert f["decision"] == ("Present" if f["probability"] >= f["threshold"] else "Absent")
        assert f["volume_ml"] == 0.0 or f["decision"] == "Present"
    compared = result["mask"]
    reference = masks[LABEL_KEYS.index(label)] > 0
    assert compared["label"] == label
    assert compared["reference_ml"] == pytest.approx(
        reference.sum() * np.prod(result["spacing_mm"]) / 1000, rel=1e-3
    )
    assert len(compared["marked_lesions"]) >= 1
    assert compared["detected"] == sum(les["detected"] for les in compared["marked_lesions"])
    assert 0.0 <= compared["dice"] <= 1.0


def test_bad_input_is_refused_with_the_reason(
    dicom_case: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((3, 4, 5), dtype=np.uint8))
    argv = ["evaluate", "--dicom", str(dicom_case / "dicom"), "--mask", str(wrong)]
    assert main(argv) == 2
    assert "is not the series'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    assert main(["evaluate", "--dicom", str(empty)]) == 2
    assert "no DICOM instance" in capsys.readouterr().err
    two = tmp_path / "two"
    shutil.copytree(dicom_case / "dicom", two / "a")
    other = tmp_path / "other"
    assert main(["generate", "--format", "dicom", "--out", str(other), "--seed", "6"]) == 0
    shutil.copytree(next(other.glob("case_*")) / "dicom", two / "b")
    capsys.readouterr()
    assert main(["evaluate", "--dicom", str(two)]) == 2
    assert "choose one with --series" in capsys.readouterr().err


@pytest.mark.slow
def test_the_shared_real_chest_ct(tmp_path: Path) -> None:
    """LIDC-IDRI-0001 with the readers' mask: every finding's probability and decision;
    the nodule Present and its Dice at least 0.6 (skips where ../shared/realct is absent)."""
    reason = realct_missing_reason()
    if reason:
        pytest.skip(reason)
    series = unpack_lidc(tmp_path / "lidc")
    out = tmp_path / "lidc.json"
    argv = ["evaluate", "--dicom", str(series), "--mask", str(LIDC_MASK), "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["slices"] == readers_mask().shape[0] == 133
    assert len(result["findings"]) == len(LABEL_KEYS)
    nodule = result["findings"][LABEL_KEYS.index("nodule")]
    assert nodule["decision"] == "Present"
    assert result["mask"]["dice"] >= 0.6
    assert result["mask"]["detected"] == 1 == len(result["mask"]["marked_lesions"])
