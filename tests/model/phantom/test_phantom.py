"""Tests of the synthetic chest-CT phantoms (:mod:`model.phantom`)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from model.labels import LABEL_KEYS
from model.phantom import (
    CaseSpec,
    Grid,
    Phantom,
    compose_report,
    generate,
    read_findings,
    realistic_grid,
    render,
    sample_case,
    training_grid,
)
from model.phantom.render import Regions, render_with_regions
from model.phantom.reports import MAX_WORDS, NO_ABNORMALITY

EFFUSION = LABEL_KEYS.index("pleural_effusion")
SEEDS = (3, 8, 21, 42)


@pytest.fixture(scope="module")
def rendered() -> list[tuple[Phantom, Regions]]:
    out = []
    for seed in SEEDS:
        spec = sample_case(seed, p_normal=0.0)
        grid = training_grid(spec, np.random.default_rng(seed))
        out.append(render_with_regions(spec, grid))
    return out


@pytest.fixture(scope="module")
def specs() -> list[CaseSpec]:
    return [sample_case(seed) for seed in range(300)]


def _report_rng(spec: CaseSpec) -> np.random.Generator:
    return np.random.default_rng([spec.seed, 0x2E90])


# ---------------------------------------------------------------------------- determinism
def test_generate_is_deterministic() -> None:
    a, b = generate(11), generate(11)
    assert a.spec == b.spec
    assert a.grid == b.grid
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.report == b.report


def test_different_seeds_differ() -> None:
    a, b = generate(1), generate(2)
    assert a.spec != b.spec
    assert a.hu.shape != b.hu.shape or not np.array_equal(a.hu, b.hu)


def test_spec_is_grid_independent() -> None:
    spec = sample_case(5)
    assert generate(5).spec == spec
    assert generate(5, "training").spec == sample_case(5)


# ---------------------------------------------------------------------------- volumes
def test_types_and_shapes(rendered: list[tuple[Phantom, Regions]]) -> None:
    for ph, _ in rendered:
        assert ph.hu.dtype == np.int16
        assert ph.masks.dtype == np.uint8
        assert ph.masks.shape == (len(LABEL_KEYS), *ph.grid.shape)
        assert ph.hu.shape == ph.grid.shape
        assert ph.present.dtype == np.bool_ and ph.present.shape == (len(LABEL_KEYS),)
        assert set(np.unique(ph.masks)) <= {0, 1}


def test_present_matches_masks(rendered: list[tuple[Phantom, Regions]]) -> None:
    for ph, _ in rendered:
        np.testing.assert_array_equal(ph.masks.any(axis=(1, 2, 3)), ph.present)
        labels = {les.label for les in ph.lesions}
        np.testing.assert_array_equal(ph.present, [k in labels for k in LABEL_KEYS])
    for seed in range(30, 38):
        ph = generate(seed)
        np.testing.assert_array_equal(ph.masks.any(axis=(1, 2, 3)), ph.present)


def test_hu_ranges(rendered: list[tuple[Phantom, Regions]]) -> None:
    for ph, reg in rendered:
        hu = ph.hu
        assert hu.min() >= -1024 and hu.max() <= 3071
        assert np.all(hu[:, ~reg.body] == -1024)
        healthy = reg.lungs & ~ph.masks.any(axis=0)
        assert -900 < np.median(hu[healthy]) < -760
        # Soft tissue of the chest wall and bone.
        assert 500 < np.percentile(hu[:, reg.body], 99.9) < 3071
        if ph.present[EFFUSION]:
            assert -20 < np.median(hu[ph.masks[EFFUSION] > 0]) < 40


def test_findings_change_density(rendered: list[tuple[Phantom, Regions]]) -> None:
    dense = ("consolidation", "nodule", "ground_glass_opacity")
    for ph, reg in rendered:
        base = np.median(ph.hu[reg.lungs & ~ph.masks.any(axis=0)])
        for key in dense:
            k = LABEL_KEYS.index(key)
            if ph.present[k]:
                assert np.mean(ph.hu[ph.masks[k] > 0]) > base + 100, key
        k = LABEL_KEYS.index("emphysema")
        if ph.present[k]:
            assert np.median(ph.hu[ph.masks[k] > 0]) < base


def test_masks_inside_lungs(rendered: list[tuple[Phantom, Regions]]) -> None:
    for ph, reg in rendered:
        assert not (ph.masks[EFFUSION].astype(bool) & ~reg.pleura).any()
        assert not (ph.masks[EFFUSION].astype(bool) & reg.lungs).any()
        for k, key in enumerate(LABEL_KEYS):
            if key == "pleural_effusion" or not ph.present[k]:
                continue
            mask = ph.masks[k].astype(bool)
            outside = int((mask & ~reg.lungs).sum())
            assert outside <= 1, (key, outside)  # at most the fallback voxel of a tiny lesion
            assert (mask & reg.lungs).any(), key


def test_mask_volume_is_grid_independent() -> None:
    spec = sample_case(4, p_normal=0.0)
    coarse = training_grid(spec, np.random.default_rng(0))
    fine = Grid(
        shape=(int(coarse.shape[0] * coarse.slice_spacing / 1.5), 300, 300),
        pixel_spacing=(1.4, 1.4),
        slice_spacing=1.5,
        slice_thickness=1.5,
        origin_lps=coarse.origin_lps,
    )
    a, b = render(spec, coarse), render(spec, fine)
    for k in np.flatnonzero(a.present):
        va = a.masks[k].sum() * coarse.voxel_volume
        vb = b.masks[k].sum() * fine.voxel_volume
        assert 0.5 < va / vb < 2.0, (LABEL_KEYS[k], va, vb)


# ---------------------------------------------------------------------------- grids
def test_affine_matches_grid() -> None:
    grid = Grid((10, 20, 30), (0.7, 0.8), 2.5, 2.5, (-100.0, -50.0, 30.0))
    aff = grid.affine_lps
    np.testing.assert_allclose(aff[:3, 0], (0, 0, 2.5))
    np.testing.assert_allclose(aff[:3, 1], (0, 0.7, 0))
    np.testing.assert_allclose(aff[:3, 2], (0.8, 0, 0))
    np.testing.assert_allclose(aff[:3, 3], grid.origin_lps)
    np.testing.assert_allclose(aff[3], (0, 0, 0, 1))
    i, j, k = 4, 7, 11
    x, y, z, _ = aff @ np.array([i, j, k, 1.0])
    assert grid.axis_mm(0)[i] == pytest.approx(z)
    assert grid.axis_mm(1)[j] == pytest.approx(y)
    assert grid.axis_mm(2)[k] == pytest.approx(x)
    assert grid.nearest_index((x, y, z)) == (i, j, k)
    ph = generate(2)
    np.testing.assert_array_equal(ph.affine_lps, ph.grid.affine_lps)


def _body_inside(spec: CaseSpec, grid: Grid) -> bool:
    x_half, y_lo, y_hi = spec.anatomy.body_extent_xy()
    cx = spec.anatomy.center_x
    xs, ys, zs = grid.axis_mm(2), grid.axis_mm(1), grid.axis_mm(0)
    return bool(
        xs[0] < cx - x_half
        and xs[-1] > cx + x_half
        and ys[0] < y_lo
        and ys[-1] > y_hi
        and zs[0] <= spec.anatomy.z_base
        and zs[-1] >= spec.anatomy.z_apex
    )


def test_training_grid_ranges() -> None:
    for seed in range(40):
        spec = sample_case(seed)
        grid = training_grid(spec, np.random.default_rng(seed))
        assert 160 <= grid.shape[1] == grid.shape[2] <= 200
        assert 2.0 <= grid.pixel_spacing[0] == grid.pixel_spacing[1] <= 2.6
        assert 2.5 <= grid.slice_spacing <= 5.0
        assert grid.slice_thickness >= grid.slice_spacing
        assert _body_inside(spec, grid)


def test_realistic_grid_ranges() -> None:
    for seed in range(40):
        spec = sample_case(seed)
        grid = realistic_grid(spec, np.random.default_rng(seed))
        assert grid.shape[1:] == (512, 512)
        assert 0.6 <= grid.pixel_spacing[0] == grid.pixel_spacing[1] <= 0.9
        assert 0.625 <= grid.slice_spacing <= grid.slice_thickness <= 2.5
        assert 100 <= grid.shape[0] <= 520
        assert _body_inside(spec, grid)


def test_noise_scales_with_voxel_volume() -> None:
    spec = sample_case(6)
    ref = spec.noise_sigma_ref
    assert 25.0 <= ref <= 45.0
    assert 30.0 <= ref / np.sqrt(0.7 * 0.7 * 1.25) <= 60.0


# ---------------------------------------------------------------------------- reports
def test_read_findings_on_generated_reports(specs: list[CaseSpec]) -> None:
    for spec in specs:
        report = compose_report(spec.lesions, _report_rng(spec))
        assert len(report.split()) <= MAX_WORDS
        np.testing.assert_array_equal(read_findings(report), spec.present, err_msg=report)
        if not spec.present.any():
            assert report.startswith(NO_ABNORMALITY)
        sloppy = re.sub(r"[.,]", "", report).lower()
        np.testing.assert_array_equal(read_findings(sloppy), spec.present, err_msg=sloppy)
        repeated = " ".join([report, report])
        np.testing.assert_array_equal(read_findings(repeated), spec.present, err_msg=repeated)


def test_report_vocabulary_is_small(specs: list[CaseSpec]) -> None:
    words: set[str] = set()
    for spec in specs[:150]:
        for r in range(3):
            text = compose_report(spec.lesions, np.random.default_rng([spec.seed, r]))
            words |= set(re.findall(r"[a-z]+", text.lower()))
    assert len(words) < 400


def test_phantom_report_matches_present() -> None:
    ph = generate(9)
    np.testing.assert_array_equal(read_findings(ph.report), ph.present)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No abnormalities detected.", ()),
        ("no abnormalities detected a 12 mm nodule in the right upper lobe", ("nodule",)),
        ("No pleural effusion. No suspicious pulmonary nodule.", ()),
        ("no pleural effusion consolidation in the left lower lobe", ("consolidation",)),
        ("There is no evidence of emphysema or bronchiectasis.", ()),
        ("Centrilobular micronodules in the right upper lobe.", ("micronodules",)),
        ("Subsegmental linear atelectasis in the left lower lobe.", ("linear_opacities",)),
        ("Atelectasis and consolidation in both lower lobes.", ("consolidation",)),
        ("Thickened bronchial walls are seen in both lungs.", ("bronchial_wall_thickening",)),
        ("Dilated bronchi consistent with bronchiectasis.", ("bronchiectasis",)),
        (
            "ground glass opacity in the right lung. ground glass opacity in the right lung",
            ("ground_glass_opacity",),
        ),
        (
            "Subpleural reticulation. Moderate right pleural effusion measuring 25 mm.",
            ("septal_thickening", "pleural_effusion"),
        ),
        ("No emphysema. Emphysema in the left upper lobe.", ("emphysema",)),
    ],
)
def test_read_findings_examples(text: str, expected: tuple[str, ...]) -> None:
    np.testing.assert_array_equal(read_findings(text), [k in expected for k in LABEL_KEYS])


# ---------------------------------------------------------------------------- model grid
def test_findings_survive_model_preprocessing() -> None:
    from model.config import SMALL
    from model.transforms import preprocess

    ph = generate(13, p_normal=0.0)
    out = preprocess(ph.hu, ph.affine_lps, SMALL.preprocess, masks=ph.masks)
    assert out.masks is not None
    assert out.image.shape == SMALL.preprocess.size
    for k in np.flatnonzero(ph.present):
        assert (out.masks[k] > 0.5).sum() >= 8, LABEL_KEYS[k]
