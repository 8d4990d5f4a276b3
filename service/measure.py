"""Measurements of one lesion the way a reader takes them: long axis, volume, centroid."""

from __future__ import annotations

import contextlib

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

BoolArray = npt.NDArray[np.bool_]

_IN_PLANE_CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)


def feret_diameter_mm(
    plane_mask: BoolArray, row_step: npt.NDArray[np.float64], col_step: npt.NDArray[np.float64]
) -> tuple[float, tuple[float, float], tuple[float, float]]:
    """Longest diameter (mm) of one 2D mask: largest centre-to-centre distance plus a pixel.

    Pixel centres underestimate an object's extent by up to a pixel and pixel corners
    overestimate it by up to a diagonal; adding one pixel to the centre distance is
    unbiased and gives a one-pixel lesion the size of a pixel.

    Returns the diameter and its end points (continuous ``(row, column)`` indices): the
    two farthest pixel centres, each moved outwards by half the added pixel.
    """
    rows, cols = np.nonzero(plane_mask)
    if rows.size == 0:
        return 0.0, (0.0, 0.0), (0.0, 0.0)
    row_mm, col_mm = float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))
    # Image axes are orthogonal (checked on load), so 2D coordinates in mm suffice.
    flat = np.stack([rows * row_mm, cols * col_mm], axis=1)
    if len(flat) > 64:
        with contextlib.suppress(QhullError):  # collinear pixels: keep them all
            flat = flat[ConvexHull(flat).vertices]
    pixel_mm = (row_mm + col_mm) / 2.0
    a = b = flat[0]
    if len(flat) > 1:
        i, j = np.unravel_index(int(np.argmax(squareform(pdist(flat)))), (len(flat), len(flat)))
        a, b = flat[i], flat[j]
    longest = float(np.linalg.norm(b - a))
    # A one-pixel lesion has no direction: draw it along the rows.
    direction = (b - a) / longest if longest > 0 else np.array([0.0, 1.0])
    start = (a - direction * pixel_mm / 2.0) / (row_mm, col_mm)
    end = (b + direction * pixel_mm / 2.0) / (row_mm, col_mm)
    return (
        longest + pixel_mm,
        (float(start[0]), float(start[1])),
        (float(end[0]), float(end[1])),
    )


def longest_axial_diameter(
    component: BoolArray, row_step: npt.NDArray[np.float64], col_step: npt.NDArray[np.float64]
) -> tuple[int, float, tuple[float, float], tuple[float, float]]:
    """The cross-section with the longest in-plane diameter of a 3D component.

    Returns its index along axis 0, the diameter (mm) and the end points
    (see :func:`feret_diameter_mm`). Only the in-plane edge of each cross-section is
    searched: the farthest points of a set lie on its boundary.
    """
    edge = component & ~ndimage.binary_erosion(component, structure=_IN_PLANE_CROSS)
    planes = [feret_diameter_mm(plane, row_step, col_step) for plane in edge]
    key = max(range(len(planes)), key=lambda k: planes[k][0])
    diameter, start, end = planes[key]
    return key, diameter, start, end
