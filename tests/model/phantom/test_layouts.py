"""Phantoms written in the public layouts (:mod:`model.phantom.layouts`) and ``generate``."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from model.datasets.ctrate import (
    CTRATE_LABELS,
    METADATA_COLUMNS,
    REPORT_COLUMNS,
    VOLUME_NAME,
    ctrate_labels,
    parse_xy_spacing,
)
from model.labels import DEFAULT_LABELS, LABEL_KEYS, label_index
from model.phantom import Phantom, generate
from model.phantom.cli import add_generate_arguments, run_generate
from model.phantom.layouts import (
    ctrate_name,
    entity_labels,
    finding_sentences,
    write_ctrate,
    write_rexgroundingct,
)

#: Seeds of the cases: 3 nodules + effusion + 1a/1d; 1a/1d/1e/2a/2b; no finding.
SEEDS = (5, 23, 1)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [generate(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def ctrate_root(phantoms: list[Phantom], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctrate")
    write_ctrate(phantoms, root, split="train", first_patient=7)
    return root


@pytest.fixture(scope="module")
def rex_root(phantoms: list[Phantom], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rex")
    write_rexgroundingct(phantoms, root, split="valid")
    return root


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


# --------------------------------------------------------------------------- CT-RATE


def test_ctrate_tree_names_and_tables(ctrate_root: Path, phantoms: list[Phantom]) -> None:
    names = [f"train_{7 + i}_a_1.nii.gz" for i in range(len(phantoms))]
    for name in names:
        assert VOLUME_NAME.match(name)
        patient = name.split("_")[1]
        assert (ctrate_root / f"dataset/train/train_{patient}/train_{patient}_a/{name}").is_file()
    columns, meta = _csv(ctrate_root / "dataset/metadata/train_metadata.csv")
    assert columns == list(METADATA_COLUMNS) and len(columns) == 44
    assert [row["VolumeName"] for row in meta] == names
    columns, reports = _csv(ctrate_root / "dataset/radiology_text_reports/train_reports.csv")
    assert columns == list(REPORT_COLUMNS)
    assert [r["Findings_EN"] for r in reports] == [p.report for p in phantoms]
    columns, labels = _csv(
        ctrate_root / "dataset/multi_abnormality_labels/train_predicted_labels.csv"
    )
    assert columns == ["VolumeName", *CTRATE_LABELS] and len(CTRATE_LABELS) == 18
    assert [row["VolumeName"] for row in labels] == names
    sidecar = json.loads((ctrate_root / "phantoms.json").read_text())
    assert [item["seed"] for item in sidecar] == list(SEEDS)


def test_ctrate_volume_is_int16_hwd_with_rescale_and_true_geometry(
    ctrate_root: Path, phantoms: list[Phantom]
) -> None:
    _, meta = _csv(ctrate_root / "dataset/metadata/train_metadata.csv")
    for phantom, row in zip(phantoms, meta, strict=True):
        name = row["VolumeName"]
        patient = name.split("_")[1]
        image = nib.load(ctrate_root / f"dataset/train/train_{patient}/train_{patient}_a/{name}")
        raw = np.asanyarray(image.dataobj)
        assert raw.dtype == np.int16
        depth, rows, cols = phantom.hu.shape
        assert raw.shape == (rows, cols, depth)
        hu = raw * float(row["RescaleSlope"]) + float(row["RescaleIntercept"])
        assert np.array_equal(hu, phantom.hu.transpose(1, 2, 0))
        assert (row["RescaleSlope"], row["RescaleIntercept"]) == ("1", "-1024")
        assert parse_xy_spacing(row["XYSpacing"]) == pytest.approx(phantom.grid.pixel_spacing)
        assert float(row["ZSpacing"]) == pytest.approx(phantom.grid.slice_spacing)
        assert (int(row["Rows"]), int(row["Columns"]), int(row["NumberofSlices"])) == (
            rows,
            cols,
            depth,
        )
        assert nib.aff2axcodes(image.affine) == ("P", "L", "S")
        assert np.allclose(
            nib.affines.voxel_sizes(image.affine),
            (*phantom.grid.pixel_spacing, phantom.grid.slice_spacing),
            atol=1e-4,
        )
        # RAS of NIfTI voxel (h, w, d) is the LPS position of our voxel (d, h, w), x and y negated.
        h, w, d = rows - 1, 2, depth - 1
        ras = image.affine @ np.array([h, w, d, 1.0])
        lps = phantom.affine_lps @ np.array([d, h, w, 1.0])
        assert np.allclose(ras[:3], lps[:3] * np.array([-1, -1, 1]), atol=1e-3)


def test_ctrate_labels_follow_the_findings(ctrate_root: Path, phantoms: list[Phantom]) -> None:
    _, labels = _csv(ctrate_root / "dataset/multi_abnormality_labels/train_predicted_labels.csv")
    for phantom, row in zip(phantoms, labels, strict=True):
        on = dict(zip(LABEL_KEYS, phantom.present, strict=True))
        assert row["Lung nodule"] == str(int(on["nodule"]))
        assert row["Pleural effusion"] == str(int(on["pleural_effusion"]))
        assert row["Peribronchial thickening"] == str(int(on["bronchial_wall_thickening"]))
        assert row["Interlobular septal thickening"] == str(int(on["septal_thickening"]))
        assert row["Consolidation"] == str(int(on["consolidation"]))
        assert row["Pulmonary fibrotic sequela"] == str(int(on["linear_opacities"]))
        for column in (
            "Cardiomegaly",
            "Medical material",
            "Hiatal hernia",
            "Mosaic attenuation pattern",
        ):
            assert row[column] == "0"


def test_ctrate_labels_atelectasis_comes_from_the_sentences() -> None:
    present = np.zeros(10, dtype=bool)
    present[label_index("linear_opacities")] = True
    plain = ctrate_labels(present, {"linear_opacities": "Linear scarring in the left lower lobe."})
    assert plain["Atelectasis"] == 0 and plain["Pulmonary fibrotic sequela"] == 1
    said = ctrate_labels(
        present, {"linear_opacities": "Subsegmental linear atelectasis in the lingula."}
    )
    assert said["Atelectasis"] == 1 and said["Consolidation"] == 0
    assert sum(ctrate_labels(np.zeros(10, dtype=bool)).values()) == 0


def test_names_and_sentences(phantoms: list[Phantom]) -> None:
    assert ctrate_name("valid", 53) == "valid_53_a_1.nii.gz"
    with pytest.raises(ValueError):
        ctrate_name("test", 1)
    for phantom in phantoms:
        sentences = finding_sentences(phantom)
        assert list(sentences) == [
            k for k, on in zip(LABEL_KEYS, phantom.present, strict=True) if on
        ]
        assert " ".join(sentences.values()) == phantom.report[: len(" ".join(sentences.values()))]


# --------------------------------------------------------------------------- ReXGroundingCT


def test_rex_json_entries(rex_root: Path, phantoms: list[Phantom]) -> None:
    data = json.loads((rex_root / "dataset.json").read_text())
    assert list(data) == ["val"]
    entries = data["val"]
    assert [e["name"] for e in entries] == [
        f"valid_{i + 1}_a_1.nii.gz" for i in range(len(phantoms))
    ]
    codes = {a.code for a in DEFAULT_LABELS}
    for entry, phantom in zip(entries, phantoms, strict=True):
        depth, rows, cols = phantom.hu.shape
        assert entry["shape"] == [rows, cols, depth]
        assert set(entry["findings"]) == set(entry["categories"])
        assert set(entry["categories"].values()) <= codes
        expected = [DEFAULT_LABELS[i].code for i in np.flatnonzero(phantom.present)]
        assert [entry["categories"][str(i)] for i in range(len(expected))] == expected
    assert (
        entries[2]["findings"] == {}
        and not (rex_root / "segmentations" / entries[2]["name"]).exists()
    )
    # The CT volumes and their tables are a CT-RATE tree.
    assert (rex_root / "ct_rate/dataset/metadata/validation_metadata.csv").is_file()
    assert (
        rex_root / "ct_rate/dataset/multi_abnormality_labels/valid_predicted_labels.csv"
    ).is_file()


def test_rex_masks_one_channel_per_finding_with_entities(
    rex_root: Path, phantoms: list[Phantom]
) -> None:
    entry = json.loads((rex_root / "dataset.json").read_text())["val"][0]
    phantom = phantoms[0]
    image = nib.load(rex_root / "segmentations" / entry["name"])
    assert np.array_equal(image.affine, np.eye(4))
    masks = np.asanyarray(image.dataobj)
    depth, rows, cols = phantom.hu.shape
    assert masks.shape == (len(entry["findings"]), rows, cols, depth)
    for idx, code in entry["categories"].items():
        label = next(i for i, a in enumerate(DEFAULT_LABELS) if a.code == code)
        channel = masks[int(idx)]
        assert np.array_equal(channel != 0, phantom.masks[label].transpose(1, 2, 0) != 0)
        _, count = ndimage.label(channel != 0, structure=np.ones((3, 3, 3)))
        assert set(np.unique(channel)) == set(range(count + 1))
    nodule = int(next(k for k, c in entry["categories"].items() if c == "2d"))
    assert masks[nodule].max() >= 2  # several nodules, numbered as entities


def test_entity_labels_widen_past_255() -> None:
    grid = np.zeros((2, 40, 40), dtype=np.uint8)
    grid[0, ::2, ::2] = 1  # 400 isolated voxels
    out = entity_labels(grid)
    assert out.dtype == np.uint16 and int(out.max()) == 400


def test_rex_split_merge_keeps_other_split(
    rex_root: Path, phantoms: list[Phantom], tmp_path: Path
) -> None:
    write_rexgroundingct(phantoms[:1], tmp_path, split="train")
    write_rexgroundingct(phantoms[1:2], tmp_path, split="valid")
    data = json.loads((tmp_path / "dataset.json").read_text())
    assert [e["name"] for e in data["train"]] == ["train_1_a_1.nii.gz"]
    assert [e["name"] for e in data["val"]] == ["valid_1_a_1.nii.gz"]


# --------------------------------------------------------------------------- generate CLI


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return parser.parse_args(list(argv))


def test_generate_dicom_is_read_by_pydicom(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _args("--format", "dicom", "--out", str(tmp_path), "--seed", "5", "--cases", "1",
                 "--patient-name", "Doe^Jane", "--patient-id", "P-77")  # fmt: skip
    assert run_generate(args) == 0
    summary = json.loads(capsys.readouterr().out)
    case = Path(summary["cases"][0])
    assert case == tmp_path / "case_5"
    phantom = generate(5)
    files = sorted((case / "dicom").glob("*.dcm"))
    assert len(files) == phantom.hu.shape[0]
    datasets = [pydicom.dcmread(f) for f in files]
    assert {str(ds.PatientName) for ds in datasets} == {"Doe^Jane"}
    assert {ds.PatientID for ds in datasets} == {"P-77"}
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    )
    assert np.array_equal(volume, phantom.hu)
    assert np.allclose(
        [float(v) for v in datasets[0].ImagePositionPatient], phantom.affine_lps[:3, 3], atol=1e-3
    )
    truth = json.loads((case / "truth.json").read_text())
    assert truth["present"] == [k for k, on in zip(LABEL_KEYS, phantom.present, strict=True) if on]
    assert truth["report"] == phantom.report
    assert truth["series_instance_uid"] == datasets[0].SeriesInstanceUID
    assert len(truth["lesions"]) == len(phantom.lesions)
    assert np.allclose(truth["affine_lps"], phantom.affine_lps)
    assert np.array_equal(np.load(case / truth["masks"]), phantom.masks)


@pytest.mark.parametrize("fmt", ["ctrate", "rexgroundingct"])
def test_generate_nifti_layouts(
    fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_generate(
            _args("--format", fmt, "--out", str(tmp_path), "--seed", "1", "--split", "valid")
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == fmt and len(summary["cases"]) == 1
    base = tmp_path if fmt == "ctrate" else tmp_path / "ct_rate"
    assert (
        base / "dataset/valid/valid_2/valid_2_a/valid_2_a_1.nii.gz"
    ).is_file()  # seed 1 -> patient 2


def test_generate_rejects_bad_arguments(tmp_path: Path) -> None:
    assert run_generate(_args("--out", str(tmp_path), "--cases", "0")) == 2
    assert run_generate(_args("--format", "ctrate", "--out", str(tmp_path), "--seed", "-1")) == 2
