"""Air inside the body, and which of it is lung: components, left and right, filled."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.lung_grid import BoolArray, dilate_octagon

__all__ = [
    "AIR_HU",
    "CLOSING_MM",
    "MIN_LUNG_FRACTION",
    "MIN_LUNG_ML",
    "PURE_GAS_HU",
    "fill_lung",
    "lung_components",
    "outside_air",
    "split_sides",
]

#: Below this, a voxel is air (lung parenchyma is about -850 HU, soft tissue above -100).
AIR_HU = -400.0

#: A lung holds at least this much air (mL); smaller components are gas elsewhere.
MIN_LUNG_ML = 100.0

#: ...and at least this fraction of the largest air component...
MIN_LUNG_FRACTION = 0.15

#: ...and its mean is above this: lung parenchyma averages about -850 HU, gas -1000.
PURE_GAS_HU = -975.0

#: Radius (mm) of the in-plane closing of each lung.
CLOSING_MM = 8.0


def outside_air(air: BoolArray) -> BoolArray:
    """Air connected (in 3D) to a corner region of the field of view."""
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros_like(air)
    _, h, w = air.shape
    cy, cx = max(1, h // 12), max(1, w // 12)
    corners = np.concatenate(
        [
            labels[:, :cy, :cx].ravel(),
            labels[:, :cy, -cx:].ravel(),
            labels[:, -cy:, :cx].ravel(),
            labels[:, -cy:, -cx:].ravel(),
        ]
    )
    outside_labels = np.unique(corners[corners > 0])
    lookup = np.zeros(count + 1, dtype=bool)
    lookup[outside_labels] = True
    return np.asarray(lookup[labels], dtype=bool)


def lung_components(
    inner_air: BoolArray,
    mean: npt.NDArray[np.float32],
    voxel_ml: float,
    z_mm: npt.NDArray[np.float64],
) -> BoolArray:
    """The components of air inside the body that are lungs (with their airways).

    A lung is air with tissue in it: its mean is about -850 HU (vessels, interstitium),
    far from the -1000 HU of gas in the stomach, the bowel or a gap under the patient.
    """
    labels, count = ndimage.label(inner_air)
    if count == 0:
        return np.zeros_like(inner_air)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    sizes = voxels * voxel_ml
    means = np.bincount(labels.ravel(), weights=mean.ravel(), minlength=count + 1)[1:] / np.maximum(
        voxels, 1
    )
    objects = ndimage.find_objects(labels)
    h, w = inner_air.shape[1:]
    # No lung reaches across the whole field of view (a gap in the table does).
    across = np.array(
        [
            box is not None
            and (
                (box[1].start == 0 and box[1].stop == h) or (box[2].start == 0 and box[2].stop == w)
            )
            for box in objects
        ]
    )
    lung_like = (sizes >= MIN_LUNG_ML) & (means > PURE_GAS_HU) & ~across
    if not lung_like.any():
        return np.zeros_like(inner_air)
    largest = int(np.argmax(np.where(lung_like, sizes, 0.0)))
    span = z_mm[objects[largest][0].start : objects[largest][0].stop]
    z_lo, z_hi = float(span.min()), float(span.max())
    floor = z_lo + 0.25 * (z_hi - z_lo)
    keep = np.zeros(count + 1, dtype=bool)
    for i in np.nonzero(lung_like & (sizes >= MIN_LUNG_FRACTION * sizes[largest]))[0]:
        # The height of its bounding box's centre.
        height = float(z_mm[objects[i][0]].mean())
        if i == largest or height >= floor:
            keep[i + 1] = True
    return np.asarray(keep[labels], dtype=bool)


def split_sides(
    lungs: BoolArray, col_x: npt.NDArray[np.float64], midline_x: float, voxel_ml: float
) -> tuple[BoolArray, BoolArray]:
    """Right and left lung (patient sides from the LPS x of each column)."""
    labels, count = ndimage.label(lungs)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        order = np.argsort(sizes)[::-1]
        if count >= 2 and sizes[order[1]] >= MIN_LUNG_FRACTION * sizes[order[0]]:
            a, b = labels == order[0] + 1, labels == order[1] + 1
            # Mean x of each piece, from its column counts.
            xa = float(col_x @ a.sum(axis=(0, 1)) / max(int(sizes[order[0]]), 1))
            xb = float(col_x @ b.sum(axis=(0, 1)) / max(int(sizes[order[1]]), 1))
            if (xa - midline_x) * (xb - midline_x) < 0:
                # Smaller pieces go to the side of their centre.
                rest = lungs & ~a & ~b
                right, left = (a, b) if xa < xb else (b, a)
                rest_x = col_x[None, None, :]
                return right | (rest & (rest_x < midline_x)), left | (rest & (rest_x >= midline_x))
    # One piece (lungs touching at a junction line): split each slice at its narrowest
    # column within 40 mm of the midline.
    right = np.zeros_like(lungs)
    left = np.zeros_like(lungs)
    near_mid = np.nonzero(np.abs(col_x - midline_x) <= 40.0)[0]
    for k in range(lungs.shape[0]):
        if not lungs[k].any():
            continue
        split_x = midline_x
        if near_mid.size:
            profile = lungs[k][:, near_mid].sum(axis=0)
            # A junction line is a narrowing; without one, the midline.
            if profile.min() < 0.5 * profile.max():
                split_x = float(col_x[near_mid[int(np.argmin(profile))]])
        is_left = (col_x >= split_x)[None, :]
        right[k] = lungs[k] & ~is_left
        left[k] = lungs[k] & is_left
    return right, left


def fill_lung(lung: BoolArray, spacing: tuple[float, float, float]) -> BoolArray:
    """In-plane closing (radius :data:`CLOSING_MM`) and hole filling of one lung,
    within its bounding box."""
    if not lung.any():
        return lung
    radius = max(1, round(CLOSING_MM / min(spacing[1], spacing[2])))
    zs, ys, xs = (np.nonzero(lung.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
    box = (
        slice(int(zs[0]), int(zs[-1]) + 1),
        slice(max(int(ys[0]) - radius, 0), int(ys[-1]) + radius + 1),
        slice(max(int(xs[0]) - radius, 0), int(xs[-1]) + radius + 1),
    )
    crop = np.pad(lung[box], ((0, 0), (radius, radius), (radius, radius)))
    closed = ~dilate_octagon(~dilate_octagon(crop, radius), radius)
    closed = closed[:, radius:-radius, radius:-radius] | lung[box]
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    out = np.zeros_like(lung)
    out[box] = ndimage.binary_fill_holes(closed, structure=in_plane)
    return out
