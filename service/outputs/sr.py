"""Comprehensive 3D SR with the TID 1500 Measurement Report of an analysis (highdicom).

Content tree (PS3.16 TID 1500):

- observation context: the model as a device observer (TID 1004: UID, name,
  manufacturer, model = version), as the IHE AI Results profile asks;
- procedure reported: CT chest;
- imaging measurements:

  - for each of the card's abnormalities, one TID 1501 measurement group, tracking
    identifier = abnormality name, qualitative evaluation (card concept) = Present
    (SCT 52101004) or Absent (SCT 2667000), numeric measurements Probability
    (DCM 122157) and Threshold Value (DCM 122411), unit ``1``;
  - for each lesion, one TID 1411 volumetric ROI group referencing its SEG segment
    (and the source series), with finding = card concept, finding site lung with
    laterality, Volume (mL) and Long axis (mm, longest in-plane diameter);

- qualitative evaluations (TID 1500 row 12, UMLS C0034375): the generated report as
  TEXT Findings (DCM 121070, row 14) and the clinical-use statement as a Comment.
  highdicom's :class:`~highdicom.sr.MeasurementReport` does not build row 12, so the
  container is added to its root with highdicom content items.
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from model.card import ModelCard
from service.outputs.charset import output_character_set
from service.outputs.seg import coded, contributing_equipment, segmented_findings
from service.postprocess import AnalysisResult, FindingResult, LesionMeasurement
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

#: CID 100-style procedure code (LOINC 24627-2).
PROCEDURE_CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
VOLUME = codes.SCT.Volume
LONG_AXIS = codes.SCT.LongAxis
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDINGS = codes.DCM.Findings
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
_LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}


def device_uid(card: ModelCard) -> str:
    """A UID for the model as a device observer, stable for one name and version."""
    return str(generate_uid(entropy_srcs=["unict-node device observer", card.name, card.version]))


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


def _finding_group(
    finding: FindingResult, card: ModelCard
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: present/absent, probability and threshold of one abnormality."""
    concept = coded(finding.abnormality.concept)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=finding.abnormality.name
        ),
        algorithm_id=_algorithm(card),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=round(finding.probability, 6), unit=NO_UNITS),
            hd.sr.Measurement(name=THRESHOLD, value=round(finding.threshold, 6), unit=NO_UNITS),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if finding.present else ABSENT)
        ],
    )


def _lesion_group(
    finding: FindingResult,
    lesion: LesionMeasurement,
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
    laterality = _LATERALITY.get(lesion.laterality)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{finding.abnormality.name} lesion {lesion.lesion_number}"
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        finding_type=coded(finding.abnormality.concept),
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=_algorithm(card),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung, laterality=laterality)],
        measurements=[
            hd.sr.Measurement(name=VOLUME, value=round(lesion.volume_ml, 4), unit=MILLILITRE),
            hd.sr.Measurement(
                name=LONG_AXIS, value=round(lesion.longest_axial_diameter_mm, 2), unit=MILLIMETRE
            ),
        ],
    )


def _segment_numbers(seg: Dataset, analysis: AnalysisResult) -> dict[int, int]:
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


def _narrative(analysis: AnalysisResult, card: ModelCard) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 container with the report text (row 14) and the use statement."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items = []
    if analysis.report_text.strip():
        items.append(
            hd.sr.TextContentItem(
                name=FINDINGS,
                value=analysis.report_text.strip(),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    items.append(
        hd.sr.TextContentItem(
            name=COMMENT,
            value=card.clinical_use,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(
    volume: SourceVolume,
    analysis: AnalysisResult,
    seg: Dataset | None,
    card: ModelCard,
    *,
    series_number: int,
    series_description: str,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    device_serial: str = "",
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of an analysis.

    Parameters
    ----------
    volume
        The source series (patient, study, and the series the SEG was made from).
    analysis
        All findings, lesions and the report text.
    seg
        The SEG built from the same analysis by :func:`service.outputs.seg.build_seg`,
        or ``None`` when it had no segment (then no lesion groups are written).
    card
        Concepts, thresholds, and the model's identity.
    series_number, series_description
        Of the new SR series.
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones when ``None``.
    device_serial
        Device Serial Number of the node (optional for SR).

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Marked COMPLETE, PRELIMINARY and UNVERIFIED: no person has read it.

    Raises
    ------
    ValueError
        If ``seg`` does not hold the segments of this analysis.
    """
    numbers = _segment_numbers(seg, analysis) if seg is not None else {}
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [_finding_group(f, card) for f in analysis.findings]
    if seg is not None:
        for finding in analysis.findings:
            number = numbers.get(finding.index)
            if number is None:
                continue
            groups.extend(
                _lesion_group(finding, lesion, seg, number, volume, card)
                for lesion in finding.lesions
            )

    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(card),
        procedure_reported=PROCEDURE_CT_CHEST,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_narrative(analysis, card))

    evidence: list[Dataset] = [*volume.datasets, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        specific_character_set=output_character_set(volume.datasets[0]),
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer=card.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        device_serial_number=device_serial or None,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        contributing_equipment=[
            contributing_equipment(card, "Chest CT abnormality detection and report")
        ],
    )
    logger.info(
        "built SR %s: %d finding group(s), %d lesion group(s) for series %s",
        sr.SOPInstanceUID,
        len(analysis.findings),
        len(groups) - len(analysis.findings),
        volume.series_instance_uid,
    )
    return sr
