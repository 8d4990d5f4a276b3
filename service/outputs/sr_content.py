"""The content tree of the node's TID 1500 SR, item by item (highdicom content items).

:mod:`service.outputs.sr` puts them together into the document; its docstring describes
the tree and why it is shaped so.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from model.card import ModelCard
from service.findings import (
    AnalysisResult,
    Extent,
    FindingResult,
    LesionMeasurement,
    LongAxis,
    LungSummary,
)
from service.outputs.identity import device_uid
from service.outputs.seg import coded, segmented_findings
from service.outputs.sr_codes import (
    ABSENT,
    COMMENT,
    DEFAULT_LANGUAGE,
    EXTENT,
    FINDING,
    FINDINGS,
    LAA_950,
    LATERALITY,
    LOBE_SITES,
    LONG_AXIS,
    MILLILITRE,
    MILLIMETRE,
    NO_LUNG_FIELD,
    NO_UNITS,
    NUMBER_OF_LESIONS,
    PERCENT,
    PRESENT,
    PROBABILITY,
    PROCEDURE_CT_CHEST,
    QUALITATIVE_EVALUATIONS,
    SITES,
    THRESHOLD,
    VOLUME,
)
from service.volume import SourceVolume

__all__ = [
    "extent_group",
    "laa950_method",
    "planar_group",
    "qualitative_evaluations",
    "report_root",
    "segment_numbers",
    "volumetric_group",
]


def _observation_context(card: ModelCard) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(card),
                name=card.name,
                manufacturer_name=card.manufacturer,
                model_name=card.version,
            ),
        )
    )


def _algorithm(card: ModelCard) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification.

    The manufacturer is left out here (it is in the observer context and Contributing
    Equipment): dcmqi 1.5 does not know TID 4019's Algorithm Manufacturer row.
    """
    return hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        family=codes.DCM.ArtificialIntelligence,
    )


def _lobe_site(code: int) -> hd.sr.FindingSite:
    location, laterality = LOBE_SITES[code]
    return hd.sr.FindingSite(anatomic_location=location, laterality=laterality)


def _finding_sites(finding: FindingResult, lesion: LesionMeasurement) -> list[hd.sr.FindingSite]:
    """The lesion's lobe, else the finding's site (lung or pleura) with the side."""
    if lesion.lobe in LOBE_SITES:
        return [_lobe_site(lesion.lobe)]
    return [
        hd.sr.FindingSite(
            anatomic_location=SITES[finding.abnormality.site],
            laterality=LATERALITY.get(lesion.laterality),
        )
    ]


def _tracking(
    finding: FindingResult, lesion: LesionMeasurement, uid: str
) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=uid, identifier=f"{finding.abnormality.name} lesion {lesion.lesion_number}"
    )


def _long_axis_region(axis: LongAxis, volume: SourceVolume) -> hd.sr.ImageRegion:
    """SCOORD POLYLINE of the long axis on its key slice (PS3.3 C.18.6.1.2).

    Image coordinates are ``(column, row)`` with ``(0, 0)`` the top left corner of the
    top left pixel, so a pixel centre (index ``i``) is at ``i + 0.5``.
    """
    source = volume.datasets[axis.slice_index]
    points = np.array(
        [[axis.start[1] + 0.5, axis.start[0] + 0.5], [axis.end[1] + 0.5, axis.end[0] + 0.5]]
    )
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=points,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )


def _long_axis(lesion: LesionMeasurement) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=LONG_AXIS, value=round(lesion.longest_axial_diameter_mm, 2), unit=MILLIMETRE
    )


def planar_group(
    finding: FindingResult,
    lesion: LesionMeasurement,
    tracking_uid: str,
    volume: SourceVolume,
    card: ModelCard,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: one lesion's long axis, drawn on its key slice."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding, lesion, tracking_uid),
        referenced_region=_long_axis_region(lesion.long_axis, volume),
        finding_type=coded(finding.abnormality.concept),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm(card),
        finding_sites=_finding_sites(finding, lesion),
        measurements=[_long_axis(lesion)],
    )


def volumetric_group(
    finding: FindingResult,
    lesion: LesionMeasurement,
    tracking_uid: str,
    seg: Dataset,
    segment_number: int,
    volume: SourceVolume,
    card: ModelCard,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411: one lesion, referencing its SEG segment (PS3.16 TID 1411 row 12).

    The segment holds every lesion of the finding; Referenced Frame Number cannot
    narrow it (the SR Image Reference Macro forbids it next to Referenced Segment
    Number, PS3.3 Table 10-3), so the tracking identifier names the lesion and the
    measurements are of that lesion, a connected component of the segment.
    """
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(finding, lesion, tracking_uid),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        finding_type=coded(finding.abnormality.concept),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm(card),
        finding_sites=_finding_sites(finding, lesion),
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=round(lesion.volume_ml, 4), unit=MILLILITRE),
            _long_axis(lesion),
        ],
    )


def extent_group(
    finding: FindingResult,
    extent: Extent,
    volume: SourceVolume,
    card: ModelCard,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410: a diffuse finding's extent, marked by a point inside it on its key slice."""
    source = volume.datasets[extent.key_slice]
    row, column = extent.key_point
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POINT,
        graphic_data=np.array([[column + 0.5, row + 0.5]]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        ),
    )
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=round(extent.volume_ml, 2), unit=MILLILITRE),
        *(
            hd.sr.Measurement(
                name=EXTENT,
                value=round(float(extent.percent_of_lung[side]), 2),
                unit=PERCENT,
                finding_sites=[
                    hd.sr.FindingSite(
                        anatomic_location=codes.SCT.Lung, laterality=LATERALITY[side]
                    )
                ],
            )
            for side in ("right", "left")
        ),
    ]
    sites = [_lobe_site(code) for code in extent.lobes if code in LOBE_SITES]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{finding.abnormality.name} extent"
        ),
        referenced_region=region,
        finding_type=coded(finding.abnormality.concept),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm(card),
        finding_sites=sites
        or [hd.sr.FindingSite(anatomic_location=SITES[finding.abnormality.site])],
        measurements=measurements,
    )


def segment_numbers(seg: Dataset, analysis: AnalysisResult) -> dict[int, int]:
    """Card index -> segment number, checked against the SEG's Segment Sequence."""
    findings = segmented_findings(analysis)
    by_number = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    numbers: dict[int, int] = {}
    for number, finding in enumerate(findings, start=1):
        if by_number.get(number) != finding.abnormality.name[:64]:
            raise ValueError(
                f"SEG segment {number} is not {finding.abnormality.key}: the SEG is not of this analysis"
            )
        numbers[finding.index] = number
    return numbers


def _text_property(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES
    )


def _number_property(
    name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept
) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(
        name=name,
        value=value,
        unit=unit,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )


def laa950_method(lungs: LungSummary, volume: SourceVolume) -> str:
    """How LAA-950 was measured, in words a reader can check."""
    thickness = volume.slice_thickness or volume.spacing[0]
    return (
        "LAA-950: percent of lung voxels below -950 HU, HU as stored (no smoothing), over "
        f"the automatic lung field (right {lungs.volume_ml['right']:.0f} mL, left "
        f"{lungs.volume_ml['left']:.0f} mL; trachea and main bronchi excluded), "
        f"{thickness:g} mm slices. Reconstruction kernel and slice thickness change it; "
        "above about 6% on thin sharp-kernel series is usually called emphysema."
    )


def _finding_properties(
    finding: FindingResult, analysis: AnalysisResult, volume: SourceVolume
) -> list[hd.sr.ContentItem]:
    """What row 13 says beyond Present/Absent: lesion counts, localisation, LAA-950."""
    items: list[hd.sr.ContentItem] = []
    if finding.present and finding.pattern == "focal" and finding.mask is not None:
        items.append(_number_property(NUMBER_OF_LESIONS, finding.lesion_count, NO_UNITS))
        if finding.lesion_count > len(finding.lesions):
            items.append(
                _text_property(
                    COMMENT,
                    f"The {len(finding.lesions)} largest lesions are itemised; "
                    f"{finding.lesion_count - len(finding.lesions)} more are in the SEG segment.",
                )
            )
    if finding.present and finding.mask is None:
        where = "the pleura" if finding.abnormality.site == "pleura" else "the lungs"
        items.append(
            _text_property(
                COMMENT,
                f"Not localised: the model's probability is above threshold, but nothing of "
                f"its segmentation lies in {where} at a reportable size.",
            )
        )
    lungs = analysis.lungs
    if finding.abnormality.key == "emphysema" and lungs is not None and lungs.found:
        items.append(_number_property(LAA_950, round(lungs.laa950_percent, 2), PERCENT))
        items.append(_text_property(COMMENT, laa950_method(lungs, volume)))
    return items


def _evaluation(
    finding: FindingResult, analysis: AnalysisResult, volume: SourceVolume
) -> hd.sr.CodeContentItem:
    """TID 1500 row 13: one abnormality Present or Absent, with its probability and threshold."""
    item = hd.sr.CodeContentItem(
        name=coded(finding.abnormality.concept),
        value=PRESENT if finding.present else ABSENT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    # The card's name says more than some concepts do ("Bronchial wall thickening" is
    # coded as the bronchial structure), so it goes with them, as the Finding.
    properties: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(
            name=FINDING,
            value=finding.abnormality.name,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
        )
    ]
    properties.extend(
        hd.sr.NumContentItem(
            name=name,
            value=round(value, 6),
            unit=NO_UNITS,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
        )
        for name, value in ((PROBABILITY, finding.probability), (THRESHOLD, finding.threshold))
    )
    properties.extend(_finding_properties(finding, analysis, volume))
    item.ContentSequence = hd.sr.ContentSequence(properties)
    return item


def qualitative_evaluations(
    analysis: AnalysisResult, card: ModelCard, volume: SourceVolume
) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: every abnormality (row 13), the report text and the use statement
    (row 14)."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [_evaluation(f, analysis, volume) for f in analysis.findings]
    if analysis.report_text.strip():
        items.append(
            hd.sr.TextContentItem(
                name=FINDINGS,
                value=analysis.report_text.strip(),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    comments = [card.clinical_use]
    if analysis.lungs is not None and not analysis.lungs.found:
        comments.append(NO_LUNG_FIELD)
    items.extend(
        hd.sr.TextContentItem(
            name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        for text in comments
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def report_root(
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
    card: ModelCard,
) -> Dataset:
    """TID 1500 rows 1-8; without groups, no Imaging Measurements container (row 6 is
    required only when no qualitative evaluations follow) and no highdicom template."""
    if groups:
        report = hd.sr.MeasurementReport(
            observation_context=_observation_context(card),
            procedure_reported=PROCEDURE_CT_CHEST,
            imaging_measurements=groups,
        )
        return report[0]
    root = hd.sr.ContainerContentItem(
        name=codes.cid7021.ImagingMeasurementReport, template_id="1500"
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [
            *hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),
            *_observation_context(card),
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=PROCEDURE_CT_CHEST,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
        ]
    )
    return root
