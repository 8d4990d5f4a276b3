"""The ``outputs`` section: the SEG, SR and key-image series the node writes back, each
with its own series number (two outputs sharing one are refused at load)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from service.settings_types import Section, SettingError


class SegOutputSettings(Section):
    """The DICOM Segmentation series written for each job."""

    series_number: int = Field(default=9901, ge=1)
    series_description: str = Field(default="UniCT segmentation", max_length=64)
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    omit_empty_frames: bool = True


class SrOutputSettings(Section):
    """The TID 1500 Comprehensive 3D SR written for each job."""

    series_number: int = Field(default=9902, ge=1)
    series_description: str = Field(default="UniCT report", max_length=64)
    max_lesions_per_finding: int = Field(default=5, ge=1, le=50)


class ScOutputSettings(Section):
    """Key images with the findings burned in (Secondary Capture), for viewers without SEG."""

    enabled: bool = False
    series_number: int = Field(default=9903, ge=1)
    series_description: str = Field(default="UniCT key images", max_length=64)
    max_images: int = Field(default=5, ge=1, le=50)


class OutputsSettings(Section):
    """What the node sends back."""

    seg: SegOutputSettings = SegOutputSettings()
    sr: SrOutputSettings = SrOutputSettings()
    sc: ScOutputSettings = ScOutputSettings()

    @field_validator("sr")
    @classmethod
    def _sr_own_number(cls, value: SrOutputSettings, info: ValidationInfo) -> SrOutputSettings:
        seg = info.data.get("seg")
        if seg is not None and value.series_number == seg.series_number:
            raise SettingError(
                "series_number", f"{value.series_number} is already the SEG's (seg.series_number)"
            )
        return value

    @field_validator("sc")
    @classmethod
    def _sc_own_number(cls, value: ScOutputSettings, info: ValidationInfo) -> ScOutputSettings:
        for name in ("seg", "sr"):
            section = info.data.get(name)
            if (
                value.enabled
                and section is not None
                and value.series_number == section.series_number
            ):
                raise SettingError(
                    "series_number",
                    f"{value.series_number} is already the {name.upper()}'s ({name}.series_number)",
                )
        return value
