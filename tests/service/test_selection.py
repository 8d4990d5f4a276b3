"""service.selection: header extraction and the declarative rules, first failure named."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.config import SelectionSettings
from service.selection import ENHANCED_CT_IMAGE_STORAGE, RULES, InstanceHeader, evaluate
from tests.conftest import make_ct_dataset

RULES_CONFIG = SelectionSettings(
    modalities=("CT",),
    exclude_image_types=("LOCALIZER",),
    max_obliquity_deg=10,
    slice_thickness_mm=(0.5, 3.0),
    min_slices=40,
    series_description_exclude=(r"\bscout\b", "lung window"),
)


def headers(n: int = 40, **options: Any) -> list[InstanceHeader]:
    study, series = generate_uid(), generate_uid()
    return [
        InstanceHeader.from_dataset(
            make_ct_dataset(study_uid=study, series_uid=series, index=i, **options)
        )
        for i in range(n)
    ]


def tilted(degrees: float) -> tuple[float, ...]:
    a = math.radians(degrees)
    # Rows along x; columns tilted about x, so the normal leaves z by `degrees`.
    return (1.0, 0.0, 0.0, 0.0, round(math.cos(a), 8), round(math.sin(a), 8))


def test_good_series_is_accepted() -> None:
    assert evaluate(headers(), RULES_CONFIG).accepted


@pytest.mark.parametrize(
    ("options", "rule", "reason"),
    [
        ({"modality": "MR"}, "modalities", "modality MR not in [CT]"),
        (
            {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")},
            "exclude_image_types",
            "image type LOCALIZER excluded",
        ),
        (
            {"description": "Lung Window 1mm"},
            "series_description_exclude",
            "series description matches excluded pattern 'lung window'",
        ),
        (
            {"orientation": tilted(30)},
            "max_obliquity_deg",
            "obliquity 30.0 deg > max_obliquity_deg 10",
        ),
        (
            {"thickness": 5.0},
            "slice_thickness_mm",
            "slice thickness 5 mm outside slice_thickness_mm [0.5, 3]",
        ),
    ],
)
def test_first_failing_rule_is_named(options: dict[str, Any], rule: str, reason: str) -> None:
    decision = evaluate(headers(**options), RULES_CONFIG)
    assert (decision.accepted, decision.rule, decision.reason) == (False, rule, reason)


def test_too_few_slices() -> None:
    decision = evaluate(headers(12), RULES_CONFIG)
    assert decision.reason == "12 slices < min_slices 40"
    assert evaluate([], RULES_CONFIG).reason == "0 slices < min_slices 40"


def test_order_modality_before_slices() -> None:
    decision = evaluate(headers(3, modality="MR"), RULES_CONFIG)
    assert decision.rule == "modalities"


def test_include_patterns() -> None:
    config = RULES_CONFIG.model_copy(update={"series_description_include": (r"chest",)})
    assert evaluate(headers(), config).accepted
    decision = evaluate(headers(description="Abdomen 1mm"), config)
    assert decision.rule == "series_description_include"


def test_slight_tilt_is_axial_enough() -> None:
    assert evaluate(headers(orientation=tilted(8)), RULES_CONFIG).accepted


def test_missing_thickness_falls_back_to_positions() -> None:
    hs = [
        InstanceHeader.from_json({**h.to_json(), "slice_thickness": None})
        for h in headers(thickness=2.0)
    ]
    assert evaluate(hs, RULES_CONFIG).accepted
    no_positions = [InstanceHeader.from_json({**h.to_json(), "image_position": None}) for h in hs]
    assert evaluate(no_positions, RULES_CONFIG).rule == "slice_thickness_mm"


def test_header_roundtrip_and_no_patient_data() -> None:
    (header,) = headers(1, images_in_acquisition=40)
    data = header.to_json()
    assert InstanceHeader.from_json(data) == header
    assert header.images_in_acquisition == 40 and header.image_type == (
        "ORIGINAL",
        "PRIMARY",
        "AXIAL",
    )
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(data)
    assert "Phantom" not in str(data)


def test_enhanced_ct_header_from_functional_groups() -> None:
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = 60
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.SliceThickness = 1.0
    measures.PixelSpacing = [0.7, 0.7]
    shared.PlaneOrientationSequence = [orientation]
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    header = InstanceHeader.from_dataset(ds)
    assert header.frames == 60 and header.slice_thickness == 1.0
    assert header.slice_normal() == pytest.approx((0.0, 0.0, 1.0))
    assert evaluate([header], RULES_CONFIG).accepted


def test_rule_names_are_config_keys() -> None:
    keys = set(SelectionSettings.model_fields) | {"sop_class"}
    assert {name for name, _ in RULES} <= keys


def test_rules_are_plain_functions() -> None:
    rule: Callable[..., str | None]
    for _, rule in RULES:
        assert rule(headers(40), RULES_CONFIG) is None
