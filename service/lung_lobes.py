"""Lobe codes and geometric lobes: planes at the fissures' usual course (no fissure is
detected), and the mediastinum between the lungs.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from service.lung_grid import BoolArray

__all__ = [
    "LEFT_LOBES",
    "LOBE_NAMES",
    "RIGHT_LOBES",
    "Side",
    "geometric_lobes",
    "lobe_side",
    "mediastinum",
]

Side = Literal["right", "left"]

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


def mediastinum(lobes: npt.NDArray[np.uint8]) -> BoolArray:
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


def geometric_lobes(
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
