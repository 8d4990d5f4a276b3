"""The 10 abnormalities UniCT reports, with the codes SEG and SR use.

The label set is the one of ReXGroundingCT used by the UniCT paper (lung and pleura
categories 1a-1e and 2a-2e). The authoritative copy travels in the model card next to
the checkpoint (:mod:`model.card`), so a site can change codes or colours without a code
change; :data:`DEFAULT_LABELS` is what a newly trained model's card starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pattern = Literal["focal", "diffuse"]
Site = Literal["lung", "pleura"]


@dataclass(frozen=True)
class CodedConcept:
    """A coded concept: coding scheme designator, code value and code meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True)
class Abnormality:
    """One abnormality of the label set.

    Parameters
    ----------
    code
        ReXGroundingCT category code, e.g. ``"2d"``.
    key
        Stable machine name, e.g. ``"nodule"``; used in file names and JSON.
    name
        Human-readable name, as shown in SEG segment labels and SR text.
    concept
        The finding's coded concept (SNOMED CT where one exists, else DICOM DCM).
    color_rgb
        Display colour recommended for the SEG segment.
    pattern
        ``"focal"``: reported as lesions (connected components, each measured);
        ``"diffuse"``: reported as one extent (volume, percent of each lung, lobes).
    site
        Where the finding can lie: ``"lung"`` (parenchyma and airways) or ``"pleura"``.
    min_diameter_mm, min_volume_ml
        A lesion of a focal finding smaller than either is not reported.
    """

    code: str
    key: str
    name: str
    concept: CodedConcept
    color_rgb: tuple[int, int, int]
    pattern: Pattern = "focal"
    site: Site = "lung"
    min_diameter_mm: float = 0.0
    min_volume_ml: float = 0.0


DEFAULT_LABELS: tuple[Abnormality, ...] = (
    Abnormality(
        "1a",
        "bronchial_wall_thickening",
        "Bronchial wall thickening",
        CodedConcept("SCT", "955009", "Bronchial structure"),
        (230, 159, 0),
        pattern="diffuse",
    ),
    Abnormality(
        "1b",
        "bronchiectasis",
        "Bronchiectasis",
        CodedConcept("SCT", "12295008", "Bronchiectasis"),
        (86, 180, 233),
        pattern="diffuse",
    ),
    Abnormality(
        "1c",
        "emphysema",
        "Emphysema",
        CodedConcept("SCT", "87433001", "Pulmonary emphysema"),
        (0, 158, 115),
        pattern="diffuse",
    ),
    Abnormality(
        "1d",
        "septal_thickening",
        "Septal thickening / reticulation",
        CodedConcept("DCM", "112114", "Septal line(s)"),
        (240, 228, 66),
        pattern="diffuse",
    ),
    Abnormality(
        "1e",
        "micronodules",
        "Micronodules",
        CodedConcept("DCM", "112122", "Micronodule"),
        (0, 114, 178),
        pattern="diffuse",
    ),
    Abnormality(
        "2a",
        "linear_opacities",
        "Linear opacities",
        CodedConcept("SCT", "12402003", "Scar"),
        (213, 94, 0),
        # A band shorter than 1 cm is not called a linear opacity.
        min_diameter_mm=10.0,
    ),
    Abnormality(
        "2b",
        "consolidation",
        "Atelectasis / consolidation",
        CodedConcept("SCT", "95436008", "Lung consolidation"),
        (204, 121, 167),
        # Airspace opacity under 1 cm is a nodule, not consolidation.
        min_diameter_mm=10.0,
    ),
    Abnormality(
        "2c",
        "ground_glass_opacity",
        "Ground-glass opacity",
        CodedConcept("DCM", "112120", "Ground glass opacity"),
        (153, 153, 255),
        pattern="diffuse",
    ),
    Abnormality(
        "2d",
        "nodule",
        "Pulmonary nodule / mass",
        CodedConcept("SCT", "27925004", "Nodule"),
        (255, 0, 0),
        # Nodules under 3 mm are not reported (LIDC-IDRI outlines, Fleischner 2017).
        min_diameter_mm=3.0,
    ),
    Abnormality(
        "2e",
        "pleural_effusion",
        "Pleural effusion / thickening",
        CodedConcept("SCT", "60046008", "Pleural effusion"),
        (0, 200, 200),
        site="pleura",
        # The smallest effusion CT reports with confidence: a few millilitres.
        min_volume_ml=5.0,
    ),
)

NUM_LABELS = len(DEFAULT_LABELS)
_DEFAULTS_BY_KEY = {a.key: a for a in DEFAULT_LABELS}


def default_abnormality(key: str) -> Abnormality | None:
    """The default entry of ``key`` (its pattern, site and minimum sizes), if any."""
    return _DEFAULTS_BY_KEY.get(key)


LABEL_KEYS: tuple[str, ...] = tuple(a.key for a in DEFAULT_LABELS)


def label_index(key: str) -> int:
    """Index of the abnormality ``key`` in :data:`DEFAULT_LABELS`.

    Raises
    ------
    KeyError
        If ``key`` names no abnormality.
    """
    try:
        return LABEL_KEYS.index(key)
    except ValueError:
        raise KeyError(f"unknown abnormality key {key!r}; known: {', '.join(LABEL_KEYS)}") from None
