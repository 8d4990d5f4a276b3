"""Generator 2 (:mod:`model.phantom.realism`): scanner and patient realism on top of the
original phantoms, which stay as they were."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.labels import LABEL_KEYS
from model.phantom import generate, sample_case
from model.phantom.anatomy import lung_depth, vessel_tree
from model.phantom.case import Phantom
from model.phantom.grid import Grid
from model.phantom.realism import (
    fine_grid,
    grid_v2,
    integrate_slabs,
    kernel_filter,
    oesophagus,
    peripheral_vessels,
    sample_realism,
    slab_weights,
)
from model.phantom.render import Regions, render_with_regions

SEEDS = (3, 5, 8, 21)


@pytest.fixture(scope="module")
def pairs() -> list[tuple[tuple[Phantom, Regions], tuple[Phantom, Regions]]]:
    out = []
    for seed in SEEDS:
        one = sample_case(seed, p_normal=0.0)
        two = sample_case(seed, p_normal=0.0, generator=2)
        rng = np.random.default_rng(seed)
        from model.phantom.grid import training_grid

        grid = training_grid(one, rng)
        out.append((render_with_regions(one, grid), render_with_regions(two, grid)))
    return out


def test_generator_1_is_the_original_and_2_is_deterministic() -> None:
    one = sample_case(5)
    assert one.realism is None and one.generator == 1
    assert all(les.kind == "" for les in one.lesions)
    a, b = generate(5, generator=2), generate(5, generator=2)
    assert a.spec.generator == 2
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.masks, b.masks)
    assert a.report == b.report
    with pytest.raises(ValueError, match="generator must be 1 or 2"):
        sample_case(5, generator=3)


def test_same_findings_as_generator_1() -> None:
    for seed in range(40):
        one, two = sample_case(seed), sample_case(seed, generator=2)
        assert np.array_equal(one.present, two.present)
        assert [les.location for les in one.lesions] == [les.location for les in two.lesions]


def test_masks_and_presence_agree(pairs: list) -> None:  # type: ignore[type-arg]
    for _, (phantom, regions) in pairs:
        assert np.array_equal(phantom.masks.any(axis=(1, 2, 3)), phantom.present)
        assert phantom.hu.dtype == np.int16 and phantom.hu.shape == regions.lungs.shape


def test_kernels_correlate_noise_as_smooth_and_sharp_reconstructions() -> None:
    rng = np.random.default_rng(0)
    white = rng.standard_normal((4, 128, 128), dtype=np.float32)
    lag1 = {}
    for seed in range(60):
        realism = sample_realism(seed)
        if realism.kernel in lag1:
            continue
        noise = kernel_filter(realism, 0.7)(white.copy())
        assert float(noise.std()) == pytest.approx(1.0, abs=1e-3)
        lag1[realism.kernel] = float(np.mean(noise[:, :, 1:] * noise[:, :, :-1]))
    assert lag1["smooth"] > 0.5  # blotchy low-pass noise
    assert lag1["sharp"] < 0.35  # fine grain
    kernels = {sample_realism(s).kernel for s in range(60)}
    assert kernels == {"smooth", "sharp"}


def test_slices_integrate_their_thickness() -> None:
    grid = Grid((10, 8, 8), (1.0, 1.0), 5.0, 5.0, (0.0, 0.0, 0.0))
    fine, k = fine_grid(grid)
    assert k == 4 and fine.slice_spacing == pytest.approx(1.25)
    assert slab_weights(grid, k).sum() == pytest.approx(1.0)
    values = np.zeros(fine.shape, dtype=np.float32)
    values[4 * 5 + 1] = 1000.0  # a 1.25 mm layer inside slice 5
    out = integrate_slabs(values, grid, k)
    assert out[5, 0, 0] == pytest.approx(250.0)  # a quarter of the 5 mm slab
    assert out[4].max() == 0 and out[6].max() == 0
    thick = Grid((10, 8, 8), (1.0, 1.0), 2.5, 5.0, (0.0, 0.0, 0.0))
    fine, k = fine_grid(thick)
    w = slab_weights(thick, k)
    assert len(w) > k and w.sum() == pytest.approx(1.0)  # overlapping slabs
    assert fine.shape[0] == thick.shape[0] * k + (len(w) - k)


def test_grids_cover_thin_to_thick_slices_and_wide_fields_of_view() -> None:
    spacings, thick, fovs = set(), [], []
    for seed in range(120):
        spec = sample_case(seed, generator=2)
        grid = grid_v2(spec, np.random.default_rng(seed), "training")
        spacings.add(grid.slice_spacing)
        thick.append(grid.slice_thickness / grid.slice_spacing)
        fovs.append(grid.shape[1] * grid.pixel_spacing[0])
    assert min(spacings) <= 1.0 and max(spacings) == 5.0
    assert min(thick) >= 1.0 and max(thick) > 1.2
    assert min(fovs) < 350 and max(fovs) > 500


def test_lung_parenchyma_has_a_realistic_spread(pairs: list) -> None:  # type: ignore[type-arg]
    for (p1, r1), (p2, r2) in pairs:
        lung1 = p1.hu[r1.lungs & ~p1.masks.any(axis=0)].astype(np.float32)
        lung2 = p2.hu[r2.lungs & ~p2.masks.any(axis=0)].astype(np.float32)
        assert -930 < float(np.median(lung2)) < -740
        # Texture, denser peripheral vessels, fissures and kernel noise widen the spread.
        assert np.percentile(lung2, 95) - np.percentile(lung2, 5) > np.percentile(
            lung1, 95
        ) - np.percentile(lung1, 5)


def test_vessels_grow_to_sub_pixel_branches() -> None:
    anat = sample_case(8, generator=2).anatomy
    extra = peripheral_vessels(anat, 7)
    assert extra and {s.generation for s in extra} == {6, 7}
    assert min(min(s.r0, s.r1) for s in extra) < 1.0
    tips = max(min(s.r0, s.r1) for s in vessel_tree(anat) if s.generation == 5)
    assert max(s.r0 for s in extra) <= tips + 1e-6  # they taper on from the tips
    oblique = [abs(s.p1[2] - s.p0[2]) / max(s.length, 1e-6) for s in extra]
    assert 0.2 < float(np.median(oblique)) < 0.95  # neither in-plane nor along z


def test_nodule_variants_are_where_they_say() -> None:
    kinds: dict[str, int] = {}
    for seed in range(400):
        spec = sample_case(seed, generator=2)
        for les in spec.lesions:
            if les.label != "nodule" or not les.kind:
                continue
            for kind in les.kind.split():
                kinds[kind] = kinds.get(kind, 0) + 1
            x, y, z = (np.array([v]) for v in les.center_lps)
            depth = float(lung_depth(spec.anatomy, les.side, x, y, z)[0])
            radius = les.extent_mm[0]
            if "juxtapleural" in les.kind:
                assert 0 < depth < 1.2 * radius
            if "juxtavascular" in les.kind:
                gap = min(math.dist(les.center_lps, s.midpoint) for s in vessel_tree(spec.anatomy))
                assert gap < 60.0
        if all(kinds.get(k, 0) >= 3 for k in ("juxtapleural", "juxtavascular", "subsolid")):
            break
    assert all(kinds.get(k, 0) >= 3 for k in ("juxtapleural", "juxtavascular", "subsolid"))


def test_subsolid_nodules_are_hazy() -> None:
    for seed in range(400):
        spec = sample_case(seed, p_normal=0.0, generator=2)
        nodules = [les for les in spec.lesions if les.label == "nodule"]
        if len(nodules) == 1 and "subsolid" in nodules[0].kind and nodules[0].size_mm > 12:
            phantom = generate(seed, generator=2, p_normal=0.0)
            mask = phantom.masks[LABEL_KEYS.index("nodule")] > 0
            inside = phantom.hu[mask].astype(np.float32)
            assert -750 < float(np.median(inside)) < -150
            return
    pytest.fail("no single large subsolid nodule in 400 seeds")


def test_oesophagus_lies_outside_the_lungs_with_its_air() -> None:
    for seed in range(50):
        realism = sample_realism(seed)
        if realism.oesophagus_air:
            break
    spec = sample_case(seed, generator=2)
    from model.phantom.grid import training_grid

    grid = training_grid(spec, np.random.default_rng(1))
    phantom, regions = render_with_regions(spec, grid)
    seg = oesophagus(spec.anatomy, realism)[1]  # carina to the lower chest
    mid = tuple((a + b) / 2 for a, b in zip(seg.p0, seg.p1, strict=True))
    i, j, k = grid.nearest_index(mid)  # type: ignore[arg-type]
    assert not regions.lungs[i, j - 1 : j + 2, k - 1 : k + 2].any()
    assert phantom.hu[i, j - 2 : j + 3, k - 2 : k + 3].min() < -300


def test_generate_command_takes_the_generator(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from model.phantom.cli import main

    assert (
        main(["--format", "ctrate", "--out", str(tmp_path), "--generator", "2", "--cases", "1"])
        == 0
    )
    assert list(tmp_path.rglob("*.nii.gz"))
