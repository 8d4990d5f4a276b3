"""reconcile_report: the report text states what the SEG shows, where it shows it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model.card import default_labels
from model.labels import label_index
from service.postprocess import Extent, FindingResult, LesionMeasurement, LongAxis
from service.report_text import compose_sentence, location_agreement, reconcile_report

LABELS = default_labels()
MASK = np.ones((1, 1, 1), dtype=bool)


def _lesion(
    index: int, lobe: int, side: str, diameter: float = 12.0, ml: float = 1.0
) -> LesionMeasurement:
    return LesionMeasurement(
        label_index=index,
        lesion_number=1,
        voxel_count=10,
        volume_ml=ml,
        longest_axial_diameter_mm=diameter,
        centroid_lps=(0.0, 0.0, 0.0),
        slice_range=(0, 1),
        laterality=side,  # type: ignore[arg-type]
        long_axis=LongAxis(0, (0.0, 0.0), (1.0, 1.0)),
        lobe=lobe,
    )


def _findings(**present: FindingResult) -> tuple[FindingResult, ...]:
    out = []
    for index, label in enumerate(LABELS):
        key = label.abnormality.key
        out.append(
            present.get(key) or FindingResult(index, label.abnormality, 0.1, 0.5, False, None)
        )
    return tuple(out)


def _focal(key: str, *lesions: LesionMeasurement) -> FindingResult:
    index = label_index(key)
    numbered = tuple(dataclasses.replace(les, lesion_number=i) for i, les in enumerate(lesions, 1))
    return FindingResult(
        index, LABELS[index].abnormality, 0.9, 0.5, True, MASK, numbered, len(numbered)
    )


def _diffuse(key: str, lobes: tuple[int, ...]) -> FindingResult:
    index = label_index(key)
    extent = Extent(50.0, {"right": 5.0, "left": 5.0}, lobes, 0, (0.0, 0.0))
    return FindingResult(index, LABELS[index].abnormality, 0.9, 0.5, True, MASK, extent=extent)


NODULE_LLL = _focal("nodule", _lesion(label_index("nodule"), 5, "left", 25.4))
EMPHYSEMA_UPPER = _diffuse("emphysema", (1, 4))


def test_the_wrong_lobe_and_size_are_corrected() -> None:
    findings = _findings(nodule=NODULE_LLL)
    text = "A 12 mm nodule in the right upper lobe. No pleural effusion."
    fixed = reconcile_report(text, findings)
    assert fixed == "A 25 mm nodule in the left lower lobe. No pleural effusion."
    assert location_agreement(text, findings).rate == 0.0
    assert location_agreement(fixed, findings).rate == 1.0


def test_a_sentence_about_a_finding_the_seg_lacks_goes_and_a_missing_one_comes() -> None:
    findings = _findings(emphysema=EMPHYSEMA_UPPER)
    text = "Consolidation in the right lower lobe. No emphysema. No bronchiectasis."
    fixed = reconcile_report(text, findings)
    # Consolidation is not in the SEG; "No emphysema" contradicts it; emphysema is added.
    assert fixed == "Emphysema in both upper lobes. No bronchiectasis."


def test_a_present_finding_without_a_segment_is_not_stated() -> None:
    index = label_index("consolidation")
    unlocalised = FindingResult(index, LABELS[index].abnormality, 0.97, 0.05, True, None)
    findings = _findings(consolidation=unlocalised, nodule=NODULE_LLL)
    fixed = reconcile_report("Airspace consolidation is seen in the right lower lobe.", findings)
    assert "onsolidation" not in fixed and "nodule in the left lower lobe" in fixed


def test_sides_of_an_effusion() -> None:
    index = label_index("pleural_effusion")
    both = _focal(
        "pleural_effusion",
        _lesion(index, 0, "right", ml=120.0),
        _lesion(index, 0, "left", ml=40.0),
    )
    findings = _findings(pleural_effusion=both)
    fixed = reconcile_report("Small right pleural effusion measuring 12 mm.", findings)
    assert fixed == "Bilateral pleural effusions (right 120 mL, left 40 mL)."
    right = _focal("pleural_effusion", _lesion(index, 0, "right", ml=80.0))
    kept = "Small right pleural effusion measuring 12 mm."
    assert reconcile_report(kept, _findings(pleural_effusion=right)) == kept


def test_counts_of_nodules() -> None:
    index = label_index("nodule")
    two = _focal("nodule", _lesion(index, 1, "right", 14.0), _lesion(index, 4, "left", 6.0))
    fixed = reconcile_report("A 5 mm nodule in the right upper lobe.", _findings(nodule=two))
    assert fixed == "Two pulmonary nodules in both upper lobes, the largest measuring 14 mm."
    assert compose_sentence(two) == fixed


def test_nothing_present_says_so_and_something_present_does_not() -> None:
    assert (
        reconcile_report("No bronchiectasis.", _findings())
        == "No abnormalities detected. No bronchiectasis."
    )
    fixed = reconcile_report("No abnormalities detected.", _findings(nodule=NODULE_LLL))
    assert fixed == "A 25 mm nodule in the left lower lobe."


@pytest.mark.parametrize(
    ("sentence", "agrees"),
    [
        ("Centrilobular emphysema in both upper lobes.", True),
        ("Centrilobular emphysema in the right upper lobe.", False),
        ("Emphysema in both lungs.", True),
        ("Emphysema in the left lung.", False),
        ("Emphysematous changes are seen.", True),
    ],
)
def test_agreement_of_one_sentence(sentence: str, agrees: bool) -> None:
    agreement = location_agreement(sentence, _findings(emphysema=EMPHYSEMA_UPPER))
    assert (agreement.sentences, agreement.agreeing) == (1, int(agrees))
