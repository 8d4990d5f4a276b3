"""The lung field of a chest CT, from its Hounsfield units alone: lungs, sides, lobes.

A deterministic segmentation, the classic one of CAD systems (Hu, Hoffman and Reinhardt,
IEEE TMI 2001), made robust to what real series vary in:

1. The volume is averaged into blocks of about :data:`WORK_MM` (in-plane and along the
   slices), so 0.6-5 mm slices and 300-700 mm fields of view give a grid of similar size.
2. Air is ``HU < -400``. Air connected to the corners of the field of view is outside the
   body (outside the reconstruction circle too, where scanners write -1024 or -2048);
   the rest is air inside the body: lungs, airways, oesophagus and bowel gas.
3. The lungs are the large components of that air with tissue in it (each at least
   :data:`MIN_LUNG_ML`, a fraction of the largest, not below the largest one's lower
   quarter, and with a mean above :data:`PURE_GAS_HU`: stomach and colon gas, or a gap
   between the patient and the table, are pure air).
4. Trachea and main bronchi are followed slice by slice from the top, as the 2D air
   components that continue the airway of the slice above (each small, like a bronchus),
   for at most :data:`AIRWAY_BELOW_CARINA_MM` below the carina, and removed.
5. Left and right: the two largest remaining components when they lie on either side,
   else each slice is split at the narrowest column near the midline (anterior and
   posterior junction lines).
6. Each lung is closed in-plane (radius :data:`CLOSING_MM`) and its holes filled, so
   vessels and nodules inside it belong to it: the aerated lung, whose volume and LAA-950
   are reported, and which diffuse findings are gated on. Then each lung takes in the
   soft tissue within :data:`DENSE_RIM_MM` of it (not fat, not bone), except in the
   mediastinum (what lies between the two lungs) and the airways: dense lung
   (consolidation, atelectasis, a mass against the pleura) is not air, but it is lung.
   Focal findings are gated on that extended field.
7. Lobes are geometric (no fissures are detected): per lung, a plane rising posteriorly
   splits lower from upper lobe (the oblique fissure's usual course, from the diaphragm
   in front to the level of the fourth thoracic vertebra at the back), and on the right
   the anterior part below the horizontal fissure's usual height is the middle lobe. Good enough to name where a lesion
   is; not a lobe segmentation.

Everything is kept on the coarse grid; :meth:`LungField.sample` maps source voxel
indices to it. The emphysema index LAA-950 is counted on the source voxels.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
Side = Literal["right", "left"]

#: Target size (mm) of one block of the working grid.
WORK_MM = 1.5
#: Below this, a voxel is air (lung parenchyma is about -850 HU, soft tissue above -100).
AIR_HU = -400.0
#: Airway lumen on the working grid (pure air, against -850 HU parenchyma).
AIRWAY_HU = -900.0
#: The LAA index threshold (percent of lung voxels below -950 HU).
LAA_HU = -950.0
#: A lung holds at least this much air (mL); smaller components are gas elsewhere.
MIN_LUNG_ML = 100.0
#: ...and at least this fraction of the largest air component...
MIN_LUNG_FRACTION = 0.15
#: ...and its mean is above this: lung parenchyma averages about -850 HU, gas -1000.
PURE_GAS_HU = -975.0
#: Largest cross-section (mm²) of one airway branch (the adult trachea is 2-3 cm²).
MAX_AIRWAY_MM2 = 700.0
#: How far below the carina the main bronchi are followed.
AIRWAY_BELOW_CARINA_MM = 45.0
#: Half-size (mm) of the window each slice's airway is looked for in, around the one above.
AIRWAY_WINDOW_MM = 40.0
#: The trachea is looked for within this distance (mm) of the body's midline.
TRACHEA_MIDLINE_MM = 30.0
#: Radius (mm) of the in-plane closing of each lung.
CLOSING_MM = 8.0
#: Soft tissue within this distance (mm) of a lung is taken for dense lung (consolidation,
#: atelectasis, a juxtapleural mass) when it is not in the mediastinum...
DENSE_RIM_MM = 15.0
#: ...and its attenuation is that of lung tissue or fluid, not of fat or bone.
DENSE_MIN_HU = -500.0
DENSE_MAX_HU = 150.0
#: The pleural zone: outside the lungs up to this depth (a large effusion is 5-8 cm deep)...
PLEURAL_DEPTH_MM = 80.0
#: ...and this rim inside the lung field (the lung's edge against an effusion is blurred).
PLEURAL_RIM_MM = 10.0

#: Lobe codes of :attr:`LungField.lobes` (0 is outside the lungs), and their names.
LOBE_NAMES: dict[int, str] = {
    1: "right upper lobe",
    2: "right middle lobe",
    3: "right lower lobe",
    4: "left upper lobe",
    5: "left lower lobe",
}
RIGHT_LOBES = (1, 2, 3)
LEFT_LOBES = (4, 5)


def lobe_side(code: int) -> Side:
    """The side of a lobe code (1-3 right, 4-5 left)."""
    return "right" if code in RIGHT_LOBES else "left"


@dataclass(frozen=True, eq=False)
class LungField:
    """Lungs, sides and lobes of one series, on a coarse grid of the source volume.

    Attributes
    ----------
    lobes
        ``(d, h, w)`` uint8 on the working grid: 0 outside the lungs (the extended field,
        dense lung included), else a code of :data:`LOBE_NAMES`.
    aerated
        ``(d, h, w)`` bool: the aerated lungs (closed, holes filled), airways excluded.
    factors
        Source voxels per working voxel along (slice, row, column).
    source_shape
        Shape of the source volume.
    spacing
        Working-grid spacing (mm) along (slice, row, column).
    volume_ml
        Volume of the right and the left aerated lung (mL).
    laa950_percent
        Percent of the lung field's source voxels below -950 HU, airways excluded (the
        standard emphysema index LAA-950; HU as stored, no smoothing).
    body
        ``(d, h, w)`` bool on the working grid: not air connected to the outside.
    """

    lobes: npt.NDArray[np.uint8]
    aerated: BoolArray
    factors: tuple[int, int, int]
    source_shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    volume_ml: dict[Side, float]
    laa950_percent: float
    body: BoolArray

    @property
    def found(self) -> bool:
        """Whether any lung was found (else the series is not a chest CT as expected)."""
        return bool(self.volume_ml["right"] + self.volume_ml["left"] > 0)

    @property
    def lungs(self) -> BoolArray:
        """``(d, h, w)`` bool: the aerated lungs."""
        return self.aerated

    @cached_property
    def extended(self) -> BoolArray:
        """``(d, h, w)`` bool: the lungs with the dense lung next to them."""
        return np.asarray(self.lobes > 0)

    @cached_property
    def pleura(self) -> BoolArray:
        """``(d, h, w)`` bool: where a pleural finding can lie.

        The body within :data:`PLEURAL_DEPTH_MM` outside either lung and the lungs' rim of
        :data:`PLEURAL_RIM_MM`, less the mediastinum (what lies between the two lungs).
        """
        lungs = self.aerated
        # Distances on a grid twice as coarse: a few millimetres do not matter here.
        coarse = lungs[::2, ::2, ::2]
        spacing = tuple(2 * s for s in self.spacing)
        outside = ndimage.distance_transform_edt(~coarse, sampling=spacing) <= PLEURAL_DEPTH_MM
        inside = ndimage.distance_transform_edt(coarse, sampling=spacing) <= PLEURAL_RIM_MM
        zone = (outside & (~coarse | inside)).repeat(2, 0).repeat(2, 1).repeat(2, 2)
        zone = zone[: lungs.shape[0], : lungs.shape[1], : lungs.shape[2]]
        return np.asarray(zone & self.body & ~_mediastinum(self.lobes))

    def near(self, tolerance_mm: float, *, dense: bool = False) -> BoolArray:
        """The aerated (or, with ``dense``, the extended) lungs grown by about
        ``tolerance_mm`` on the working grid: an in-plane octagon and a run along the
        slices (a cylinder, not a ball: cheap)."""
        radius_z = math.floor(tolerance_mm / self.spacing[0])
        radius_xy = math.floor(tolerance_mm / min(self.spacing[1], self.spacing[2]))
        base = self.extended if dense else self.lungs
        return _dilate_octagon(_dilate_line(base, 0, radius_z), radius_xy)

    def index_maps(
        self, box: tuple[slice, slice, slice]
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Working-grid indices of the source voxels of ``box``, one array per axis."""
        maps = [
            np.minimum(np.arange(s.start, s.stop) // f, n - 1)
            for s, f, n in zip(box, self.factors, self.lobes.shape, strict=True)
        ]
        return maps[0], maps[1], maps[2]

    def sample(
        self, grid: npt.NDArray[np.generic], box: tuple[slice, slice, slice]
    ) -> npt.NDArray[np.generic]:
        """Values of a working-grid array at the source voxels of ``box`` (nearest block)."""
        # Each working voxel repeated over its block, then cut to the box: far faster
        # than fancy indexing on large boxes.
        crop = grid[
            tuple(
                slice(s.start // f, min(-(-s.stop // f), n))
                for s, f, n in zip(box, self.factors, grid.shape, strict=True)
            )
        ]
        for axis, f in enumerate(self.factors):
            if f > 1:
                crop = np.repeat(crop, f, axis=axis)
        offsets = [s.start - (s.start // f) * f for s, f in zip(box, self.factors, strict=True)]
        sizes = [s.stop - s.start for s in box]
        out = crop[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))]
        if out.shape != tuple(sizes):
            # The box reaches past the last whole block: fall back to index maps.
            iz, iy, ix = self.index_maps(box)
            return grid[np.ix_(iz, iy, ix)]
        return out


def dilate_mm(mask: BoolArray, spacing: tuple[float, float, float], radius_mm: float) -> BoolArray:
    """Binary dilation of ``mask`` by an ellipsoid of ``radius_mm`` in patient mm."""
    if radius_mm <= 0:
        return mask.copy()
    radii = [max(0, math.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    ball = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing, strict=True)) <= 1.0
    return np.asarray(ndimage.binary_dilation(mask, structure=np.asarray(ball)), dtype=bool)


def _disk(radius_mm: float, spacing: tuple[float, float]) -> BoolArray:
    ry, rx = (max(1, round(radius_mm / s)) for s in spacing)
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disk: BoolArray = (y * spacing[0] / radius_mm) ** 2 + (x * spacing[1] / radius_mm) ** 2 <= 1
    return disk[None]


def _along(a: npt.NDArray[np.generic], axis: int, index: slice) -> npt.NDArray[np.generic]:
    """``a`` indexed by ``index`` along ``axis``."""
    full = [slice(None)] * a.ndim
    full[axis] = index
    return a[tuple(full)]


def _sum_blocks(
    a: npt.NDArray[np.generic], factors: tuple[int, int, int]
) -> npt.NDArray[np.generic]:
    """Sums of ``a`` over blocks of ``factors`` (the far edge blocks may be partial).

    One axis at a time, as a sum of the ``f`` strided views of that axis: vectorised adds,
    ten times faster here than a reduction over a reshaped axis of length ``f``.
    """
    out = a
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        whole = (n // f) * f

        total = _along(out, axis, slice(0, whole, f)).copy()
        for j in range(1, f):
            np.add(total, _along(out, axis, slice(j, whole, f)), out=total)
        if whole < n:
            tail = _along(out, axis, slice(whole, n)).sum(axis=axis, keepdims=True, dtype=out.dtype)
            total = np.concatenate([total, tail], axis=axis)
        out = total
    return out


def _shift_or(out: BoolArray, mask: BoolArray, axis: int, distance: int) -> None:
    """``out |= mask`` shifted by ``+distance`` and ``-distance`` along ``axis``."""
    if distance <= 0 or distance >= mask.shape[axis]:
        return
    lo = [slice(None)] * mask.ndim
    hi = [slice(None)] * mask.ndim
    lo[axis], hi[axis] = slice(None, -distance), slice(distance, None)
    out[tuple(hi)] |= mask[tuple(lo)]
    out[tuple(lo)] |= mask[tuple(hi)]


def _dilate_line(mask: BoolArray, axis: int, radius: int) -> BoolArray:
    out = mask.copy()
    for d in range(1, radius + 1):
        _shift_or(out, mask, axis, d)
    return out


def _dilate_octagon(mask: BoolArray, radius: int) -> BoolArray:
    """In-plane (axes 1, 2) dilation by an octagon of ``radius`` pixels: alternating
    3x3 cross and square steps, each a few shifted ORs."""
    out = mask
    for step in range(radius):
        if step % 2:
            out = _dilate_line(_dilate_line(out, 1, 1), 2, 1)
        else:
            grown = out.copy()
            _shift_or(grown, out, 1, 1)
            _shift_or(grown, out, 2, 1)
            out = grown
    return out


def _block_reduce(
    hu: npt.NDArray[np.float32], factors: tuple[int, int, int]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Block means of ``hu``, and per block the voxel count and the count below -950 HU.

    Blocks at the far edges are partial, so every source voxel belongs to exactly one
    block.
    """
    if factors == (1, 1, 1):
        ones = np.ones(hu.shape, dtype=np.int32)
        return hu.astype(np.float32, copy=False), ones, (hu < LAA_HU).astype(np.int32)
    per_axis = [
        np.diff(np.append(np.arange(0, n, f), n)) for n, f in zip(hu.shape, factors, strict=True)
    ]
    count = (
        per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]
    ).astype(np.int32)
    total = _sum_blocks(hu.astype(np.float32, copy=False), factors)
    low = _sum_blocks((hu < LAA_HU).astype(np.uint16), factors).astype(np.int32)
    mean = (np.asarray(total, dtype=np.float32) / count).astype(np.float32)
    return mean, count, low


def _outside_air(air: BoolArray) -> BoolArray:
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


def _lung_components(
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


def _airways(
    lungs: BoolArray,
    mean: npt.NDArray[np.float32],
    spacing: tuple[float, float, float],
    midline_col: float,
    z_mm: npt.NDArray[np.float64],
) -> BoolArray:
    """Trachea and main bronchi, followed from the top slice down (see the module doc)."""
    airway = np.zeros_like(lungs)
    pixel_mm2 = spacing[1] * spacing[2]
    max_area = MAX_AIRWAY_MM2 / pixel_mm2
    slices = [int(k) for k in np.argsort(-z_mm) if lungs[k].any()]
    if not slices:
        return airway
    # The trachea: in the top slice, a small component near the midline.
    top = slices[0]
    labels, count = ndimage.label(lungs[top])
    previous: BoolArray | None = None
    for label in range(1, count + 1):
        component = labels == label
        area = int(component.sum())
        col = float(np.nonzero(component)[1].mean())
        if area <= max_area and abs(col - midline_col) * spacing[2] <= TRACHEA_MIDLINE_MM:
            previous = component
            break
    if previous is None:
        logger.info("lung field: no trachea in the top slice; airways not removed")
        return airway
    airway[top] = previous
    carina_slice: int | None = None
    below_carina = round(AIRWAY_BELOW_CARINA_MM / spacing[0])
    # Each slice is searched in a window around the airway of the slice above: a branch
    # that reaches the window's edge is longer than a bronchus in one slice (a leak).
    margin = (round(AIRWAY_WINDOW_MM / spacing[1]), round(AIRWAY_WINDOW_MM / spacing[2]))
    height, width = lungs.shape[1:]
    for k in slices[1:]:
        rows, cols = np.nonzero(previous)
        window = (
            slice(
                max(int(rows.min()) - margin[0], 0), min(int(rows.max()) + margin[0] + 1, height)
            ),
            slice(max(int(cols.min()) - margin[1], 0), min(int(cols.max()) + margin[1] + 1, width)),
        )
        lumen = lungs[k][window] & (mean[k][window] < AIRWAY_HU)
        labels, count = ndimage.label(lumen)
        if count == 0:
            break
        reach = _dilate_octagon(previous[window][None], 1)[0]
        touched = np.unique(labels[reach & lumen])
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        current = np.zeros_like(previous)
        for label in touched[touched > 0]:
            component = labels == label
            if component.sum() <= max_area and not (
                label in edge
                and (
                    window[0].start > 0
                    or window[0].stop < height
                    or window[1].start > 0
                    or window[1].stop < width
                )
            ):
                current[window] |= component
        if not current.any():
            break
        if carina_slice is None and ndimage.label(current[window])[1] >= 2:
            carina_slice = k
        if carina_slice is not None and abs(carina_slice - k) > below_carina:
            break
        airway[k] = current
        previous = current
    return airway


def _split_sides(
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


def _fill(lung: BoolArray, spacing: tuple[float, float, float]) -> BoolArray:
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
    closed = ~_dilate_octagon(~_dilate_octagon(crop, radius), radius)
    closed = closed[:, radius:-radius, radius:-radius] | lung[box]
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    out = np.zeros_like(lung)
    out[box] = ndimage.binary_fill_holes(closed, structure=in_plane)
    return out


def _grown_box(mask: BoolArray, margin: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The bounding box of ``mask`` grown by ``margin`` voxels, within the array."""
    bounds = []
    for axis, m in enumerate(margin):
        other = tuple(a for a in range(3) if a != axis)
        present = np.nonzero(mask.any(axis=other))[0]
        n = mask.shape[axis]
        lo, hi = (int(present[0]), int(present[-1]) + 1) if present.size else (0, n)
        bounds.append(slice(max(lo - m, 0), min(hi + m, n)))
    return bounds[0], bounds[1], bounds[2]


def _mediastinum(lobes: npt.NDArray[np.uint8]) -> BoolArray:
    """On each row of each slice, what lies between the right and the left lung.

    Rows that cross one lung only between rows that cross both (the heart pushes the left
    lung aside) take the span of the nearest row that crosses both.
    """
    right = np.isin(lobes, RIGHT_LOBES)
    left = np.isin(lobes, LEFT_LOBES)
    out = np.zeros(lobes.shape, dtype=bool)
    if not right.any() or not left.any():
        return out
    w = lobes.shape[2]
    cols = np.arange(w)
    flip = np.nonzero(right)[2].mean() > np.nonzero(left)[2].mean()
    if flip:
        right, left = right[:, :, ::-1], left[:, :, ::-1]
    # Innermost column of the right lung and of the left lung on each row.
    right_inner = np.where(right.any(axis=2), w - 1 - np.argmax(right[:, :, ::-1], axis=2), -1)
    left_inner = np.where(left.any(axis=2), np.argmax(left, axis=2), -1)
    both = (right_inner >= 0) & (left_inner > right_inner)
    for k in range(lobes.shape[0]):
        rows = np.nonzero(both[k])[0]
        if rows.size == 0:
            continue
        # Rows between those that cross both lungs take the span of the nearest such row;
        # rows in front of or behind all of them (a lung pushed aside by an effusion) none.
        span = np.arange(rows[0], rows[-1] + 1)
        nearest = rows[np.clip(np.searchsorted(rows, span), 0, rows.size - 1)]
        lo, hi = right_inner[k][nearest], left_inner[k][nearest]
        out[k, span] = (cols[None, :] > lo[:, None]) & (cols[None, :] < hi[:, None])
    return out[:, :, ::-1] if flip else out


def _lobes(
    lung: BoolArray,
    side: Side,
    z_mm: npt.NDArray[np.float64],
    y_mm: npt.NDArray[np.float64],
) -> npt.NDArray[np.uint8]:
    """Geometric lobes of one lung (codes of :data:`LOBE_NAMES`)."""
    out = np.zeros(lung.shape, dtype=np.uint8)
    slices = np.nonzero(lung.any(axis=(1, 2)))[0]
    rows = np.nonzero(lung.any(axis=(0, 2)))[0]
    if slices.size == 0:
        return out
    z, y = z_mm[slices], y_mm[rows]
    # Height in the lung (0 at its base, 1 at its apex) of every slice, and front-to-back
    # position (-1 in front, 1 at the back; LPS +y is posterior) of every row.
    t = (z_mm - z.min()) / max(float(z.max() - z.min()), 1e-6)
    v = np.clip((y_mm - (y.min() + y.max()) / 2) / max(float(y.max() - y.min()) / 2, 1e-6), -1, 1)
    t3, v3 = t[:, None, None], v[None, :, None]
    # The oblique fissure runs from the diaphragm anteriorly up to about the fourth
    # thoracic vertebra posteriorly: the lower lobe holds the lowest tenth of the lung in
    # front and four fifths of it at the back.
    lower = t3 < 0.45 + 0.35 * v3
    if side == "right":
        middle = ~lower & (t3 < 0.56) & (v3 < 0.15)
        codes = np.where(lower, 3, np.where(middle, 2, 1)).astype(np.uint8)
    else:
        codes = np.where(lower, 5, 4).astype(np.uint8)
    np.copyto(out, np.broadcast_to(codes, lung.shape), where=lung)
    return out


def _factors(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(max(1, round(WORK_MM / s)) for s in spacing)  # type: ignore[return-value]


def lung_field(hu: npt.NDArray[np.float32], affine_lps: npt.NDArray[np.float64]) -> LungField:
    """Segment the lungs of a chest CT (see the module docstring).

    Parameters
    ----------
    hu
        ``(D, H, W)`` Hounsfield units, slices ascending along the normal.
    affine_lps
        Voxel index ``(slice, row, column)`` to LPS mm (as :class:`~service.volume.SourceVolume`).

    Returns
    -------
    LungField
        Empty (all zero) when no lung-like air is found: a series that is not a chest CT.
    """
    start = time.perf_counter()
    spacing_src = tuple(float(np.linalg.norm(affine_lps[:3, i])) for i in range(3))
    factors = _factors(spacing_src)  # type: ignore[arg-type]
    mean, count, low = _block_reduce(hu, factors)
    work_affine = affine_lps.copy()
    work_affine[:3, :3] = affine_lps[:3, :3] * np.array(factors)[None, :]
    # The centre of block (0, 0, 0) in source index units.
    work_affine[:3, 3] = affine_lps[:3, :3] @ ((np.array(factors) - 1) / 2.0) + affine_lps[:3, 3]
    spacing = tuple(s * f for s, f in zip(spacing_src, factors, strict=True))
    voxel_ml = abs(float(np.linalg.det(work_affine[:3, :3]))) / 1000.0
    d, h, w = mean.shape
    # Patient coordinates of each slice (z), row (y) and column (x), at the grid's centre.
    centre = np.array([(d - 1) / 2, (h - 1) / 2, (w - 1) / 2, 1.0])

    def axis_mm(axis: int, coord: int) -> npt.NDArray[np.float64]:
        n = mean.shape[axis]
        points = np.tile(centre, (n, 1))
        points[:, axis] = np.arange(n)
        return np.asarray((work_affine @ points.T)[coord], dtype=np.float64)

    z_mm, y_mm, col_x = axis_mm(0, 2), axis_mm(1, 1), axis_mm(2, 0)

    air = mean < AIR_HU
    outside = _outside_air(air)
    inner = air & ~outside
    lungs = _lung_components(inner, mean, voxel_ml, z_mm)
    empty = LungField(
        np.zeros(mean.shape, np.uint8),
        np.zeros(mean.shape, bool),
        factors,
        (int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2])),
        spacing,  # type: ignore[arg-type]
        {"right": 0.0, "left": 0.0},
        0.0,
        ~outside,
    )
    if not lungs.any():
        logger.info("lung field: no lungs found")
        return empty
    body = ~outside & (mean > AIR_HU)
    body_cols = np.nonzero(body.any(axis=(0, 1)))[0]
    midline_col = float(body_cols.mean()) if body_cols.size else (w - 1) / 2
    midline_x = float(np.interp(midline_col, np.arange(w), col_x))
    airway = _airways(lungs, mean, spacing, midline_col, z_mm)  # type: ignore[arg-type]
    if airway.any():
        # One voxel more all round takes the airway wall's partial volume with it.
        airway = _dilate_octagon(_dilate_line(airway, 0, 1), 1)
    lungs &= ~airway
    right, left = _split_sides(lungs, col_x, midline_x, voxel_ml)
    right_filled = _fill(right, spacing)  # type: ignore[arg-type]
    left_filled = _fill(left, spacing) & ~right_filled  # type: ignore[arg-type]
    # Filling must not take back the airways (they lie in the hilar concavity).
    right_filled &= ~airway
    left_filled &= ~airway
    aerated = right_filled | left_filled
    total = int(count[aerated].sum())
    laa = 100.0 * float(low[aerated].sum()) / total if total else 0.0
    # Dense lung (consolidation, atelectasis, a mass against the pleura) is not air, but it
    # is lung: soft tissue within DENSE_RIM_MM of either lung may be lung, except in the
    # mediastinum (what lies between the two lungs) and the airways. Focal findings are
    # gated on this extended field; the rib cage is not found, so chest-wall muscle within
    # the rim passes too (the shape and tissue rules of the lesions then decide).
    sides = np.where(right_filled, 1, np.where(left_filled, 4, 0)).astype(np.uint8)
    closed = _mediastinum(sides) | airway | outside
    tissue = (mean > DENSE_MIN_HU) & (mean <= DENSE_MAX_HU) & ~closed
    rim_z = math.floor(DENSE_RIM_MM / spacing[0])
    rim_xy = math.floor(DENSE_RIM_MM / min(spacing[1], spacing[2]))
    # Within the lungs' bounding box grown by the rim: the dilations are the costly part.
    box = _grown_box(aerated, (rim_z, rim_xy, rim_xy))
    right_ext, left_ext = right_filled.copy(), left_filled.copy()
    right_rim = _dilate_octagon(_dilate_line(right_filled[box], 0, rim_z), rim_xy)
    right_ext[box] |= right_rim & tissue[box] & ~left_filled[box]
    left_rim = _dilate_octagon(_dilate_line(left_filled[box], 0, rim_z), rim_xy)
    left_ext[box] |= left_rim & tissue[box] & ~right_ext[box]
    lobes = _lobes(right_ext, "right", z_mm, y_mm) | _lobes(left_ext, "left", z_mm, y_mm)
    field = LungField(
        lobes=lobes,
        aerated=aerated,
        factors=factors,
        source_shape=(int(hu.shape[0]), int(hu.shape[1]), int(hu.shape[2])),
        spacing=spacing,  # type: ignore[arg-type]
        volume_ml={
            "right": float(right_filled.sum()) * voxel_ml,
            "left": float(left_filled.sum()) * voxel_ml,
        },
        laa950_percent=laa,
        body=~outside,
    )
    logger.info(
        "lung field: right %.0f mL, left %.0f mL, LAA-950 %.1f%% (%.2f s)",
        field.volume_ml["right"],
        field.volume_ml["left"],
        laa,
        time.perf_counter() - start,
    )
    return field
