"""lung_field: lungs, sides, airways, lobes and LAA-950 of an analytic chest at the slice
thicknesses and fields of view of real scanners, and of the shared real chest CT."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest

from bench.realct import readers_mask, realct_missing_reason, unpack_lidc
from service.lung_field import (
    LEFT_LOBES,
    RIGHT_LOBES,
    LungField,
    dilate_mm,
    lung_field,
)
from service.volume import load_series

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Chest:
    """An analytic chest in LPS mm: body, two lungs, trachea and main bronchi, stomach gas,
    a table under the patient, and a block of emphysema (-980 HU) in the left lung."""

    hu: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    lps: npt.NDArray[np.float64]
    right: BoolArray
    left: BoolArray
    airway: BoolArray
    stomach: BoolArray
    emphysema: BoolArray


def make_chest(slice_mm: float, pixel_mm: float, fov_mm: float, bottom: float = -200.0) -> Chest:
    """Slices from ``bottom`` (-200: the upper abdomen, with the stomach) to the neck (120)."""
    d, n = round((120.0 - bottom) / slice_mm), round(fov_mm / pixel_mm)
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, slice_mm]
    affine[:3, 1] = [0.0, pixel_mm, 0.0]
    affine[:3, 2] = [pixel_mm, 0.0, 0.0]
    affine[:3, 3] = [-fov_mm / 2, -fov_mm / 2, bottom]
    z = affine[2, 3] + slice_mm * np.arange(d)
    y = affine[1, 3] + pixel_mm * np.arange(n)
    x = affine[0, 3] + pixel_mm * np.arange(n)
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij", sparse=True)
    hu = np.full((d, n, n), -1000.0, dtype=np.float32)
    body = (X / 165.0) ** 2 + (Y / 110.0) ** 2 < 1.0
    hu[np.broadcast_to(body, hu.shape)] = 40.0
    table = (Y > 125.0) & (Y < 135.0) & (np.abs(X) < 200.0)
    hu[np.broadcast_to(table, hu.shape)] = 200.0

    # Lungs from z = -120 (bases) to z = 90 (apices), ellipsoids either side of the heart.
    def lung(cx: float) -> BoolArray:
        return np.asarray(
            ((X - cx) / 65.0) ** 2 + ((Y - 5.0) / 85.0) ** 2 + ((Z + 15.0) / 105.0) ** 2 < 1.0
        )

    right, left = lung(-75.0), lung(75.0)
    hu[right | left] = -850.0
    # Trachea down the midline from the neck to the carina (z = 20), main bronchi to the hila.
    trachea = (np.hypot(X, Y + 20.0) < 9.0) & (Z > 20.0) & (Z < 118.0)
    t = np.clip((20.0 - Z) / 40.0, 0.0, 1.0)  # 0 at the carina, 1 at the hilum
    bronchi = np.zeros_like(trachea)
    for side in (-1.0, 1.0):
        bronchi = bronchi | (
            (np.hypot(X - side * 45.0 * t, Y + 20.0) < 6.0) & (Z <= 20.0) & (Z > -20.0)
        )
    airway = np.broadcast_to(trachea | bronchi, hu.shape)
    hu[airway] = -1000.0
    stomach = np.broadcast_to(
        np.hypot(X - 60.0, Y + 30.0) ** 2 / 45.0**2 + ((Z + 160.0) / 30.0) ** 2 < 1.0, hu.shape
    )
    hu[stomach] = -1000.0
    emphysema = (
        np.broadcast_to(
            (np.abs(X - 75.0) < 25.0) & (np.abs(Y) < 25.0) & (np.abs(Z - 40.0) < 20.0), hu.shape
        )
        & left
    )
    hu[emphysema] = -980.0
    lps = np.stack(np.broadcast_arrays(X, Y, Z), axis=-1)
    return Chest(
        hu,
        affine,
        lps,
        np.broadcast_to(right, hu.shape),
        np.broadcast_to(left, hu.shape),
        airway,
        stomach,
        emphysema,
    )


def _source(field: LungField, grid: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    shape = field.source_shape
    return field.sample(grid, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])))


@pytest.mark.parametrize(
    ("slice_mm", "pixel_mm", "fov_mm", "bottom"),
    [
        (2.5, 0.7, 360.0, -200.0),
        (5.0, 1.37, 700.0, -200.0),
        (2.0, 0.6, 300.0, -130.0),
        (0.625, 1.5, 400.0, -130.0),
    ],
    ids=["2.5mm-360fov", "5mm-700fov", "2mm-300fov-body-cut", "0.625mm-400fov"],
)
def test_an_analytic_chest(slice_mm: float, pixel_mm: float, fov_mm: float, bottom: float) -> None:
    chest = make_chest(slice_mm, pixel_mm, fov_mm, bottom)
    field = lung_field(chest.hu, chest.affine)
    assert field.found
    voxel_ml = abs(float(np.linalg.det(chest.affine[:3, :3]))) / 1000.0
    for side, truth in (("right", chest.right), ("left", chest.left)):
        expected = float(truth.sum()) * voxel_ml
        assert field.volume_ml[side] == pytest.approx(expected, rel=0.08), side
    lobes = _source(field, field.lobes)
    lungs = _source(field, field.aerated).astype(bool)
    both = chest.right | chest.left
    # The lungs, not the trachea, the bronchi, the stomach or the air under the table.
    assert lungs[both & ~chest.airway].mean() > 0.95
    assert lungs[chest.airway & (chest.lps[..., 2] > 25.0)].mean() < 0.02
    assert not lungs[chest.stomach].any()
    # Sides: the right lung is at negative x (LPS).
    assert np.isin(lobes[chest.right & lungs], RIGHT_LOBES).mean() > 0.98
    assert np.isin(lobes[chest.left & lungs], LEFT_LOBES).mean() > 0.98
    # Lobes: the front of the base and the top are upper lobes; the back of the base lower.
    z, y = chest.lps[..., 2], chest.lps[..., 1]
    assert set(np.unique(lobes[chest.right & lungs])) == {1, 2, 3}
    assert set(np.unique(lobes[chest.left & lungs])) == {4, 5}
    apex = lungs & (z > 70.0)
    assert np.isin(lobes[apex], (1, 4)).all()
    posterior_base = lungs & (z < -80.0) & (y > 40.0)
    assert np.isin(lobes[posterior_base], (3, 5)).all()
    # LAA-950: the emphysema block over the lung field.
    expected_laa = 100.0 * chest.emphysema.sum() / (both & ~chest.airway).sum()
    assert field.laa950_percent == pytest.approx(expected_laa, abs=0.5)


def test_dense_lung_joins_the_extended_field() -> None:
    """A consolidation at the back of the right lung's base (soft tissue where lung was) is
    in the extended field, not in the aerated one; the mediastinum between the lungs is in
    neither."""
    chest = make_chest(2.5, 1.4, 360.0)
    x, y, z = chest.lps[..., 0], chest.lps[..., 1], chest.lps[..., 2]
    consolidation = chest.right & (np.hypot(x + 75.0, y - 60.0) < 20.0) & (np.abs(z + 70.0) < 15.0)
    hu = chest.hu.copy()
    hu[consolidation] = 40.0
    field = lung_field(hu, chest.affine)
    aerated = _source(field, field.aerated).astype(bool)
    lobes = _source(field, field.lobes)
    assert aerated[consolidation].mean() < 0.5
    assert (lobes[consolidation] > 0).mean() > 0.9
    assert np.isin(lobes[consolidation & (lobes > 0)], RIGHT_LOBES).all()
    mediastinum = (
        ~(chest.right | chest.left)
        & (np.abs(x) < 5.0)
        & (np.abs(y) < 30.0)
        & (np.abs(z + 15.0) < 30.0)
    )
    assert not (lobes[mediastinum] > 0).any()


def test_near_and_pleura_zones() -> None:
    chest = make_chest(2.5, 1.4, 360.0)
    field = lung_field(chest.hu, chest.affine)
    lungs = field.lungs
    near = field.near(5.0)
    assert (near & lungs).sum() == lungs.sum() and near.sum() > lungs.sum()
    # Grown by about 5 mm, not more than the octagon's corners allow.
    ball = dilate_mm(lungs, field.spacing, 7.5)
    assert not (near & ~ball).any()
    pleura = _source(field, field.pleura)
    x, y = chest.lps[..., 0], chest.lps[..., 1]
    outside = ~(chest.right | chest.left)
    beside_right_lung = (
        outside & (np.hypot(x + 150.0, y - 5.0) < 5.0) & (np.abs(chest.lps[..., 2] + 15) < 20)
    )
    assert pleura[beside_right_lung].mean() > 0.9
    between_lungs = (
        outside & (np.abs(x) < 5.0) & (np.abs(y) < 30.0) & (np.abs(chest.lps[..., 2] + 15) < 30)
    )
    assert not pleura[between_lungs].any()


def test_no_lungs_in_a_head_or_an_abdomen() -> None:
    chest = make_chest(5.0, 1.4, 360.0)
    abdomen = chest.hu[: round(70 / 5.0)]  # z from -200 to -130: stomach gas, no lung
    affine = chest.affine
    field = lung_field(np.ascontiguousarray(abdomen), affine)
    assert not field.found and field.volume_ml == {"right": 0.0, "left": 0.0}


@pytest.fixture(scope="module")
def real_field(tmp_path_factory: pytest.TempPathFactory) -> tuple[LungField, object]:
    reason = realct_missing_reason()
    if reason:
        pytest.skip(reason)
    series = unpack_lidc(tmp_path_factory.mktemp("lidc"))
    volume = load_series(sorted(series.glob("*.dcm")))
    return lung_field(volume.hu, volume.affine_lps), volume


def test_the_real_chest_ct(real_field: tuple[LungField, object]) -> None:
    """LIDC-IDRI-0001: two lungs of adult size, the trachea out, the readers' nodule in the
    left lower lobe (as the readers place it), LAA-950 of a non-emphysematous lung."""
    field, volume = real_field
    assert 1500.0 < field.volume_ml["right"] < 4000.0
    assert 1500.0 < field.volume_ml["left"] < 4000.0
    assert field.laa950_percent < 6.0
    lobes = _source(field, field.lobes)
    truth = readers_mask()
    assert (lobes[truth] > 0).mean() > 0.95
    assert np.bincount(lobes[truth], minlength=6).argmax() == 5  # left lower lobe
    # The trachea, in the top slice, at the body's midline, is not lung.
    top = volume.hu[-1]  # type: ignore[attr-defined]
    air = np.nonzero(top[150:300, 200:312] < -900)
    rows, cols = air[0] + 150, air[1] + 200
    assert rows.size > 50
    assert not lobes[-1][rows, cols].any()
