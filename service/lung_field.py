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

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.lung_airway import airways
from service.lung_body import (
    AIR_HU,
    CLOSING_MM,
    MIN_LUNG_FRACTION,
    MIN_LUNG_ML,
    PURE_GAS_HU,
    fill_lung,
    lung_components,
    outside_air,
    split_sides,
)
from service.lung_grid import (
    LAA_HU,
    WORK_MM,
    BoolArray,
    block_reduce,
    dilate_line,
    dilate_mm,
    dilate_octagon,
    grid_factors,
    grown_box,
)
from service.lung_lobes import (
    LEFT_LOBES,
    LOBE_NAMES,
    RIGHT_LOBES,
    Side,
    geometric_lobes,
    lobe_side,
    mediastinum,
)

__all__ = [
    "AIR_HU",
    "CLOSING_MM",
    "DENSE_RIM_MM",
    "LAA_HU",
    "LEFT_LOBES",
    "LOBE_NAMES",
    "MIN_LUNG_FRACTION",
    "MIN_LUNG_ML",
    "PLEURAL_DEPTH_MM",
    "PLEURAL_RIM_MM",
    "PURE_GAS_HU",
    "RIGHT_LOBES",
    "WORK_MM",
    "BoolArray",
    "LungField",
    "Side",
    "dilate_mm",
    "lobe_side",
    "lung_field",
]

logger = logging.getLogger(__name__)

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
        return np.asarray(zone & self.body & ~mediastinum(self.lobes))

    def near(self, tolerance_mm: float, *, dense: bool = False) -> BoolArray:
        """The aerated (or, with ``dense``, the extended) lungs grown by about
        ``tolerance_mm`` on the working grid: an in-plane octagon and a run along the
        slices (a cylinder, not a ball: cheap)."""
        radius_z = math.floor(tolerance_mm / self.spacing[0])
        radius_xy = math.floor(tolerance_mm / min(self.spacing[1], self.spacing[2]))
        base = self.extended if dense else self.lungs
        return dilate_octagon(dilate_line(base, 0, radius_z), radius_xy)

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
    factors = grid_factors(spacing_src)  # type: ignore[arg-type]
    mean, count, low = block_reduce(hu, factors)
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
    outside = outside_air(air)
    inner = air & ~outside
    lungs = lung_components(inner, mean, voxel_ml, z_mm)
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
    airway = airways(lungs, mean, spacing, midline_col, z_mm)  # type: ignore[arg-type]
    if airway.any():
        # One voxel more all round takes the airway wall's partial volume with it.
        airway = dilate_octagon(dilate_line(airway, 0, 1), 1)
    lungs &= ~airway
    right, left = split_sides(lungs, col_x, midline_x, voxel_ml)
    right_filled = fill_lung(right, spacing)  # type: ignore[arg-type]
    left_filled = fill_lung(left, spacing) & ~right_filled  # type: ignore[arg-type]
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
    closed = mediastinum(sides) | airway | outside
    tissue = (mean > DENSE_MIN_HU) & (mean <= DENSE_MAX_HU) & ~closed
    rim_z = math.floor(DENSE_RIM_MM / spacing[0])
    rim_xy = math.floor(DENSE_RIM_MM / min(spacing[1], spacing[2]))
    # Within the lungs' bounding box grown by the rim: the dilations are the costly part.
    box = grown_box(aerated, (rim_z, rim_xy, rim_xy))
    right_ext, left_ext = right_filled.copy(), left_filled.copy()
    right_rim = dilate_octagon(dilate_line(right_filled[box], 0, rim_z), rim_xy)
    right_ext[box] |= right_rim & tissue[box] & ~left_filled[box]
    left_rim = dilate_octagon(dilate_line(left_filled[box], 0, rim_z), rim_xy)
    left_ext[box] |= left_rim & tissue[box] & ~right_ext[box]
    lobes = geometric_lobes(right_ext, "right", z_mm, y_mm) | geometric_lobes(
        left_ext, "left", z_mm, y_mm
    )
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
