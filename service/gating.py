"""Where a finding may lie: the lung field (or pleura) with its tolerance, lobes, midline.

:class:`AnalysisContext` is what every finding of one analysis shares, computed once:
the region a finding is gated on, the lobe of each voxel, and the body midline for
laterality.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from model.labels import Abnormality
from service.findings import BoolArray, Laterality, PostprocessOptions
from service.lung_field import LungField
from service.volume import SourceVolume

__all__ = ["AnalysisContext", "laterality"]

# Voxels whose centre is this close (mm) to the body midline count as midline.
_MIDLINE_MM = 5.0


def _midline_x(volume: SourceVolume) -> float:
    """LPS x (mm) of the body midline: centroid of the body, else the field-of-view centre."""
    step = 4
    body = volume.hu[::step, ::step, ::step] > -500.0
    if body.any():
        centre = np.array(ndimage.center_of_mass(body)) * step
    else:
        centre = (np.array(volume.shape) - 1) / 2.0
    return float((volume.affine_lps @ np.array([*centre, 1.0]))[0])


def laterality(x: float, midline: float) -> Laterality:
    # LPS: +x points to the patient's left.
    if abs(x - midline) < _MIDLINE_MM:
        return "midline"
    return "left" if x > midline else "right"


@dataclass
class AnalysisContext:
    """What every finding of one analysis shares (computed once, on first use)."""

    volume: SourceVolume
    options: PostprocessOptions
    lungs: LungField | None
    _midline: float | None = None
    _near: dict[bool, BoolArray] = field(default_factory=dict)

    @property
    def midline(self) -> float:
        if self._midline is None:
            self._midline = _midline_x(self.volume)
        return self._midline

    def allowed(
        self, abnormality: Abnormality, box: tuple[slice, slice, slice]
    ) -> BoolArray | None:
        """Where in ``box`` the finding may lie; ``None``: anywhere (no anatomy)."""
        if self.lungs is None:
            return None
        if abnormality.site == "pleura":
            return np.asarray(self.lungs.sample(self.lungs.pleura, box), dtype=bool)
        dense = abnormality.pattern == "focal"
        if dense not in self._near:
            self._near[dense] = self.lungs.near(self.options.lung_tolerance_mm, dense=dense)
        return np.asarray(self.lungs.sample(self._near[dense], box), dtype=bool)

    def lobes(self, box: tuple[slice, slice, slice]) -> npt.NDArray[np.uint8]:
        """Lobe codes of the source voxels of ``box`` (zeros without anatomy)."""
        if self.lungs is None:
            return np.zeros(tuple(s.stop - s.start for s in box), dtype=np.uint8)
        return np.asarray(self.lungs.sample(self.lungs.lobes, box), dtype=np.uint8)
