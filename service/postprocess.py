"""From model outputs to findings on the source grid: masks, lesions, measurements.

A finding is *present* when its probability reaches the model card's threshold. Only
present findings get a mask: the model-grid segmentation probability is resampled onto
the source voxels (:func:`model.transforms.to_source_grid`) inside the bounding box of
its above-threshold region, thresholded, and split into lesions (26-connected
components). Each lesion is measured the way a reader would: volume, longest diameter
in the image plane (axial for an axial series) and centroid in patient coordinates.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

from engines.base import InferenceResult
from model.card import ModelCard
from model.labels import Abnormality
from model.transforms import LPS_TO_RAS, ModelInput, to_source_grid
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
Laterality = Literal["left", "right", "midline"]

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_IN_PLANE_CROSS = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)
# Voxels whose centre is this close (mm) to the body midline count as midline.
_MIDLINE_MM = 5.0


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
    """One connected component of a finding's mask.

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
        Side of the patient, from the centroid's x relative to the body midline.
    long_axis
        Key slice and end points of ``longest_axial_diameter_mm``.
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


@dataclass(frozen=True, eq=False)
class FindingResult:
    """One abnormality: decision, and for present findings its mask and lesions.

    Attributes
    ----------
    index
        Index in the model card's label order.
    abnormality
        The card's abnormality (name, concept, colour).
    probability, threshold
        The model's probability and the card's decision threshold.
    present
        ``probability >= threshold``.
    mask
        ``(D, H, W)`` bool on the source grid, the union of the kept lesions; ``None``
        when the finding is absent, nothing exceeded the mask threshold, or every
        component was smaller than ``min_lesion_ml``.
    lesions
        Measurements of the kept components, largest first.
    """

    index: int
    abnormality: Abnormality
    probability: float
    threshold: float
    present: bool
    mask: BoolArray | None
    lesions: tuple[LesionMeasurement, ...]


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """Everything the encoders need from one analysis.

    Attributes
    ----------
    findings
        All abnormalities of the card, in card order.
    report_text
        The generated report.
    fusion_attention
        ``(3, 3)`` task attention of the fusion module.
    engine
        Backend that ran the model.
    model_input_shape
        Shape of the model-grid volume.
    """

    findings: tuple[FindingResult, ...]
    report_text: str
    fusion_attention: npt.NDArray[np.float32]
    engine: str
    model_input_shape: tuple[int, ...]

    @property
    def present(self) -> tuple[FindingResult, ...]:
        """The present findings, in card order."""
        return tuple(f for f in self.findings if f.present)


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
) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.float32]] | None:
    """Resample one model-grid probability map into a source-grid box.

    Only the region above ``mask_threshold`` (dilated by one model voxel, so trilinear
    interpolation sees its true neighbours) is resampled; outside it the resampled value
    cannot exceed the threshold, so the thresholded mask is the same as a full resample.
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
    resampled = to_source_grid(
        crop[None],
        np.asarray(model_input.affine_ras, dtype=np.float64) @ model_shift,
        volume.affine_lps @ source_shift,
        box_shape,
    )[0]
    return source_box, resampled


def _feret_diameter_mm(
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


def _lesions(
    box_mask: BoolArray,
    origin: tuple[int, int, int],
    index: int,
    volume: SourceVolume,
    min_lesion_ml: float,
    midline: float,
) -> tuple[BoolArray, tuple[LesionMeasurement, ...]]:
    """Split a box mask into components; drop small ones; measure the rest."""
    labels, count = ndimage.label(box_mask, structure=_STRUCTURE_26)
    if count == 0:
        return box_mask, ()
    voxel_ml = volume.voxel_volume_ml
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.nonzero(sizes * voxel_ml >= min_lesion_ml)[0] + 1
    kept_mask = np.isin(labels, keep) if len(keep) < count else box_mask
    objects = ndimage.find_objects(labels)
    row_step, col_step = volume.affine_lps[:3, 1], volume.affine_lps[:3, 2]
    measured: list[
        tuple[int, int, float, tuple[float, float, float], tuple[int, int], LongAxis]
    ] = []
    for label in keep:
        bbox = objects[label - 1]
        if bbox is None:
            continue
        component = labels[bbox] == label
        edge = component & ~ndimage.binary_erosion(component, structure=_IN_PLANE_CROSS)
        planes = [_feret_diameter_mm(plane, row_step, col_step) for plane in edge]
        key = max(range(len(planes)), key=lambda k: planes[k][0])
        diameter, start, end = planes[key]
        shift = (bbox[1].start + origin[1], bbox[2].start + origin[2])
        long_axis = LongAxis(
            slice_index=int(bbox[0].start + origin[0] + key),
            start=(start[0] + shift[0], start[1] + shift[1]),
            end=(end[0] + shift[0], end[1] + shift[1]),
        )
        local = np.array(ndimage.center_of_mass(component))
        centre = local + np.array([s.start for s in bbox]) + np.array(origin)
        centroid = (volume.affine_lps @ np.array([*centre, 1.0]))[:3]
        first = bbox[0].start + origin[0]
        measured.append(
            (
                int(label),
                int(sizes[label - 1]),
                diameter,
                (float(centroid[0]), float(centroid[1]), float(centroid[2])),
                (int(first), int(first + component.shape[0] - 1)),
                long_axis,
            )
        )
    measured.sort(key=lambda m: -m[1])
    lesions = tuple(
        LesionMeasurement(
            label_index=index,
            lesion_number=number,
            voxel_count=voxels,
            volume_ml=voxels * voxel_ml,
            longest_axial_diameter_mm=diameter,
            centroid_lps=centroid,
            slice_range=slices,
            laterality=_laterality(centroid[0], midline),
            long_axis=long_axis,
        )
        for number, (_, voxels, diameter, centroid, slices, long_axis) in enumerate(
            measured, start=1
        )
    )
    return kept_mask, lesions


def postprocess(
    result: InferenceResult,
    model_input: ModelInput,
    volume: SourceVolume,
    card: ModelCard,
    *,
    min_lesion_ml: float = 0.05,
    mask_threshold: float | None = None,
) -> AnalysisResult:
    """Decide, segment and measure every abnormality of the card.

    Parameters
    ----------
    result
        The engine's output for ``model_input``.
    model_input
        The preprocessed volume (its affine maps the model grid to patient space).
    volume
        The source volume the masks are produced on.
    card
        Labels, concepts and thresholds.
    min_lesion_ml
        Components smaller than this (mL) are dropped as noise.
    mask_threshold
        Probability above which a voxel belongs to the mask, for every class; ``None``
        (default): each label's ``mask_threshold`` from the card.

    Returns
    -------
    AnalysisResult
        All findings in card order.

    Raises
    ------
    ValueError
        If the result's shapes do not match the card or the model input.
    """
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
    midline: float | None = None
    findings: list[FindingResult] = []
    for index, label in enumerate(card.labels):
        probability = float(probabilities[index])
        present = probability >= label.threshold
        mask: BoolArray | None = None
        lesions: tuple[LesionMeasurement, ...] = ()
        if present:
            voxel_threshold = label.mask_threshold if mask_threshold is None else mask_threshold
            resampled = _probability_on_source(
                segmentation[index], model_input, volume, voxel_threshold
            )
            if resampled is not None:
                box, probability_box = resampled
                if midline is None:
                    midline = _midline_x(volume)
                origin = (box[0].start, box[1].start, box[2].start)
                box_mask, lesions = _lesions(
                    probability_box > voxel_threshold,
                    origin,
                    index,
                    volume,
                    min_lesion_ml,
                    midline,
                )
                if lesions:
                    mask = np.zeros(volume.shape, dtype=bool)
                    mask[box] = box_mask
        findings.append(
            FindingResult(
                index=index,
                abnormality=label.abnormality,
                probability=probability,
                threshold=float(label.threshold),
                present=present,
                mask=mask,
                lesions=lesions,
            )
        )
        if present:
            logger.info(
                "finding %s present (p=%.3f >= %.3f): %d lesion(s)",
                label.abnormality.key,
                probability,
                label.threshold,
                len(lesions),
            )
    return AnalysisResult(
        findings=tuple(findings),
        report_text=result.report_text,
        fusion_attention=np.asarray(result.fusion_attention, dtype=np.float32),
        engine=result.engine,
        model_input_shape=tuple(int(s) for s in model_input.image.shape),
    )
