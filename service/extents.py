"""Diffuse findings as one extent: volume, percent of each lung, lobes involved, key point."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from model.labels import Abnormality
from service.findings import BoolArray, Extent
from service.gating import AnalysisContext
from service.lung_field import LOBE_NAMES, Side, lobe_side

__all__ = ["MIN_LOBE_FRACTION", "diffuse_extent"]

#: there (the lobe holding most of it always is).
MIN_LOBE_FRACTION = 0.10



def _key_point(plane: BoolArray) -> tuple[float, float]:
    """A point inside the largest patch of a 2D mask: its pixel nearest the patch centroid."""
    labels, count = ndimage.label(plane)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    patch = labels == int(np.argmax(sizes)) + 1
    rows, cols = np.nonzero(patch)
    centre = np.array([rows.mean(), cols.mean()])
    nearest = int(np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2))
    return float(rows[nearest]), float(cols[nearest])


def diffuse_extent(
    box: tuple[slice, slice, slice], raw: BoolArray, abnormality: Abnormality, ctx: AnalysisContext
) -> tuple[BoolArray | None, Extent | None]:
    """The extent of a diffuse finding: (mask on the source grid, extent)."""
    volume = ctx.volume
    mask_box = raw.copy()
    allowed = ctx.allowed(abnormality, box)
    if allowed is not None:
        mask_box &= allowed
    voxel_ml = volume.voxel_volume_ml
    # A pattern is many small pieces: only the whole of it has to reach the noise floor.
    if mask_box.sum() * voxel_ml < ctx.options.min_lesion_ml:
        return None, None
    lobes = ctx.lobes(box)
    per_lobe = np.bincount(lobes[mask_box], minlength=6)[1:] * voxel_ml
    total = float(mask_box.sum()) * voxel_ml
    involved = {int(i) + 1 for i in np.nonzero(per_lobe >= MIN_LOBE_FRACTION * total)[0]}
    if per_lobe.any():
        involved.add(int(np.argmax(per_lobe)) + 1)
    percent: dict[Side, float] = {"right": 0.0, "left": 0.0}
    if ctx.lungs is not None:
        for side in ("right", "left"):
            lung_ml = ctx.lungs.volume_ml[side]
            side_ml = sum(float(per_lobe[c - 1]) for c in LOBE_NAMES if lobe_side(c) == side)
            percent[side] = 100.0 * side_ml / lung_ml if lung_ml > 0 else 0.0
    per_slice = mask_box.sum(axis=(1, 2))
    key = int(np.argmax(per_slice))
    row, col = _key_point(mask_box[key])
    extent = Extent(
        volume_ml=total,
        percent_of_lung=percent,
        lobes=tuple(sorted(involved)),
        key_slice=box[0].start + key,
        key_point=(row + box[1].start, col + box[2].start),
    )
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = mask_box
    return mask, extent
