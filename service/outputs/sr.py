"""Comprehensive 3D SR with the TID 1500 Measurement Report of an analysis (highdicom).

Content tree (PS3.16 TID 1500):

- observation context: the model as a device observer (TID 1004: the algorithm's Device
  UID, name, manufacturer, model = version), as the IHE AI Results profile asks;
- procedure reported: CT chest (the imaging procedure, not the algorithm);
- imaging measurements (row 6):

  - each itemised lesion of a focal finding (at most ``max_lesions`` per finding,
    largest first): two measurement groups that share one tracking identifier and
    tracking UID (the same lesion, tracked in both):

    - TID 1410 planar ROI on the lesion's key slice: its region an SCOORD POLYLINE of
      the longest in-plane diameter on that CT instance, finding = card concept,
      finding site its lobe (geometric) with laterality, Long axis (mm) of that line;
    - TID 1411 volumetric ROI referencing the SEG segment (and the source series),
      same finding and site, Volume (mL) and Long axis (mm);

  - each diffuse finding with a segment: one TID 1410 group, its region an SCOORD
    POINT inside the finding on its key slice (where a viewer marks it), finding sites
    the lobes involved, Volume (mL) and Extent (SCT 260858005, %) of the right and of
    the left lung;

- qualitative evaluations (row 12, UMLS C0034375) of the whole study: for each of
  the card's abnormalities a CODE (row 13) card concept = Present (SCT 52101004) or
  Absent (SCT 2667000), with properties TEXT Finding (DCM 121071) = the card's name,
  Probability (DCM 122157) and Threshold Value (DCM 122411), unit ``1``; a focal
  finding's Number of lesions (SCT 246206008) with a comment when more are in the SEG
  than itemised; a present finding of which nothing could be localised says so; the
  emphysema row carries the quantitative index LAA-950 (%) with its method. Then the
  report as TEXT Findings (DCM 121070, row 14) and the clinical-use statement as TEXT
  Comment.

Why not one TID 1501 group per abnormality under imaging measurements: OHIF (3.13)
turns every measurement group into an annotation and fails to open a report with
a group that has no image coordinates; study-level statements are what row 12 is
for, and OHIF ignores that container. The planar groups are what OHIF draws; the
shared tracking UID makes it show the volumetric group's values on the same line.
highdicom's :class:`~highdicom.sr.MeasurementReport` builds neither row 12 nor a
report without measurement groups, so those parts are made of highdicom content
items here.
"""

from __future__ import annotations

import logging

import highdicom as hd
from pydicom.dataset import Dataset

from model.card import ModelCard
from service.findings import AnalysisResult
from service.outputs.charset import output_character_set
from service.outputs.identity import contributing_equipment
from service.outputs.sr_codes import (
    ABSENT,
    COMMENT,
    DEFAULT_LANGUAGE,
    EXTENT,
    FINDING,
    FINDINGS,
    LAA_950,
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
    THRESHOLD,
    VOLUME,
)
from service.outputs.sr_content import (
    extent_group,
    planar_group,
    qualitative_evaluations,
    report_root,
    segment_numbers,
    volumetric_group,
)
from service.volume import SourceVolume

__all__ = [
    "ABSENT",
    "COMMENT",
    "DEFAULT_LANGUAGE",
    "EXTENT",
    "FINDING",
    "FINDINGS",
    "LAA_950",
    "LONG_AXIS",
    "MILLILITRE",
    "MILLIMETRE",
    "NO_LUNG_FIELD",
    "NO_UNITS",
    "NUMBER_OF_LESIONS",
    "PERCENT",
    "PRESENT",
    "PROBABILITY",
    "PROCEDURE_CT_CHEST",
    "QUALITATIVE_EVALUATIONS",
    "THRESHOLD",
    "VOLUME",
    "build_sr",
]

logger = logging.getLogger(__name__)


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
    numbers = segment_numbers(seg, analysis) if seg is not None else {}
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    for finding in analysis.findings:
        number = numbers.get(finding.index)
        if finding.extent is not None:
            groups.append(extent_group(finding, finding.extent, volume, card))
        for lesion in finding.lesions:
            tracking_uid = hd.UID()
            groups.append(planar_group(finding, lesion, tracking_uid, volume, card))
            if seg is not None and number is not None:
                groups.append(
                    volumetric_group(finding, lesion, tracking_uid, seg, number, volume, card)
                )
    root = report_root(groups, card)
    root.ContentSequence.append(qualitative_evaluations(analysis, card, volume))

    evidence: list[Dataset] = [*volume.datasets, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        specific_character_set=output_character_set(volume.datasets[0]),
        content=root,
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
        "built SR %s: %d finding(s), %d lesion group(s) for series %s",
        sr.SOPInstanceUID,
        len(analysis.findings),
        len(groups),
        volume.series_instance_uid,
    )
    return sr
