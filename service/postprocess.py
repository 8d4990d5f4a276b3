"""From model outputs to findings on the source grid, as a radiologist reports them.

A finding is *present* when its probability reaches the model card's threshold. Only
present findings get a mask: the model-grid segmentation probability is resampled onto
the source voxels (:func:`model.transforms.to_source_grid`) inside the bounding box of
its above-threshold region and thresholded. Then anatomy and practice decide what of it
is reported (the lung field comes from :mod:`service.lung_field`):

- **Where it can be.** A finding of the lungs keeps only voxels in the lung field or
  within :attr:`PostprocessOptions.lung_tolerance_mm` of it (juxtapleural lesions); a
  pleural finding only voxels of the pleural zone. The masks, volumes, SEG and SR all
  follow from the gated masks. When no lung field is found (not a chest CT as expected),
  nothing is gated and the analysis says so.
- **Diffuse or focal** (the card's ``pattern``). A diffuse finding (emphysema,
  ground-glass, septal thickening, micronodules, bronchial wall thickening,
  bronchiectasis) is one :class:`Extent`: volume, percent of each lung, lobes involved.
  A focal finding (nodule, consolidation, linear opacity, effusion) is split into
  lesions (26-connected components). A lesion of the lungs must lie mostly in the lung
  field itself (not only in the tolerance band), its boundary is moved onto its own
  tissue within a model voxel (:func:`service.lesion_shape.refine_to_tissue`), and a
  nodule must be blob-like (:func:`service.lesion_shape.blob_ratio`: vessels and
  fissures are not). Lesions under the card's minimum size are dropped; the largest
  :attr:`PostprocessOptions.max_lesions` are itemised and the rest counted.
- Without a lung field (a series that is not a chest CT as expected) none of this
  applies: the model's masks are reported as they are, and the SR says the lung field
  was not found.
- Each lesion is measured the way a reader would: volume, longest diameter in the image
  plane (axial for an axial series), centroid in patient coordinates, and the lobe that
  holds most of it (geometric lobes, :mod:`service.lung_field`).

The report text is then made to agree with these findings (:mod:`service.report_text`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from engines.base import InferenceResult
from model.card import LabelCard, ModelCard
from model.labels import Abnormality, Pattern
from model.transforms import LPS_TO_RAS, ModelInput, to_source_grid
from service.lesion_shape import blob_ratio, refine_to_tissue
from service.lung_field import LOBE_NAMES, LungField, Side, lobe_side, lung_field
from service.measure import longest_axial_diameter
from service.report_text import reconcile_report
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
Laterality = Literal["left", "right", "midline"]

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
# Voxels whose centre is this close (mm) to the body midline count as midline.
_MIDLINE_MM = 5.0
#: A lesion of the lungs has at least this fraction of its voxels in the lung field
#: itself: what lies only in the tolerance band is chest wall, bone or mediastinum.
MIN_IN_LUNG_FRACTION = 0.5
#: A nodule candidate is blob-like at least this much (``blob_ratio``; a sphere is
#: about 1, vessels and fissures below 0.2; on LIDC-IDRI-0001 the readers' nodule
#: scores 0.60 and the nine vessel and bone look-alikes -0.27 to 0.28).
MIN_NODULE_BLOB_RATIO = 0.35
#: Findings whose lesions must pass the blob test.
BLOB_FINDINGS = frozenset({"nodule"})
#: A lesion of another focal finding that lies mostly (this fraction of its voxels or
#: more) in a nodule is that nodule seen by a less specific head (a mass is not also a
#: consolidation); it is not reported twice.
MAX_NODULE_OVERLAP = 0.5
#: A lobe is involved by a diffuse finding that has at least this fraction of its volume
#: there (the lobe holding most of it always is).
MIN_LOBE_FRACTION = 0.10


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


# ------------------------------------------------------------------ resampling


def _model_to_source_index(
    model_input: ModelInput, volume: SourceVolume
) -> npt.NDArray[np.float64]:
    """4x4 map from model-grid voxel index to source voxel index."""
    ras_to_index = np.linalg.inv(volume.affine_lps) @ LPS_TO_RAS
    return np.asarray(ras_to_index @ model_input.affine_ras, dtype=np.float64)


def _source_box(
    model_box: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]],
    model_to_source: npt.NDArray[np.float64],
    shape: tuple[int, int, int],
) -> tuple[slice, slice, slice] | None:
    """Source-grid slices covering a (dilated) model-grid box, or ``None`` when outside."""
    lo, hi = model_box
    corners = np.array(
        [
            [c0, c1, c2, 1.0]
            for c0 in (lo[0], hi[0])
            for c1 in (lo[1], hi[1])
            for c2 in (lo[2], hi[2])
        ],
        dtype=np.float64,
    )
    mapped = (model_to_source @ corners.T)[:3]
    start = np.maximum(np.floor(mapped.min(axis=1)).astype(int), 0)
    stop = np.minimum(np.ceil(mapped.max(axis=1)).astype(int) + 1, np.array(shape))
    if np.any(stop <= start):
        return None
    return (
        slice(int(start[0]), int(stop[0])),
        slice(int(start[1]), int(stop[1])),
        slice(int(start[2]), int(stop[2])),
    )


def _probability_on_source(
    probability: npt.NDArray[np.float32],
    model_input: ModelInput,
    volume: SourceVolume,
    mask_threshold: float,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.float32]] | None:
    """Resample one model-grid probability map into a source-grid box.

    Only the region above ``mask_threshold`` (dilated by one model voxel, so trilinear
    interpolation sees its true neighbours) is resampled; outside it the resampled value
    cannot exceed the threshold, so the thresholded mask is the same as a full resample.
    With a ``stride``, the map is sampled once per block of ``stride`` source voxels (at
    the block's centre) and the value repeated over the block: enough for maps much
    coarser than the source (the model grid of ``small`` is 3 mm, a CT's pixels 0.7 mm).
    """
    above = probability > mask_threshold
    if not above.any():
        return None
    (box,) = ndimage.find_objects(above.astype(np.uint8))
    lo = np.array([max(s.start - 1, 0) for s in box])
    hi = np.array([min(s.stop, n - 1) for s, n in zip(box, probability.shape, strict=True)])
    model_to_source = _model_to_source_index(model_input, volume)
    source_box = _source_box((lo, hi), model_to_source, volume.shape)
    if source_box is None:
        return None
    crop = probability[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    model_shift = np.eye(4)
    model_shift[:3, 3] = lo
    source_shift = np.eye(4)
    source_shift[:3, 3] = [s.start for s in source_box]
    box_shape = (
        source_box[0].stop - source_box[0].start,
        source_box[1].stop - source_box[1].start,
        source_box[2].stop - source_box[2].start,
    )
    coarse_shape = tuple(-(-n // k) for n, k in zip(box_shape, stride, strict=True))
    # Each sample at the centre of the block it stands for.
    centre = np.eye(4)
    centre[:3, 3] = [(k - 1) / 2.0 for k in stride]
    resampled = to_source_grid(
        crop[None],
        np.asarray(model_input.affine_ras, dtype=np.float64) @ model_shift,
        volume.affine_lps @ source_shift @ centre @ np.diag([*stride, 1.0]),
        coarse_shape,
    )[0]
    for axis, k in enumerate(stride):
        if k > 1:
            resampled = np.repeat(resampled, k, axis=axis)
    return source_box, resampled[: box_shape[0], : box_shape[1], : box_shape[2]]


def _stride(model_input: ModelInput, volume: SourceVolume) -> tuple[int, int, int]:
    """Source voxels per sample for a map resampled at half the model grid's spacing."""
    model_spacing = np.sort(np.linalg.norm(model_input.affine_ras[:3, :3], axis=0))
    finest = float(model_spacing[0])
    return tuple(max(1, int(finest / (2.0 * s))) for s in volume.spacing)  # type: ignore[return-value]


def _grow_box(
    box: tuple[slice, slice, slice], margin: tuple[int, int, int], shape: tuple[int, int, int]
) -> tuple[slice, slice, slice]:
    return (
        slice(max(box[0].start - margin[0], 0), min(box[0].stop + margin[0], shape[0])),
        slice(max(box[1].start - margin[1], 0), min(box[1].stop + margin[1], shape[1])),
        slice(max(box[2].start - margin[2], 0), min(box[2].stop + margin[2], shape[2])),
    )


# ------------------------------------------------------------------ anatomy


def _midline_x(volume: SourceVolume) -> float:
    """LPS x (mm) of the body midline: centroid of the body, else the field-of-view centre."""
    step = 4
    body = volume.hu[::step, ::step, ::step] > -500.0
    if body.any():
        centre = np.array(ndimage.center_of_mass(body)) * step
    else:
        centre = (np.array(volume.shape) - 1) / 2.0
    return float((volume.affine_lps @ np.array([*centre, 1.0]))[0])


def _laterality(x: float, midline: float) -> Laterality:
    # LPS: +x points to the patient's left.
    if abs(x - midline) < _MIDLINE_MM:
        return "midline"
    return "left" if x > midline else "right"


@dataclass
class _Context:
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


# ------------------------------------------------------------------ focal findings


def _measure(
    component: BoolArray,
    origin: tuple[int, int, int],
    lobes: npt.NDArray[np.uint8],
    index: int,
    ctx: _Context,
) -> LesionMeasurement:
    """Measure one component (``component[0, 0, 0]`` is source voxel ``origin``)."""
    volume = ctx.volume
    row_step, col_step = volume.affine_lps[:3, 1], volume.affine_lps[:3, 2]
    key, diameter, start, end = longest_axial_diameter(component, row_step, col_step)
    long_axis = LongAxis(
        slice_index=int(origin[0] + key),
        start=(start[0] + origin[1], start[1] + origin[2]),
        end=(end[0] + origin[1], end[1] + origin[2]),
    )
    centre = np.array(ndimage.center_of_mass(component)) + np.array(origin)
    centroid = (volume.affine_lps @ np.array([*centre, 1.0]))[:3]
    voxels = int(component.sum())
    codes = np.bincount(lobes[component], minlength=6)[1:]
    lobe = int(np.argmax(codes)) + 1 if codes.any() else 0
    laterality: Laterality = (
        lobe_side(lobe) if lobe else _laterality(float(centroid[0]), ctx.midline)
    )
    return LesionMeasurement(
        label_index=index,
        lesion_number=0,
        voxel_count=voxels,
        volume_ml=voxels * volume.voxel_volume_ml,
        longest_axial_diameter_mm=diameter,
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        slice_range=(int(origin[0]), int(origin[0] + component.shape[0] - 1)),
        laterality=laterality,
        long_axis=long_axis,
        lobe=lobe,
    )


def _focal(
    index: int,
    abnormality: Abnormality,
    box: tuple[slice, slice, slice],
    raw: BoolArray,
    ctx: _Context,
    nodules: BoolArray | None,
) -> tuple[BoolArray | None, tuple[LesionMeasurement, ...], int]:
    """The lesions of a focal finding: (mask on the source grid, itemised, count).

    ``nodules`` is the reported nodule mask (source grid), when this is another finding.
    """
    volume, options = ctx.volume, ctx.options
    voxel_ml = volume.voxel_volume_ml
    # Room for the boundary to move onto the lesion's tissue.
    margin = tuple(
        math.ceil(options.refine_mm / s) if abnormality.site == "lung" else 0
        for s in volume.spacing
    )
    outer = _grow_box(box, margin, volume.shape)  # type: ignore[arg-type]
    inner = tuple(
        slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True)
    )
    candidates = np.zeros(tuple(s.stop - s.start for s in outer), dtype=bool)
    candidates[inner] = raw
    allowed = ctx.allowed(abnormality, outer)
    if allowed is not None:
        candidates &= allowed
    lobes = ctx.lobes(outer)
    in_lungs = lobes > 0
    hu = volume.hu[outer]
    origin = (outer[0].start, outer[1].start, outer[2].start)
    labels, _ = ndimage.label(candidates, structure=_STRUCTURE_26)
    kept: list[tuple[BoolArray, tuple[slice, ...], LesionMeasurement]] = []
    for label, bbox in enumerate(ndimage.find_objects(labels), start=1):
        if bbox is None:
            continue
        component = labels[bbox] == label
        if component.sum() * voxel_ml < options.min_lesion_ml:
            continue
        if ctx.lungs is not None and abnormality.site == "lung":
            if in_lungs[bbox][component].mean() < MIN_IN_LUNG_FRACTION:
                continue
            # The boundary onto the lesion's own tissue, within the allowed region.
            grown = _grow_box(bbox, margin, candidates.shape)  # type: ignore[arg-type]
            local = tuple(
                slice(b.start - g.start, b.stop - g.start) for b, g in zip(bbox, grown, strict=True)
            )
            seed = np.zeros(tuple(s.stop - s.start for s in grown), dtype=bool)
            seed[local] = component
            room = allowed[grown] if allowed is not None else np.ones_like(seed)
            component = refine_to_tissue(hu[grown], seed, room, volume.spacing, options.refine_mm)
            bbox = grown
            if not component.any():
                continue
            tight = ndimage.find_objects(component.astype(np.uint8))[0]
            component = component[tight]
            bbox = tuple(
                slice(b.start + t.start, b.start + t.stop) for b, t in zip(bbox, tight, strict=True)
            )
        corner = (origin[0] + bbox[0].start, origin[1] + bbox[1].start, origin[2] + bbox[2].start)
        if nodules is not None:
            region = tuple(slice(c, c + n) for c, n in zip(corner, component.shape, strict=True))
            if nodules[region][component].mean() >= MAX_NODULE_OVERLAP:
                continue
        if ctx.lungs is not None and abnormality.key in BLOB_FINDINGS:
            ratio = blob_ratio(volume.hu, component, corner, volume.spacing)
            if ratio < MIN_NODULE_BLOB_RATIO:
                logger.debug("%s candidate dropped: blob ratio %.2f", abnormality.key, ratio)
                continue
        lesion = _measure(component, corner, lobes[bbox], index, ctx)
        if (
            lesion.longest_axial_diameter_mm < abnormality.min_diameter_mm
            or lesion.volume_ml < abnormality.min_volume_ml
        ):
            continue
        kept.append((component, bbox, lesion))
    if not kept:
        return None, (), 0
    kept.sort(key=lambda k: -k[2].voxel_count)
    mask = np.zeros(volume.shape, dtype=bool)
    for component, bbox, _ in kept:
        region = tuple(
            slice(o.start + b.start, o.start + b.stop) for o, b in zip(outer, bbox, strict=True)
        )
        mask[region] |= component
    itemised = tuple(
        dataclasses.replace(lesion, lesion_number=number)
        for number, (_, _, lesion) in enumerate(kept[: options.max_lesions], start=1)
    )
    return mask, itemised, len(kept)


# ------------------------------------------------------------------ diffuse findings


def _key_point(plane: BoolArray) -> tuple[float, float]:
    """A point inside the largest patch of a 2D mask: its pixel nearest the patch centroid."""
    labels, count = ndimage.label(plane)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    patch = labels == int(np.argmax(sizes)) + 1
    rows, cols = np.nonzero(patch)
    centre = np.array([rows.mean(), cols.mean()])
    nearest = int(np.argmin((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2))
    return float(rows[nearest]), float(cols[nearest])


def _diffuse(
    box: tuple[slice, slice, slice], raw: BoolArray, abnormality: Abnormality, ctx: _Context
) -> tuple[BoolArray | None, Extent | None]:
    """The extent of a diffuse finding: (mask on the source grid, extent)."""
    volume = ctx.volume
    mask_box = raw.copy()
    allowed = ctx.allowed(abnormality, box)
    if allowed is not None:
        mask_box &= allowed
    voxel_ml = volume.voxel_volume_ml
    # A pattern is many small pieces: only the whole of it has to reach the noise floor.
    if mask_box.sum() * voxel_ml < ctx.options.min_lesion_ml:
        return None, None
    lobes = ctx.lobes(box)
    per_lobe = np.bincount(lobes[mask_box], minlength=6)[1:] * voxel_ml
    total = float(mask_box.sum()) * voxel_ml
    involved = {int(i) + 1 for i in np.nonzero(per_lobe >= MIN_LOBE_FRACTION * total)[0]}
    if per_lobe.any():
        involved.add(int(np.argmax(per_lobe)) + 1)
    percent: dict[Side, float] = {"right": 0.0, "left": 0.0}
    if ctx.lungs is not None:
        for side in ("right", "left"):
            lung_ml = ctx.lungs.volume_ml[side]
            side_ml = sum(float(per_lobe[c - 1]) for c in LOBE_NAMES if lobe_side(c) == side)
            percent[side] = 100.0 * side_ml / lung_ml if lung_ml > 0 else 0.0
    per_slice = mask_box.sum(axis=(1, 2))
    key = int(np.argmax(per_slice))
    row, col = _key_point(mask_box[key])
    extent = Extent(
        volume_ml=total,
        percent_of_lung=percent,
        lobes=tuple(sorted(involved)),
        key_slice=box[0].start + key,
        key_point=(row + box[1].start, col + box[2].start),
    )
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = mask_box
    return mask, extent


# ------------------------------------------------------------------ the stage


def _finding(
    index: int,
    label: LabelCard,
    probability: float,
    segmentation: npt.NDArray[np.float32],
    model_input: ModelInput,
    ctx: _Context,
    nodules: BoolArray | None = None,
) -> FindingResult:
    abnormality = label.abnormality
    present = probability >= label.threshold
    mask: BoolArray | None = None
    lesions: tuple[LesionMeasurement, ...] = ()
    count = 0
    extent: Extent | None = None
    removed_ml = 0.0
    if present:
        options = ctx.options
        voxel_threshold = (
            label.mask_threshold if options.mask_threshold is None else options.mask_threshold
        )
        # Lesions' boundaries are refined on the CT afterwards, extents are coarse anyway:
        # half the model grid's spacing is all the resampling needs.
        stride = _stride(model_input, ctx.volume)
        resampled = _probability_on_source(
            segmentation, model_input, ctx.volume, voxel_threshold, stride
        )
        if resampled is not None:
            box, probability_box = resampled
            raw = probability_box > voxel_threshold
            if abnormality.pattern == "diffuse":
                mask, extent = _diffuse(box, raw, abnormality, ctx)
            else:
                mask, lesions, count = _focal(index, abnormality, box, raw, ctx, nodules)
            kept = int(mask.sum()) if mask is not None else 0
            removed_ml = max(int(raw.sum()) - kept, 0) * ctx.volume.voxel_volume_ml
        logger.info(
            "finding %s present (p=%.3f >= %.3f): %s; %.1f mL removed",
            abnormality.key,
            probability,
            label.threshold,
            f"extent {extent.volume_ml:.1f} mL" if extent else f"{count} lesion(s)",
            removed_ml,
        )
    return FindingResult(
        index=index,
        abnormality=abnormality,
        probability=probability,
        threshold=float(label.threshold),
        present=present,
        mask=mask,
        lesions=lesions,
        lesion_count=count,
        extent=extent,
        removed_ml=removed_ml,
    )


def postprocess(
    result: InferenceResult,
    model_input: ModelInput,
    volume: SourceVolume,
    card: ModelCard,
    options: PostprocessOptions | None = None,
    *,
    lungs: LungField | None = None,
) -> AnalysisResult:
    """Decide, gate, segment and measure every abnormality of the card.

    Parameters
    ----------
    result
        The engine's output for ``model_input``.
    model_input
        The preprocessed volume (its affine maps the model grid to patient space).
    volume
        The source volume the masks are produced on.
    card
        Labels, concepts, thresholds, patterns and sites.
    options
        See :class:`PostprocessOptions` (its defaults when ``None``).
    lungs
        The series' lung field, when already computed; computed here otherwise (when
        ``options.anatomy``).

    Returns
    -------
    AnalysisResult
        All findings in card order, and the report text made to agree with them.

    Raises
    ------
    ValueError
        If the result's shapes do not match the card or the model input.
    """
    options = options or PostprocessOptions()
    n = len(card.labels)
    probabilities = np.asarray(result.probabilities, dtype=np.float64).reshape(-1)
    if probabilities.shape != (n,):
        raise ValueError(
            f"engine returned {probabilities.size} probabilities; the model card has {n} labels"
        )
    segmentation = np.asarray(result.segmentation)
    if segmentation.shape != (n, *model_input.image.shape):
        raise ValueError(
            f"segmentation shape {segmentation.shape} does not match {n} labels on the model grid {model_input.image.shape}"
        )
    summary: LungSummary | None = None
    field_used: LungField | None = None
    if options.anatomy:
        if lungs is None:
            lungs = lung_field(volume.hu, volume.affine_lps)
        summary = LungSummary(lungs.found, dict(lungs.volume_ml), lungs.laa950_percent)
        if lungs.found:
            field_used = lungs
        else:
            logger.warning("no lung field found: findings are not restricted to the lungs")
    ctx = _Context(volume=volume, options=options, lungs=field_used)
    # Nodules first: another focal finding's lesion that is a nodule is not reported twice.
    order = sorted(range(n), key=lambda i: card.labels[i].abnormality.key not in BLOB_FINDINGS)
    done: dict[int, FindingResult] = {}
    nodules: BoolArray | None = None
    for index in order:
        label = card.labels[index]
        finding = _finding(
            index,
            label,
            float(probabilities[index]),
            segmentation[index],
            model_input,
            ctx,
            nodules if label.abnormality.key not in BLOB_FINDINGS else None,
        )
        if label.abnormality.key in BLOB_FINDINGS and finding.mask is not None:
            nodules = finding.mask if nodules is None else nodules | finding.mask
        done[index] = finding
    findings = tuple(done[i] for i in range(n))
    return AnalysisResult(
        findings=findings,
        report_text=reconcile_report(result.report_text, findings),
        fusion_attention=np.asarray(result.fusion_attention, dtype=np.float32),
        engine=result.engine,
        model_input_shape=tuple(int(s) for s in model_input.image.shape),
        model_report_text=result.report_text,
        lungs=summary,
    )
