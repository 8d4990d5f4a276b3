"""Series selection: declarative rules from ``config.yaml``, checked on stored headers.

The receiver extracts an :class:`InstanceHeader` from each instance (no patient data) and
the store keeps it as JSON; when a series is complete :func:`evaluate` runs the rules in a
fixed order and names the first that fails, e.g. ``"modality MR not in [CT]"`` or
``"12 slices < min_slices 40"``. The rules only decide whether to analyse a series; the
volume loader still checks the geometry in detail.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID

from service.config import SelectionSettings

__all__ = [
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
    "RULES",
    "Decision",
    "InstanceHeader",
    "Rule",
    "evaluate",
]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")
_CT_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _first_item(ds: Dataset, *keywords: str) -> Dataset | None:
    """The first item of a nested sequence path, e.g. functional group macros."""
    node: Dataset | None = ds
    for keyword in keywords:
        seq = getattr(node, keyword, None) if node is not None else None
        if not seq:
            return None
        node = seq[0]
    return node


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that selection and series assembly read.

    Deliberately free of patient identifiers: it is stored in the job database and may
    be shown by the admin API.
    """

    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None = None
    image_type: tuple[str, ...] = ()
    series_description: str | None = None
    image_orientation: tuple[float, ...] | None = None
    image_position: tuple[float, ...] | None = None
    slice_thickness: float | None = None
    instance_number: int | None = None
    images_in_acquisition: int | None = None
    number_of_frames: int | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        """Extract the header from a (possibly header-only) dataset.

        Enhanced CT keeps orientation and thickness in the functional group macros; the
        shared group is read, then the first frame's.

        Raises
        ------
        AttributeError, KeyError, ValueError, TypeError
            The dataset lacks a SOP Instance/Class UID or cannot be decoded.
        """
        orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        position = _floats(ds.get("ImagePositionPatient"), 3)
        thickness = _float(ds.get("SliceThickness"))
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            if orientation is None:
                item = _first_item(ds, group, "PlaneOrientationSequence")
                if item is not None:
                    orientation = _floats(item.get("ImageOrientationPatient"), 6)
            if position is None:
                item = _first_item(ds, group, "PlanePositionSequence")
                if item is not None:
                    position = _floats(item.get("ImagePositionPatient"), 3)
            if thickness is None:
                item = _first_item(ds, group, "PixelMeasuresSequence")
                if item is not None:
                    thickness = _float(item.get("SliceThickness"))
        image_type = ds.get("ImageType")
        if image_type is None:
            types: tuple[str, ...] = ()
        elif isinstance(image_type, str):
            types = tuple(v for v in image_type.split("\\") if v)
        else:
            types = tuple(str(v) for v in image_type)
        description = ds.get("SeriesDescription")
        modality = ds.get("Modality")
        return cls(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            modality=str(modality) if modality else None,
            image_type=types,
            series_description=str(description) if description is not None else None,
            image_orientation=orientation,
            image_position=position,
            slice_thickness=thickness,
            instance_number=_int(ds.get("InstanceNumber")),
            images_in_acquisition=_int(ds.get("ImagesInAcquisition")),
            number_of_frames=_int(ds.get("NumberOfFrames")),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dictionary (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InstanceHeader:
        """The inverse of :meth:`to_json`; unknown keys are ignored."""
        fields = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields
        }
        return cls(**kwargs)

    @property
    def frames(self) -> int:
        """Slices this instance contributes: its frames (Enhanced CT) or one."""
        return self.number_of_frames or 1

    def slice_normal(self) -> tuple[float, float, float] | None:
        """The unit normal of the image plane (row x column direction cosines)."""
        if self.image_orientation is None:
            return None
        r = self.image_orientation[:3]
        c = self.image_orientation[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        norm = math.sqrt(sum(v * v for v in n))
        if norm < 1e-6:
            return None
        return (n[0] / norm, n[1] / norm, n[2] / norm)


@dataclass(frozen=True)
class Decision:
    """The outcome of selection: accepted, or the first rule that failed and why."""

    accepted: bool
    rule: str | None = None
    reason: str | None = None


Rule = Callable[[Sequence[InstanceHeader], SelectionSettings], str | None]
"""A rule returns ``None`` when the series passes, else the reason it fails."""


def _fmt(values: Sequence[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _sop_class(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    other = sorted({h.sop_class_uid for h in headers} - _CT_CLASSES)
    if other:
        return f"SOP class {other[0]} is not CT Image Storage"
    return None


def _modality(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    for modality in sorted({h.modality or "" for h in headers}):
        if modality not in s.modalities:
            return f"modality {modality or '(missing)'} not in {_fmt(s.modalities)}"
    return None


def _image_type(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    # One localizer among the slices is enough to distrust the series as a volume.
    excluded = {t.upper() for t in s.exclude_image_types}
    for header in headers:
        for value in header.image_type:
            if value.upper() in excluded:
                return f"image type {value.upper()} excluded"
    return None


def _descriptions(headers: Sequence[InstanceHeader]) -> list[str]:
    return sorted({h.series_description or "" for h in headers})


def _description_exclude(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    for description in _descriptions(headers):
        for pattern in s.series_description_exclude:
            if re.search(pattern, description, re.IGNORECASE):
                return f"series description matches excluded pattern {pattern!r}"
    return None


def _description_include(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    if not s.series_description_include:
        return None
    for description in _descriptions(headers):
        if not any(re.search(p, description, re.IGNORECASE) for p in s.series_description_include):
            return (
                "series description matches none of the include patterns "
                f"{_fmt([repr(p) for p in s.series_description_include])}"
            )
    return None


def _obliquity(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    worst = 0.0
    for header in headers:
        normal = header.slice_normal()
        if normal is None:
            return "image orientation (ImageOrientationPatient) missing or invalid"
        worst = max(worst, math.degrees(math.acos(min(1.0, abs(normal[2])))))
    if worst > s.max_obliquity_deg:
        return f"obliquity {worst:.1f} deg > max_obliquity_deg {s.max_obliquity_deg:g}"
    return None


def _spacing_from_positions(headers: Sequence[InstanceHeader]) -> float | None:
    normal = headers[0].slice_normal() if headers else None
    if normal is None:
        return None
    offsets = sorted(
        sum(p * n for p, n in zip(h.image_position, normal, strict=True))
        for h in headers
        if h.image_position is not None
    )
    gaps = [b - a for a, b in itertools.pairwise(offsets) if b - a > 1e-3]
    return statistics.median(gaps) if gaps else None


def _slice_thickness(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    values = [h.slice_thickness for h in headers if h.slice_thickness is not None]
    # SliceThickness is type 2 (may be empty): fall back to the spacing of the positions.
    thickness = statistics.median(values) if values else _spacing_from_positions(headers)
    if thickness is None:
        return "slice thickness unknown (no SliceThickness, no slice positions)"
    low, high = s.slice_thickness_mm
    if not low <= thickness <= high:
        return f"slice thickness {thickness:g} mm outside slice_thickness_mm [{low:g}, {high:g}]"
    return None


def _min_slices(headers: Sequence[InstanceHeader], s: SelectionSettings) -> str | None:
    slices = sum(h.frames for h in headers)
    if slices < s.min_slices:
        return f"{slices} slices < min_slices {s.min_slices}"
    return None


RULES: tuple[tuple[str, Rule], ...] = (
    ("sop_class", _sop_class),
    ("modalities", _modality),
    ("exclude_image_types", _image_type),
    ("series_description_exclude", _description_exclude),
    ("series_description_include", _description_include),
    ("max_obliquity_deg", _obliquity),
    ("slice_thickness_mm", _slice_thickness),
    ("min_slices", _min_slices),
)
"""The rules, in the order they are checked; names are the config keys they read."""


def evaluate(headers: Sequence[InstanceHeader], settings: SelectionSettings) -> Decision:
    """Decide whether a series is analysed.

    Parameters
    ----------
    headers
        One header per stored instance of the series version.
    settings
        The ``selection`` section of the configuration.

    Returns
    -------
    Decision
        Accepted, or the first failing rule's name and reason.
    """
    if not headers:
        return Decision(False, "min_slices", f"0 slices < min_slices {settings.min_slices}")
    for name, rule in RULES:
        reason = rule(headers, settings)
        if reason is not None:
            return Decision(False, name, reason)
    return Decision(True)
