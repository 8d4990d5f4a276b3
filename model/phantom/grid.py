"""The voxel grid a phantom is rendered on, and the two ways of choosing one.

A :class:`Grid` is axis-aligned with the patient: array axis 0 (slice ``i``) runs
inferior -> superior (+z), axis 1 (row ``j``) anterior -> posterior (+y), axis 2
(column ``k``) right -> left (+x), all in DICOM's LPS patient coordinates (mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from model.phantom.case import CaseSpec

#: Slice spacings (mm) a realistic series may have.
REALISTIC_SLICE_SPACINGS: tuple[float, ...] = (0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5)


@dataclass(frozen=True)
class Grid:
    """The voxel grid of a rendered series.

    Parameters
    ----------
    shape
        ``(slices D, rows H, cols W)``.
    pixel_spacing
        ``(row spacing, column spacing)`` in mm.
    slice_spacing
        Distance between slice centres (mm).
    slice_thickness
        Nominal reconstructed thickness (mm), at least the spacing; sets the
        partial-volume blur along z.
    origin_lps
        LPS position (mm) of the centre of voxel ``(0, 0, 0)``.
    """

    shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float
    origin_lps: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid shape must be three positive sizes, got {self.shape}")
        if min(self.pixel_spacing) <= 0 or self.slice_spacing <= 0 or self.slice_thickness <= 0:
            raise ValueError("grid spacings and thickness must be positive")

    @property
    def affine_lps(self) -> npt.NDArray[np.float64]:
        """4x4 matrix from voxel index ``(i slice, j row, k col)`` to LPS (mm)."""
        affine = np.zeros((4, 4), dtype=np.float64)
        affine[2, 0] = self.slice_spacing
        affine[1, 1] = self.pixel_spacing[0]
        affine[0, 2] = self.pixel_spacing[1]
        affine[:3, 3] = self.origin_lps
        affine[3, 3] = 1.0
        return affine

    @property
    def voxel_volume(self) -> float:
        """Volume (mm^3) of one voxel, using the slice thickness."""
        return self.pixel_spacing[0] * self.pixel_spacing[1] * self.slice_thickness

    def axis_mm(self, axis: int) -> npt.NDArray[np.float32]:
        """Patient coordinate (mm) of each voxel centre along ``axis`` (0 = z, 1 = y, 2 = x).

        The array is shared between calls and read-only.
        """
        return _axis_mm(self, axis)

    def index_range(self, axis: int, lo_mm: float, hi_mm: float) -> slice:
        """Indices along ``axis`` whose voxel centres lie in ``[lo_mm, hi_mm]`` (clipped)."""
        lps_index = (2, 1, 0)[axis]
        step = (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])[axis]
        origin = self.origin_lps[lps_index]
        start = max(0, math.ceil((lo_mm - origin) / step - 1e-6))
        stop = min(self.shape[axis], math.floor((hi_mm - origin) / step + 1e-6) + 1)
        return slice(start, max(start, stop))

    def nearest_index(self, point_lps: tuple[float, float, float]) -> tuple[int, int, int]:
        """Voxel index nearest to an LPS point, clipped to the grid."""
        x, y, z = point_lps
        steps = (self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1])
        values = (z, y, x)
        origins = (self.origin_lps[2], self.origin_lps[1], self.origin_lps[0])
        idx = [
            min(n - 1, max(0, round((v - o) / s)))
            for v, o, s, n in zip(values, origins, steps, self.shape, strict=True)
        ]
        return (idx[0], idx[1], idx[2])


@lru_cache(maxsize=64)
def _axis_mm(grid: Grid, axis: int) -> npt.NDArray[np.float32]:
    lps_index = (2, 1, 0)[axis]
    step = (grid.slice_spacing, grid.pixel_spacing[0], grid.pixel_spacing[1])[axis]
    n = grid.shape[axis]
    out = (grid.origin_lps[lps_index] + step * np.arange(n, dtype=np.float64)).astype(np.float32)
    out.flags.writeable = False
    return out


def _fov_grid(
    spec: CaseSpec,
    rng: np.random.Generator,
    matrix: int,
    pixel: float,
    z_lo: float,
    z_hi: float,
    slice_spacing: float,
    slice_thickness: float,
) -> Grid:
    """A square in-plane field of view centred near the body, and slices over ``[z_lo, z_hi]``."""
    anat = spec.anatomy
    fov = matrix * pixel
    x_half, y_lo, y_hi = anat.body_extent_xy()
    # Slack left around the body, split at random between the two sides (position offset).
    slack_x = max(0.0, fov - 2.0 * x_half - 10.0)
    slack_y = max(0.0, fov - (y_hi - y_lo) - 10.0)
    x0 = anat.center_x - x_half - 5.0 - float(rng.uniform(0.0, slack_x))
    y0 = y_lo - 5.0 - float(rng.uniform(0.0, slack_y))
    n_slices = max(1, math.ceil((z_hi - z_lo) / slice_spacing) + 1)
    return Grid(
        shape=(n_slices, matrix, matrix),
        pixel_spacing=(pixel, pixel),
        slice_spacing=slice_spacing,
        slice_thickness=slice_thickness,
        origin_lps=(x0 + pixel / 2.0, y0 + pixel / 2.0, z_lo),
    )


def _fit_pixel(
    needed_mm: float, matrix: int, lo: float, hi: float, rng: np.random.Generator
) -> float:
    """A pixel size in ``[lo, hi]`` so that ``matrix`` pixels cover ``needed_mm`` when possible."""
    low = min(hi, max(lo, needed_mm / matrix))
    return round(float(rng.uniform(low, hi)), 4)


def training_grid(spec: CaseSpec, rng: np.random.Generator) -> Grid:
    """A coarse, fast grid: 160-192 matrix, 2.0-2.6 mm pixels, 2.5-5 mm slices over the lungs.

    Parameters
    ----------
    spec
        The case; its anatomy sets the field of view and the z range.
    rng
        Source of the acquisition choices.
    """
    anat = spec.anatomy
    x_half, y_lo, y_hi = anat.body_extent_xy()
    needed = max(2.0 * x_half, y_hi - y_lo) + 20.0
    matrix = int(rng.integers(20, 25)) * 8  # 160..192
    pixel = _fit_pixel(needed, matrix, 2.0, 2.6, rng)
    if matrix * pixel < needed:
        matrix = math.ceil(needed / pixel / 8.0) * 8
    slice_spacing = round(float(rng.uniform(2.5, 5.0)), 3)
    thickness = slice_spacing if rng.random() < 0.7 else round(min(5.0, slice_spacing * 1.25), 3)
    thickness = max(thickness, slice_spacing)
    z_lo = anat.z_base - float(rng.uniform(10.0, 30.0))
    z_hi = anat.z_apex + float(rng.uniform(10.0, 30.0))
    return _fov_grid(spec, rng, matrix, pixel, z_lo, z_hi, slice_spacing, thickness)


def realistic_grid(spec: CaseSpec, rng: np.random.Generator) -> Grid:
    """A clinical-looking grid: 512 x 512, 0.6-0.9 mm pixels, 0.625-2.5 mm slices over the chest.

    The number of slices is kept in about 120-500 by the choice of slice spacing.

    Parameters
    ----------
    spec
        The case; its anatomy sets the field of view and the z range.
    rng
        Source of the acquisition choices.
    """
    anat = spec.anatomy
    x_half, y_lo, y_hi = anat.body_extent_xy()
    needed = max(2.0 * x_half, y_hi - y_lo) + 20.0
    pixel = _fit_pixel(needed, 512, 0.6, 0.9, rng)
    z_lo = anat.z_base - float(rng.uniform(20.0, 60.0))
    z_hi = anat.z_apex + float(rng.uniform(20.0, 50.0))
    extent = z_hi - z_lo
    fitting = [s for s in REALISTIC_SLICE_SPACINGS if 120 <= extent / s + 1 <= 500]
    if not fitting:
        fitting = [min(REALISTIC_SLICE_SPACINGS, key=lambda s: abs(extent / s - 300.0))]
    slice_spacing = float(fitting[int(rng.integers(len(fitting)))])
    thicker = [s for s in REALISTIC_SLICE_SPACINGS if slice_spacing < s <= 2.0 * slice_spacing]
    thickness = slice_spacing
    if thicker and rng.random() < 0.3:
        thickness = float(thicker[int(rng.integers(len(thicker)))])
    return _fov_grid(spec, rng, 512, pixel, z_lo, z_hi, slice_spacing, thickness)


def grid_summary(grid: Grid) -> dict[str, Any]:
    """A JSON-ready description of a grid (for logs)."""
    return {
        "shape": list(grid.shape),
        "pixel_spacing": list(grid.pixel_spacing),
        "slice_spacing": grid.slice_spacing,
        "slice_thickness": grid.slice_thickness,
        "origin_lps": list(grid.origin_lps),
    }
