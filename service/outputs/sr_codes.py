"""The coded concepts and fixed texts of the node's TID 1500 SR (PS3.16 codes)."""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

__all__ = [
    "ABSENT",
    "COMMENT",
    "DEFAULT_LANGUAGE",
    "EXTENT",
    "FINDING",
    "FINDINGS",
    "LAA_950",
    "LATERALITY",
    "LOBE_SITES",
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
    "SITES",
    "THRESHOLD",
    "VOLUME",
]

#: CID 100-style procedure code (LOINC 24627-2).
PROCEDURE_CT_CHEST = hd.sr.CodedConcept("24627-2", "LN", "CT Chest")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
VOLUME = codes.SCT.Volume
LONG_AXIS = codes.SCT.LongAxis
EXTENT = codes.SCT.Extent
NUMBER_OF_LESIONS = codes.SCT.NumberOfLesions
#: The emphysema index: percent of lung voxels below -950 HU. No standard code names it.
LAA_950 = hd.sr.CodedConcept("LAA950", "99UNICT", "Low attenuation area below -950 HU")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PERCENT = codes.UCUM.Percent
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
FINDINGS = codes.DCM.Findings
FINDING = codes.DCM.Finding
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
#: What highdicom's MeasurementReport writes when no language is given (TID 1204).
DEFAULT_LANGUAGE = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}
#: Lobe codes of service.lung_field as (anatomic location, laterality).
LOBE_SITES = {
    1: (codes.SCT.UpperLobeOfLung, codes.SCT.Right),
    2: (codes.SCT.MiddleLobeOfRightLung, codes.SCT.Right),
    3: (codes.SCT.LowerLobeOfLung, codes.SCT.Right),
    4: (codes.SCT.UpperLobeOfLung, codes.SCT.Left),
    5: (codes.SCT.LowerLobeOfLung, codes.SCT.Left),
}
SITES = {"lung": codes.SCT.Lung, "pleura": codes.SCT.Pleura}
#: What the SR says when the series' lung field could not be found.
NO_LUNG_FIELD = (
    "No lung field was found in this series: the findings are not restricted to the "
    "lungs or pleura and no lobe is named. Check that the series is a chest CT."
)
