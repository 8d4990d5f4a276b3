"""Readers of :mod:`model.datasets` against phantoms written in each layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from model.config import SMALL
from model.datasets import (
    Sample,
    canonical_axes,
    read_ctrate,
    read_radchestct,
    read_rexgroundingct,
    to_model_input,
)
from model.datasets.ctrate import present_from_ctrate, with_spacing
from model.datasets.radchestct import SPLIT_FILES
from model.labels import LABEL_KEYS, label_index
from model.phantom import Phantom, generate
from model.phantom.layouts import finding_sentences, write_ctrate, write_rexgroundingct
from model.phantom.reports import NO_ABNORMALITY
from model.transforms import preprocess

#: 3 nodules + effusion + 1a/1d; 1a/1d/1e/2a/2b; no finding.
SEEDS = (5, 23, 1)
#: The labels CT-RATE's table determines for our writer (the others are unknown).
CTRATE_KNOWN = [k not in ("micronodules", "linear_opacities") for k in LABEL_KEYS]
AFFINE_TOL = 1e-3  # mm; NIfTI stores the affine in float32


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [generate(seed) for seed in SEEDS]


@pytest.fixture(scope="module")
def ctrate_root(phantoms: list[Phantom], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctrate")
    write_ctrate(phantoms, root, split="train")
    write_ctrate(phantoms[:1], root, split="valid", first_patient=3)
    return root


@pytest.fixture(scope="module")
def rex_root(phantoms: list[Phantom], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rex")
    write_rexgroundingct(phantoms, root, split="train")
    return root


def _assert_same_volume(sample: Sample, phantom: Phantom) -> None:
    assert sample.hu.dtype == np.float32
    assert sample.hu.shape == phantom.hu.shape
    assert np.abs(sample.hu - phantom.hu).max() < 0.5
    assert np.allclose(sample.affine_lps, phantom.affine_lps, atol=AFFINE_TOL)


# --------------------------------------------------------------------------- CT-RATE


def test_ctrate_round_trip(ctrate_root: Path, phantoms: list[Phantom]) -> None:
    samples = list(read_ctrate(ctrate_root, "train"))
    assert [s.name for s in samples] == [f"train_{i + 1}_a_1.nii.gz" for i in range(len(phantoms))]
    for sample, phantom in zip(samples, phantoms, strict=True):
        _assert_same_volume(sample, phantom)
        assert sample.masks is None
        assert sample.report == phantom.report
        assert sample.present is not None
        known = sample.known
        assert list(known) == CTRATE_KNOWN
        assert np.array_equal(sample.present[known], phantom.present[known])
        assert not sample.present[~known].any()


def test_ctrate_both_splits_and_dataset_folder_as_root(ctrate_root: Path) -> None:
    names = [s.name for s in read_ctrate(ctrate_root)]
    assert names[-1] == "valid_3_a_1.nii.gz" and len(names) == len(SEEDS) + 1
    subset = list(read_ctrate(ctrate_root / "dataset", "train", names={"train_2_a_1.nii.gz"}))
    assert [s.name for s in subset] == ["train_2_a_1.nii.gz"]


def _copy_tree(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        if path.is_file():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def test_ctrate_metadata_spacing_wins_over_a_wrong_header(
    ctrate_root: Path, phantoms: list[Phantom], tmp_path: Path
) -> None:
    _copy_tree(ctrate_root, tmp_path)
    path = tmp_path / "dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"
    image = nib.load(path)
    wrong = with_spacing(image.affine, (1.0, 1.0, 1.0))  # what a broken header says
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), wrong), path)
    assert np.allclose(nib.affines.voxel_sizes(nib.load(path).affine), 1.0)
    sample = next(read_ctrate(tmp_path, "train", names={path.name}))
    _assert_same_volume(sample, phantoms[0])

    # And the spacing really comes from metadata.csv: change it there.
    meta = tmp_path / "dataset/metadata/train_metadata.csv"
    with meta.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = list(reader.fieldnames or []), list(reader)
    rows[0]["ZSpacing"], rows[0]["XYSpacing"] = "7.5", "[0.5, 0.25]"
    with meta.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    sample = next(read_ctrate(tmp_path, "train", names={path.name}))
    spacing = np.linalg.norm(sample.affine_lps[:3, :3], axis=0)
    assert np.allclose(spacing, (7.5, 0.5, 0.25))


def test_ctrate_rescale_applied_and_missing_metadata_refused(
    ctrate_root: Path, phantoms: list[Phantom], tmp_path: Path
) -> None:
    _copy_tree(ctrate_root, tmp_path)
    meta = tmp_path / "dataset/metadata/train_metadata.csv"
    text = meta.read_text().splitlines()
    header = text[0].split(",")
    assert header.index("RescaleSlope") == header.index("RescaleIntercept") + 1
    # Slope 2, intercept -2048 with the same stored values: HU doubles.
    text[1] = text[1].replace(",-1024,1,HU,", ",-2048,2,HU,")
    meta.write_text("\n".join(text) + "\n")
    sample = next(read_ctrate(tmp_path, "train", names={"train_1_a_1.nii.gz"}))
    assert np.abs(sample.hu - 2.0 * phantoms[0].hu).max() < 0.5
    meta.write_text("\n".join([text[0], *text[2:]]) + "\n")
    with pytest.raises(KeyError, match="metadata"):
        list(read_ctrate(tmp_path, "train"))


def test_present_from_ctrate_mapping() -> None:
    row = {"Lung nodule": "1", "Lung opacity": "0", "Consolidation": "0", "Atelectasis": "1",
           "Emphysema": "1.0", "Bronchiectasis": "", "Pleural effusion": "0"}  # fmt: skip
    present, known = present_from_ctrate(row)
    on = dict(zip(LABEL_KEYS, present, strict=True))
    sure = dict(zip(LABEL_KEYS, known, strict=True))
    assert on["nodule"] and on["emphysema"] and sure["nodule"] and sure["emphysema"]
    assert not on["ground_glass_opacity"] and sure["ground_glass_opacity"]
    assert not sure["consolidation"]  # atelectasis alone: 2b or 2a
    assert not sure["bronchiectasis"]  # blank cell
    assert not sure["micronodules"] and not sure["linear_opacities"]
    present, known = present_from_ctrate({"Consolidation": "1", "Atelectasis": "1"})
    assert present[label_index("consolidation")] and known[label_index("consolidation")]


# --------------------------------------------------------------------------- ReXGroundingCT


def test_rex_round_trip(rex_root: Path, phantoms: list[Phantom]) -> None:
    samples = list(read_rexgroundingct(rex_root))
    assert [s.name for s in samples] == [f"train_{i + 1}_a_1.nii.gz" for i in range(len(phantoms))]
    for sample, phantom in zip(samples, phantoms, strict=True):
        _assert_same_volume(sample, phantom)
        assert sample.masks is not None and sample.masks.dtype == np.uint8
        assert np.array_equal(sample.masks, phantom.masks)
        assert sample.present is not None and np.array_equal(sample.present, phantom.present)
        assert sample.known.all()
        expected = " ".join(finding_sentences(phantom).values()) or NO_ABNORMALITY
        assert sample.report == expected
    assert samples[2].report == NO_ABNORMALITY and not samples[2].masks.any()  # type: ignore[union-attr]


def test_rex_explicit_dirs_and_split_filter(rex_root: Path, phantoms: list[Phantom]) -> None:
    samples = list(
        read_rexgroundingct(
            rex_root / "dataset.json",
            volume_dir=rex_root / "ct_rate" / "dataset",
            mask_dir=rex_root / "segmentations",
            metadata=rex_root / "ct_rate/dataset/metadata/train_metadata.csv",
            splits={"train"},
            names={"train_2_a_1.nii.gz"},
        )
    )
    assert len(samples) == 1
    _assert_same_volume(samples[0], phantoms[1])
    assert list(read_rexgroundingct(rex_root, splits={"val"})) == []


def test_rex_unknown_codes_ignored_and_channels_united(
    rex_root: Path, phantoms: list[Phantom], tmp_path: Path
) -> None:
    _copy_tree(rex_root, tmp_path)
    data = json.loads((tmp_path / "dataset.json").read_text())
    entry = data["train"][0]
    mask_path = tmp_path / "segmentations" / entry["name"]
    channels = np.asanyarray(nib.load(mask_path).dataobj)
    extra_nodule = np.zeros_like(channels[0])
    extra_nodule[5:8, 5:8, 3:5] = 1  # a second "2d" finding elsewhere
    pneumothorax = np.zeros_like(channels[0])
    pneumothorax[20:40, 20:40, 10:20] = 1  # "2g": not one of the ten
    honeycombing = np.zeros_like(channels[0])
    honeycombing[50:60, 50:60, 5:9] = 3  # "2f"
    stacked = np.concatenate([channels, extra_nodule[None], pneumothorax[None], honeycombing[None]])
    nib.save(nib.Nifti1Image(stacked, np.eye(4)), mask_path)
    n = len(entry["findings"])
    for offset, (code, text) in enumerate(
        [("2d", "Another nodule."), ("2g", "Small apical pneumothorax."), ("2f", "Honeycombing.")]
    ):
        entry["findings"][str(n + offset)] = text
        entry["categories"][str(n + offset)] = code
    (tmp_path / "dataset.json").write_text(json.dumps(data))

    sample = next(read_rexgroundingct(tmp_path, names={entry["name"]}))
    phantom = phantoms[0]
    assert sample.present is not None and np.array_equal(sample.present, phantom.present)
    assert sample.masks is not None
    nodule = label_index("nodule")
    expected = phantom.masks[nodule].astype(bool) | (extra_nodule.transpose(2, 0, 1) != 0)
    assert np.array_equal(sample.masks[nodule].astype(bool), expected)
    others = [i for i in range(len(LABEL_KEYS)) if i != nodule]
    assert np.array_equal(sample.masks[others], phantom.masks[others])
    assert sample.report.endswith("Another nodule. Small apical pneumothorax. Honeycombing.")


def test_rex_per_scan_json_files(rex_root: Path, phantoms: list[Phantom], tmp_path: Path) -> None:
    entries = json.loads((rex_root / "dataset.json").read_text())["train"]
    folder = tmp_path / "entries"
    folder.mkdir()
    for entry in entries:
        (folder / entry["name"].replace(".nii.gz", ".json")).write_text(json.dumps(entry))
    samples = list(
        read_rexgroundingct(
            folder, volume_dir=rex_root / "ct_rate", mask_dir=rex_root / "segmentations"
        )
    )
    assert sorted(s.name for s in samples) == sorted(e["name"] for e in entries)
    by_name = {s.name: s for s in samples}
    assert np.array_equal(by_name["train_1_a_1.nii.gz"].masks, phantoms[0].masks)  # type: ignore[arg-type]


def test_rex_mask_off_grid_refused(rex_root: Path, tmp_path: Path) -> None:
    _copy_tree(rex_root, tmp_path)
    entry = json.loads((tmp_path / "dataset.json").read_text())["train"][0]
    mask_path = tmp_path / "segmentations" / entry["name"]
    channels = np.asanyarray(nib.load(mask_path).dataobj)
    nib.save(nib.Nifti1Image(channels[:, :-1], np.eye(4)), mask_path)
    with pytest.raises(ValueError, match="mask shape"):
        list(read_rexgroundingct(tmp_path, names={entry["name"]}))


# --------------------------------------------------------------------------- RAD-ChestCT


def test_radchestct_axial_first_npz(phantoms: list[Phantom], tmp_path: Path) -> None:
    phantom = phantoms[0]
    np.savez_compressed(tmp_path / "trn00005.npz", phantom.hu[::-1])  # arr_0, superior first
    np.savez_compressed(tmp_path / "val00001.npz", ct=phantom.hu[::-1])
    columns = ["NoteAcc_DEID", "nodule*right_upper_lobe", "nodule*left_lung", "groundglass*lung",
               "consolidation*lung", "atelectasis*lung", "pleural_effusion*left_lung"]  # fmt: skip
    with (tmp_path / SPLIT_FILES["train"][1]).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerow(["trn00005", 0, 1, 0, 0, 1, 1])
    spacing = (phantom.grid.slice_spacing, *phantom.grid.pixel_spacing)
    samples = list(read_radchestct(tmp_path, spacing_mm=spacing))
    assert [s.name for s in samples] == ["trn00005", "val00001"]
    sample = samples[0]
    assert np.array_equal(sample.hu, phantom.hu.astype(np.float32))
    assert np.allclose(sample.affine_lps[:3, :3], phantom.affine_lps[:3, :3])
    assert sample.present is not None
    on = dict(zip(LABEL_KEYS, sample.present, strict=True))
    sure = dict(zip(LABEL_KEYS, sample.known, strict=True))
    assert on["nodule"] and on["pleural_effusion"] and not on["ground_glass_opacity"]
    assert sure["ground_glass_opacity"] and not sure["consolidation"] and not sure["micronodules"]
    assert not sure["emphysema"]  # no emphysema column in this CSV
    assert samples[1].present is None and samples[1].known.sum() == 0
    assert [s.name for s in read_radchestct(tmp_path, "valid")] == ["val00001"]


# --------------------------------------------------------------------------- common form


def test_canonical_axes_undoes_any_axis_order(phantoms: list[Phantom]) -> None:
    phantom = phantoms[1]
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ phantom.affine_lps
    rng = np.random.default_rng(0)
    for _ in range(4):
        perm = rng.permutation(3)
        flips = rng.random(3) < 0.5
        array, masks, affine = phantom.hu, phantom.masks, ras.copy()
        for axis in range(3):
            if flips[axis]:
                n = array.shape[axis]
                array = np.flip(array, axis)
                masks = np.flip(masks, axis + 1)
                step = np.eye(4)
                step[axis, axis], step[axis, 3] = -1.0, n - 1
                affine = affine @ step
        array = array.transpose(perm)
        masks = masks.transpose(0, *(perm + 1))
        affine = affine[:, [*perm, 3]]
        (hu, m), affine_lps = canonical_axes((array, masks), affine)
        assert np.array_equal(hu, phantom.hu) and np.array_equal(m, phantom.masks)
        assert np.allclose(affine_lps, phantom.affine_lps)


def test_sample_validation() -> None:
    hu = np.zeros((4, 5, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="masks"):
        Sample("x", hu, np.eye(4), np.zeros((10, 4, 5, 5), dtype=np.uint8), None, "")
    with pytest.raises(ValueError, match="present"):
        Sample("x", hu, np.eye(4), None, np.zeros(9, dtype=bool), "")
    with pytest.raises(ValueError, match="present_known"):
        Sample("x", hu, np.eye(4), None, None, "", np.ones(10, dtype=bool))
    assert Sample("x", hu, np.eye(4), None, np.zeros(10, dtype=bool), "").known.all()


def test_to_model_input_matches_the_phantom_path(rex_root: Path, phantoms: list[Phantom]) -> None:
    sample = next(read_rexgroundingct(rex_root, names={"train_1_a_1.nii.gz"}))
    cfg = SMALL.preprocess
    got = to_model_input(sample, cfg)
    want = preprocess(phantoms[0].hu, phantoms[0].affine_lps, cfg, masks=phantoms[0].masks)
    assert got.image.shape == cfg.size
    assert got.masks is not None and want.masks is not None
    assert np.abs(got.image - want.image).max() < 1e-4
    assert np.abs(got.masks - want.masks).max() < 1e-4
    assert np.allclose(got.affine_ras, want.affine_ras, atol=AFFINE_TOL)
