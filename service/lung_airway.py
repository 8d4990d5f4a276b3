"""Trachea and main bronchi, followed slice by slice from the top, to be taken out of the lungs."""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from service.lung_grid import BoolArray, dilate_octagon

__all__ = [
    "AIRWAY_BELOW_CARINA_MM",
    "AIRWAY_HU",
    "AIRWAY_WINDOW_MM",
    "MAX_AIRWAY_MM2",
    "TRACHEA_MIDLINE_MM",
    "airways",
]

#: Airway lumen on the working grid (pure air, against -850 HU parenchyma).
AIRWAY_HU = -900.0

logger = logging.getLogger(__name__)

#: Largest cross-section (mm²) of one airway branch (the adult trachea is 2-3 cm²).
MAX_AIRWAY_MM2 = 700.0
#: How far below the carina the main bronchi are followed.
AIRWAY_BELOW_CARINA_MM = 45.0

#: Half-size (mm) of the window each slice's airway is looked for in, around the one above.
AIRWAY_WINDOW_MM = 40.0

#: The trachea is looked for within this distance (mm) of the body's midline.
TRACHEA_MIDLINE_MM = 30.0


def airways(
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
        reach = dilate_octagon(previous[window][None], 1)[0]
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
