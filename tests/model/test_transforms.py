"""Preprocessing shared by training and inference: orientation, spacing, window, crop/pad, inverse."""

from __future__ import annotations

import numpy as np

from model.config import SMALL
from model.training.metrics import dice
from model.transforms import preprocess, spacing_of, to_source_grid

CFG = SMALL.preprocess


def sphere_volume(
    shape: tuple[int, int, int] = (120, 200, 200),
    spacing: tuple[float, float, float] = (2.5, 1.8, 1.8),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A -1000 HU volume with a 40 HU sphere of 25 mm radius off centre, and its LPS affine."""
    ss, rs, cs = spacing
    affine = np.zeros((4, 4))
    affine[:3, 0] = (0, 0, ss)
    affine[:3, 1] = (0, rs, 0)
    affine[:3, 2] = (cs, 0, 0)
    affine[:3, 3] = (-cs * shape[2] / 2, -rs * shape[1] / 2, -ss * shape[0] / 2)
    affine[3, 3] = 1
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    z, y, x = i * ss + affine[2, 3], j * rs + affine[1, 3], k * cs + affine[0, 3]
    mask = (x - 40) ** 2 + (y + 20) ** 2 + (z - 30) ** 2 < 25**2
    hu = np.where(mask, 40, -1000).astype(np.int16)
    return hu, affine, mask


def test_model_grid_shape_range_and_spacing() -> None:
    hu, affine, mask = sphere_volume()
    mi = preprocess(hu, affine, CFG, masks=mask[None])
    assert mi.image.shape == CFG.size
    assert mi.masks is not None and mi.masks.shape == (1, *CFG.size)
    assert mi.image.min() >= CFG.offset - 1e-6 and mi.image.max() <= CFG.offset + 1 + 1e-6
    assert np.allclose(spacing_of(mi.affine_ras), CFG.spacing_mm)
    expected = (40 + 1000) / 1200 + CFG.offset
    assert abs(float(mi.image[mi.masks[0] > 0.99].mean()) - expected) < 0.02


def test_orientation_is_slp_whatever_the_slice_order() -> None:
    """A volume stored superior->inferior and with flipped rows gives the same model input."""
    hu, affine, mask = sphere_volume()
    a = preprocess(hu, affine, CFG, masks=mask[None])
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, hu.shape[0] - 1
    flip[1, 1], flip[1, 3] = -1, hu.shape[1] - 1
    b = preprocess(hu[::-1, ::-1].copy(), affine @ flip, CFG, masks=mask[None, ::-1, ::-1].copy())
    assert a.masks is not None and b.masks is not None
    assert dice(a.masks[0] > 0.5, b.masks[0] > 0.5) > 0.97
    # Axis 0 runs inferior -> superior: the sphere (z = +30 mm) sits above the middle slice.
    centroid = np.argwhere(a.masks[0] > 0.5).mean(axis=0)
    assert centroid[0] > CFG.size[0] / 2
    # Axis 1 runs right -> left: the sphere at x = +40 mm (patient left) is past the middle.
    assert centroid[1] > CFG.size[1] / 2


def test_masks_map_back_to_source_grid() -> None:
    hu, affine, mask = sphere_volume()
    mi = preprocess(hu, affine, CFG, masks=mask[None])
    assert mi.masks is not None
    back = to_source_grid(mi.masks, mi.affine_ras, affine, hu.shape)
    assert back.shape == (1, *hu.shape)
    assert dice(back[0] > 0.5, mask) > 0.95


def test_padding_uses_air_value() -> None:
    hu, affine, _ = sphere_volume(shape=(40, 60, 60))
    mi = preprocess(hu, affine, CFG)
    assert np.isclose(mi.image[0, 0, 0], CFG.pad_value)
