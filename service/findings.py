"""What post-processing reports: findings with their lesions or extent, and its options.

Frozen records passed from :mod:`service.postprocess` to the outputs (SEG, SR, key
images), the summary and the report text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from model.labels import Abnormality, Pattern
from service.lung_field import LOBE_NAMES, Side, lobe_side

__all__ = [
    "AnalysisResult",
    "BoolArray",
    "Extent",
    "FindingResult",
    "Laterality",
    "LesionMeasurement",
    "LongAxis",
    "LungSummary",
    "PostprocessOptions",
]

BoolArray = npt.NDArray[np.bool_]
Laterality = Literal["left", "right", "midline"]


@dataclass(frozen=True)
class PostprocessOptions:
    """How model outputs become reported findings.

    Attributes
    ----------
    min_lesion_ml
        A lesion, or a whole extent, smaller than this (mL) is noise, whatever the finding.
    mask_threshold
        Probability above which a voxel is in a mask, for every class; ``None``: each
        label's ``mask_threshold`` from the card.
    max_lesions
        Lesions itemised per focal finding (largest first); the rest are counted.
    lung_tolerance_mm
        How far outside the lung field a finding of the lungs may reach.
    refine_mm
        How far a lesion's boundary may move onto its own tissue (about one voxel of
        the model grid of ``small``).
    anatomy
        Gate and locate findings with the lung field (off only for series that are not
        chest CTs, e.g. in tests).
    """

    min_lesion_ml: float = 0.05
    mask_threshold: float | None = None
    max_lesions: int = 5
    lung_tolerance_mm: float = 5.0
    refine_mm: float = 3.0
    anatomy: bool = True

    def __post_init__(self) -> None:
        if self.max_lesions < 1:
            raise ValueError(f"max_lesions must be at least 1, got {self.max_lesions}")
        if self.lung_tolerance_mm < 0 or self.refine_mm < 0:
            raise ValueError("lung_tolerance_mm and refine_mm must not be negative")



@dataclass(frozen=True)
class LongAxis:
    """Where a lesion's longest in-plane diameter lies, as a reader would draw it.

    Attributes
    ----------
    slice_index
        Source slice (index along the stack) of the cross-section with the longest
        diameter: the lesion's key slice.
    start, end
        End points as continuous ``(row, column)`` source pixel indices (pixel centres
        are integers). They are the two farthest pixel centres, each moved outwards
        along the line by a quarter of the mean pixel spacing, so that the segment is
        as long as :attr:`LesionMeasurement.longest_axial_diameter_mm`.
    """

    slice_index: int
    start: tuple[float, float]
    end: tuple[float, float]


@dataclass(frozen=True)
class LesionMeasurement:
    """One lesion (connected component) of a focal finding.

    Attributes
    ----------
    label_index
        Index of the abnormality in the model card.
    lesion_number
        1-based, largest lesion first.
    voxel_count
        Source voxels in the component.
    volume_ml
        ``voxel_count`` times the source voxel volume, in millilitres.
    longest_axial_diameter_mm
        Largest Feret diameter (mm) of the component's cross-section in any one
        source image plane (axial for an axial series), as a reader measures a long
        axis: the largest distance between pixel centres plus one pixel.
    centroid_lps
        Centre of mass in LPS patient coordinates (mm).
    slice_range
        First and last source slice index (inclusive) the lesion occupies.
    laterality
        Side of the patient: the side of its lobe, else from the centroid's x relative
        to the body midline.
    long_axis
        Key slice and end points of ``longest_axial_diameter_mm``.
    lobe
        Code of the lobe holding most of the lesion (:data:`service.lung_field.LOBE_NAMES`),
        0 when it lies outside the lungs (a pleural lesion) or no lung field was found.
    """

    label_index: int
    lesion_number: int
    voxel_count: int
    volume_ml: float
    longest_axial_diameter_mm: float
    centroid_lps: tuple[float, float, float]
    slice_range: tuple[int, int]
    laterality: Laterality
    long_axis: LongAxis
    lobe: int = 0

    @property
    def lobe_name(self) -> str:
        """The lobe's name, or ``""``."""
        return LOBE_NAMES.get(self.lobe, "")


@dataclass(frozen=True)
class Extent:
    """How much of the lungs a diffuse finding involves.

    Attributes
    ----------
    volume_ml
        Volume of its mask.
    percent_of_lung
        Percent of the right and of the left lung's volume it occupies.
    lobes
        Codes of the lobes involved (at least :data:`MIN_LOBE_FRACTION` of the finding
        there, and always the one with most), ascending.
    key_slice, key_point
        The source slice with most of it, and a point ``(row, column)`` on it inside the
        largest patch there: where a viewer marks the finding.
    """

    volume_ml: float
    percent_of_lung: Mapping[Side, float]
    lobes: tuple[int, ...]
    key_slice: int
    key_point: tuple[float, float]

    @property
    def sides(self) -> tuple[Side, ...]:
        """The sides of the lobes involved, right first."""
        return tuple(s for s in ("right", "left") if any(lobe_side(c) == s for c in self.lobes))


@dataclass(frozen=True, eq=False)
class FindingResult:
    """One abnormality: decision, and for present findings its mask and measurements.

    Attributes
    ----------
    index
        Index in the model card's label order.
    abnormality
        The card's abnormality (name, concept, colour, pattern, site).
    probability, threshold
        The model's probability and the card's decision threshold.
    present
        ``probability >= threshold``.
    mask
        ``(D, H, W)`` bool on the source grid, what is reported of the finding (every
        kept lesion, or the extent); ``None`` when the finding is absent or nothing
        of it is left.
    lesions
        Focal findings: the itemised lesions, largest first (at most ``max_lesions``).
    lesion_count
        Focal findings: every lesion kept in the mask (itemised or not).
    extent
        Diffuse findings with a mask: volume, percent of each lung, lobes.
    removed_ml
        Volume of the thresholded mask that anatomy and practice removed (outside the
        lungs or pleura, vessel look-alikes, under the minimum size).
    """

    index: int
    abnormality: Abnormality
    probability: float
    threshold: float
    present: bool
    mask: BoolArray | None
    lesions: tuple[LesionMeasurement, ...] = ()
    lesion_count: int = 0
    extent: Extent | None = None
    removed_ml: float = 0.0

    @property
    def pattern(self) -> Pattern:
        """``"focal"`` or ``"diffuse"`` (from the card)."""
        return self.abnormality.pattern

    @property
    def lobes(self) -> tuple[int, ...]:
        """Codes of the lobes the reported finding lies in, ascending."""
        if self.extent is not None:
            return self.extent.lobes
        return tuple(sorted({les.lobe for les in self.lesions if les.lobe}))

    @property
    def sides(self) -> tuple[Side, ...]:
        """Sides the reported finding lies on, right first."""
        if self.extent is not None:
            return self.extent.sides
        found = {les.laterality for les in self.lesions}
        return tuple(s for s in ("right", "left") if s in found)


@dataclass(frozen=True)
class LungSummary:
    """What the lung field says of the whole series (reported in the SR).

    Attributes
    ----------
    found
        Whether lungs were found; when not, findings were not gated.
    volume_ml
        Right and left lung volume.
    laa950_percent
        Percent of lung voxels below -950 HU (LAA-950), airways excluded.
    """

    found: bool
    volume_ml: Mapping[Side, float]
    laa950_percent: float


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """Everything the encoders need from one analysis.

    Attributes
    ----------
    findings
        All abnormalities of the card, in card order.
    report_text
        The report, made to agree with the findings (see :mod:`service.report_text`).
    fusion_attention
        ``(3, 3)`` task attention of the fusion module.
    engine
        Backend that ran the model.
    model_input_shape
        Shape of the model-grid volume.
    model_report_text
        The report as the model generated it.
    lungs
        The lung field's summary; ``None`` when anatomy was not used.
    """

    findings: tuple[FindingResult, ...]
    report_text: str
    fusion_attention: npt.NDArray[np.float32]
    engine: str
    model_input_shape: tuple[int, ...]
    model_report_text: str = ""
    lungs: LungSummary | None = None

    @property
    def present(self) -> tuple[FindingResult, ...]:
        """The present findings, in card order."""
        return tuple(f for f in self.findings if f.present)
