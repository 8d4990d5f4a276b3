"""DICOM Segmentation (PS3.3 A.51) of the present findings, written with highdicom.

One segment per present finding with a non-empty mask, on the source series' frame of
reference, referencing every source instance. The segment carries the finding's coded
concept as Segmented Property Type (category SCT 49755003 "Morphologically Abnormal
Structure"), the lung as anatomic region, the card's recommended display colour, and
the model as the segmentation algorithm (PS3.3 C.8.20.2, Segment Description Macro).

Speed: highdicom checks and encodes whatever array it is given, so the array passed is
the smallest that says the same thing: only the slices that hold a mask (when empty
frames are omitted), and a label-map style 3D array (one byte per voxel, each voxel the
number of its segment) whenever the segments do not overlap, which avoids highdicom's
slow path over a 4D stack of segments. Overlapping BINARY segments fall back to the 4D
stack, cropped to the occupied slices. The array is painted from each mask's bounding
box, so only the (small) lesions are copied, never whole slices.

highdicom is given as source images only the instances of those slices, so it takes each
frame's position, and its one Derivation Image reference, from its own slice without
matching given positions against the whole series (its slow path when ``plane_positions``
are passed: every source's geometry read twice and a frame-by-instance search). The
references to the other (empty) slices are then added back as highdicom itself writes
them (:func:`_reference_all_sources`), after the same checks highdicom makes on source
images, so the SEG still references every source instance. The result is the same
dataset as giving highdicom every source and the plane positions.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import format_number_as_ds

from model.card import ModelCard
from model.labels import CodedConcept as CardConcept
from service.findings import AnalysisResult, FindingResult
from service.outputs.charset import output_character_set
from service.outputs.identity import contributing_equipment
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

#: Segmented Property Category of every segment (CID 7150).
CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
#: Anatomic Region of a segment, by the finding's site (the card's ``site``).
ANATOMIC_REGION = {"lung": codes.SCT.Lung, "pleura": codes.SCT.Pleura}


def coded(concept: CardConcept) -> hd.sr.CodedConcept:
    """A model-card concept as a highdicom coded concept."""
    return hd.sr.CodedConcept(
        value=concept.value, scheme_designator=concept.scheme, meaning=concept.meaning
    )


def default_device_serial() -> str:
    """Device Serial Number when none is configured: the node's host name.

    It is Type 1 in the Enhanced General Equipment Module (PS3.3 C.7.5.2), so it may
    not be empty.
    """
    return (socket.gethostname() or "unict-node")[:64]


def algorithm_identification(card: ModelCard) -> hd.AlgorithmIdentificationSequence:
    """Segmentation Algorithm Identification (PS3.3 C.8.20.2): family DCM 123110."""
    return hd.AlgorithmIdentificationSequence(
        name=card.name,
        family=codes.DCM.ArtificialIntelligence,
        version=card.version,
        source=card.manufacturer,
    )


def segmented_findings(analysis: AnalysisResult) -> tuple[FindingResult, ...]:
    """Present findings with a non-empty mask, in card order; segment ``i + 1`` is item ``i``."""
    return tuple(
        f for f in analysis.findings if f.present and f.mask is not None and bool(f.mask.any())
    )


def segment_descriptions(
    findings: Sequence[FindingResult], card: ModelCard
) -> list[hd.seg.SegmentDescription]:
    """One Segment Description per finding, numbered from 1."""
    algorithm = algorithm_identification(card)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=finding.abnormality.name[:64],
            segmented_property_category=CATEGORY,
            segmented_property_type=coded(finding.abnormality.concept),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=finding.abnormality.name[:64],
            tracking_uid=hd.UID(),
            anatomic_regions=[ANATOMIC_REGION[finding.abnormality.site]],
            display_color=hd.color.CIELabColor.from_rgb(*finding.abnormality.color_rgb),
        )
        for number, finding in enumerate(findings, start=1)
    ]


def _occupied_slices(masks: Sequence[npt.NDArray[np.bool_]]) -> npt.NDArray[np.bool_]:
    occupied = np.zeros(masks[0].shape[0], dtype=bool)
    for mask in masks:
        occupied |= mask.any(axis=(1, 2))
    return occupied


class _Box:
    """A mask cropped to its bounding box: ``crop`` is ``mask[slices, rows, columns]``."""

    def __init__(self, mask: npt.NDArray[np.bool_]) -> None:
        slices = np.nonzero(mask.any(axis=(1, 2)))[0]
        block = mask[slices[0] : slices[-1] + 1]
        rows = np.nonzero(block.any(axis=(0, 2)))[0]
        columns = np.nonzero(block.any(axis=(0, 1)))[0]
        self.slices = slices
        self.rows = slice(int(rows[0]), int(rows[-1]) + 1)
        self.columns = slice(int(columns[0]), int(columns[-1]) + 1)
        self.crop = mask[slices, self.rows, self.columns]


def _paint(
    labels: npt.NDArray[np.uint8],
    boxes: Sequence[_Box],
    frames: Sequence[npt.NDArray[np.intp]],
    order: Sequence[int],
) -> bool:
    """Paint segment ``i + 1`` where mask ``i`` is set, in ``order``; whether any overlap."""
    overlap = False
    for i in order:
        box = boxes[i]
        region = labels[frames[i], box.rows, box.columns]
        overlap = overlap or bool(region[box.crop].any())
        region[box.crop] = i + 1
        labels[frames[i], box.rows, box.columns] = region
    return overlap


def _pixel_array(
    masks: Sequence[npt.NDArray[np.bool_]],
    planes: npt.NDArray[np.intp],
    segmentation_type: hd.seg.SegmentationTypeValues,
) -> npt.NDArray[np.uint8]:
    """Label-map style ``(n, H, W)`` array, or a ``(n, H, W, S)`` stack when BINARY segments overlap.

    ``planes`` are the source slices kept, ascending; every set voxel of every mask must
    lie on one of them.
    """
    boxes = [_Box(mask) for mask in masks]
    # Row of the output array of each slice of each box.
    frames = [np.searchsorted(planes, box.slices) for box in boxes]
    labels = np.zeros((len(planes), *masks[0].shape[1:]), dtype=np.uint8)
    if not _paint(labels, boxes, frames, range(len(masks))):
        return labels
    if segmentation_type == hd.seg.SegmentationTypeValues.BINARY:
        stack = np.zeros((*labels.shape, len(masks)), dtype=np.uint8)
        for i, box in enumerate(boxes):
            stack[frames[i], box.rows, box.columns, i] = box.crop
        return stack
    # A label map holds one segment per pixel: paint the largest first so a small
    # finding inside a large one (a nodule in a consolidation) stays visible.
    logger.warning("findings overlap; the LABELMAP SEG shows the smaller one where they do")
    labels[:] = 0
    order = sorted(range(len(masks)), key=lambda i: -int(boxes[i].crop.sum()))
    _paint(labels, boxes, frames, order)
    return labels


def _reference_all_sources(seg: hd.seg.Segmentation, sources: Sequence[Dataset]) -> None:
    """Source Image and Referenced Series Sequences over every source, in order.

    highdicom was given only the sources of the kept frames; these are the items it
    writes for each source image (:meth:`highdicom.image._Image._add_source_image_references`),
    after the checks highdicom makes on its source images: one study, series, frame of
    reference, matrix size and orientation. Raises ``ValueError`` when they differ.
    """
    first = sources[0]
    keys = (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "Rows",
        "Columns",
        "ImageOrientationPatient",
    )
    expected = [first.get(key) for key in keys]
    for ds in sources:
        if [ds.get(key) for key in keys] != expected:
            raise ValueError(
                f"source instance {ds.SOPInstanceUID} is not of the same series, "
                "frame of reference, matrix size and orientation as the others"
            )
    items = []
    for ds in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    seg.SourceImageSequence = items
    (series,) = seg.ReferencedSeriesSequence
    if series.SeriesInstanceUID != first.SeriesInstanceUID:
        raise ValueError("the SEG references another series than its sources")
    series.ReferencedInstanceSequence = items


def build_seg(
    volume: SourceVolume,
    analysis: AnalysisResult,
    card: ModelCard,
    *,
    series_number: int,
    series_description: str,
    segmentation_type: str | hd.seg.SegmentationTypeValues = "BINARY",
    omit_empty_frames: bool = True,
    device_serial: str = "",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation | None:
    """Build the SEG instance of an analysis.

    Parameters
    ----------
    volume
        The source series (its datasets are referenced and give patient and study).
    analysis
        Findings with masks on the source grid.
    card
        Labels, colours, and the model's name, version and manufacturer.
    series_number, series_description
        Of the new SEG series.
    segmentation_type
        ``"BINARY"`` (Segmentation Storage, the compatible default) or ``"LABELMAP"``
        (Label Map Segmentation Storage, for PACS that know it). ``"FRACTIONAL"`` is
        refused: the masks are decisions, not probabilities.
    omit_empty_frames
        Leave out frames without any segmented pixel. Some viewers mis-place frames of
        sparse SEGs, so this is a setting.
    device_serial
        Device Serial Number of the node; the host name when empty.
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones when ``None``.

    Returns
    -------
    highdicom.seg.Segmentation | None
        ``None`` when no present finding has a non-empty mask.

    Raises
    ------
    ValueError
        If ``segmentation_type`` is not BINARY or LABELMAP, or the masks do not match
        the volume.
    """
    seg_type = hd.seg.SegmentationTypeValues(segmentation_type)
    if seg_type == hd.seg.SegmentationTypeValues.FRACTIONAL:
        raise ValueError("SegmentationType FRACTIONAL is not supported; use BINARY or LABELMAP")
    findings = segmented_findings(analysis)
    if not findings:
        return None
    masks = [f.mask for f in findings if f.mask is not None]
    for mask in masks:
        if mask.shape != volume.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the volume {volume.shape}")

    if omit_empty_frames:
        planes = np.nonzero(_occupied_slices(masks))[0]
    else:
        planes = np.arange(volume.shape[0])
    pixel_array = _pixel_array(masks, planes, seg_type)

    now = dt.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=[volume.datasets[int(i)] for i in planes],
        specific_character_set=output_character_set(volume.datasets[0]),
        pixel_array=pixel_array,
        segmentation_type=seg_type,
        segment_descriptions=segment_descriptions(findings, card),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=card.manufacturer,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        device_serial_number=device_serial or default_device_serial(),
        omit_empty_frames=omit_empty_frames,
        content_label="UNICT",
        content_description=f"{card.name} {card.version} findings. {card.clinical_use}"[:64],
        series_description=series_description,
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        contributing_equipment=[
            contributing_equipment(card, "Segmentation of chest CT abnormalities")
        ],
    )
    _reference_all_sources(seg, volume.datasets)
    _add_spacing_between_slices(seg, volume)
    logger.info(
        "built %s SEG %s: %d segment(s), %d frame(s) for series %s",
        seg_type.value,
        seg.SOPInstanceUID,
        len(findings),
        int(seg.NumberOfFrames),
        volume.series_instance_uid,
    )
    return seg


def _add_spacing_between_slices(seg: hd.seg.Segmentation, volume: SourceVolume) -> None:
    """Spacing Between Slices (PS3.3 C.7.6.16.2.1) when the source did not carry it.

    It tells a receiver how to rebuild the volume when empty frames were omitted.
    """
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if "SpacingBetweenSlices" in measures:
        return
    normal = np.cross(volume.affine_lps[:3, 2], volume.affine_lps[:3, 1])
    normal /= np.linalg.norm(normal)
    measures.SpacingBetweenSlices = format_number_as_ds(
        abs(float(normal @ volume.affine_lps[:3, 0]))
    )
