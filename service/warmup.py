"""Warm the analysis path once at start-up, so the first real series is not the slowest.

The first pass through the pipeline in a process pays for things no later pass does:
the inference engine's first run (memory arenas, kernel selection), highdicom's and
pydicom's tables of the standard, SciPy's and NumPy's first calls. :func:`warm_up` runs
one small synthetic chest CT (two lungs and a nodule, analytic, no patient) through
every stage, writing nothing but a temporary folder and sending nothing, before the
node reports ready.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from engines.base import Engine
from model.card import ModelCard
from model.phantom.dicom_series import write_ct_series
from service.pipeline import OutputOptions, analyse_series

logger = logging.getLogger(__name__)

#: Slices, rows and columns of the warm-up volume, and its voxel size (mm).
_SHAPE = (48, 128, 128)
_SPACING = (5.0, 2.8, 2.8)


def synthetic_chest() -> tuple[npt.NDArray[np.int16], npt.NDArray[np.float64]]:
    """An analytic chest: body, two lungs with a nodule; ``(hu, affine_lps)``."""
    d, h, w = _SHAPE
    z, y, x = np.meshgrid(
        (np.arange(d) - d / 2) * _SPACING[0],
        (np.arange(h) - h / 2) * _SPACING[1],
        (np.arange(w) - w / 2) * _SPACING[2],
        indexing="ij",
    )
    hu = np.full(_SHAPE, -1000, dtype=np.int16)
    hu[(x / 160) ** 2 + (y / 110) ** 2 < 1] = 40
    for side in (-1, 1):
        lung = ((x - side * 75) / 55) ** 2 + (y / 80) ** 2 + (z / 100) ** 2 < 1
        hu[lung] = -850
    hu[(x + 75) ** 2 + (y + 10) ** 2 + (z - 20) ** 2 < 8**2] = 30
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, _SPACING[0]]
    affine[:3, 1] = [0.0, _SPACING[1], 0.0]
    affine[:3, 2] = [_SPACING[2], 0.0, 0.0]
    affine[:3, 3] = [-w / 2 * _SPACING[2], -h / 2 * _SPACING[1], -d / 2 * _SPACING[0]]
    return hu, affine


def warm_up(engine: Engine, card: ModelCard, options: OutputOptions) -> float:
    """Run the synthetic chest through every stage; return the seconds it took."""
    start = time.perf_counter()
    hu, affine = synthetic_chest()
    with tempfile.TemporaryDirectory(prefix="unict-warmup-") as tmp:
        paths = write_ct_series(
            hu, affine, Path(tmp), patient_name="Warm^Up", patient_id="WARMUP"
        )
        analyse_series(paths, engine, card, options)
    seconds = time.perf_counter() - start
    logger.info("analysis path warmed up in %.2f s", seconds)
    return seconds
