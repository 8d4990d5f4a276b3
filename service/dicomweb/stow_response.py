"""The STOW-RS Store Instances Response (PS3.18 §10.5.3): DICOM JSON or XML.

One dataset: ``ReferencedSOPSequence`` (0008,1199) lists what was stored (with a
``WarningReason`` when stored with a warning), ``FailedSOPSequence`` (0008,1198) what
was not, each with its ``FailureReason`` (0008,1197, a PS3.4/PS3.18 status code), and
``OtherFailuresSequence`` (0008,119A) parts that could not even be read as DICOM (no UIDs
to name). The HTTP status follows PS3.18 Table 10.5.3-2: 200 all stored, 202 some stored
or stored with warnings, 409 none stored.

:func:`to_json` and :func:`to_xml` encode it (``application/dicom+json``, the default,
and ``application/dicom+xml``, the Native DICOM Model of PS3.19); :func:`from_json` and
:func:`from_xml` read a peer's response (the STOW-RS sender).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

from pydicom.dataset import Dataset

__all__ = [
    "FAILURE_CANNOT_UNDERSTAND",
    "FAILURE_DATASET_MISMATCH",
    "FAILURE_NOT_AUTHORIZED",
    "FAILURE_OUT_OF_RESOURCES",
    "FAILURE_PROCESSING",
    "FAILURE_SOP_CLASS_NOT_SUPPORTED",
    "FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED",
    "InstanceOutcome",
    "build_response",
    "from_json",
    "from_xml",
    "http_status",
    "to_json",
    "to_xml",
]

# PS3.18 Table 10.5.3-3 (Store Instances Response failure reasons, PS3.4 Annex B codes).
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_NOT_AUTHORIZED = 0x0124
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_DATASET_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

JSON_MEDIA_TYPE = "application/dicom+json"
XML_MEDIA_TYPE = "application/dicom+xml"


@dataclass(frozen=True)
class InstanceOutcome:
    """One part's outcome.

    ``status`` is ``0`` (stored), a warning (``0xB000``-``0xBFFF``, stored) or a failure
    code; the UIDs are empty when the part could not be read as DICOM.
    """

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    reason: str = ""

    @property
    def stored(self) -> bool:
        """Whether the instance is stored (success or warning)."""
        return self.status == 0 or 0xB000 <= self.status <= 0xBFFF


def build_response(outcomes: Sequence[InstanceOutcome]) -> Dataset:
    """The Store Instances Response dataset for `outcomes`."""
    ds = Dataset()
    referenced: list[Dataset] = []
    failed: list[Dataset] = []
    other: list[Dataset] = []
    for outcome in outcomes:
        item = Dataset()
        if outcome.sop_class_uid and outcome.sop_instance_uid:
            item.ReferencedSOPClassUID = outcome.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
        if outcome.stored:
            if outcome.status:
                item.WarningReason = outcome.status
            referenced.append(item)
        else:
            item.FailureReason = outcome.status
            (failed if "ReferencedSOPInstanceUID" in item else other).append(item)
    if failed:
        ds.FailedSOPSequence = failed
    if referenced:
        ds.ReferencedSOPSequence = referenced
    if other:
        ds.OtherFailuresSequence = other
    return ds


def http_status(outcomes: Sequence[InstanceOutcome]) -> int:
    """200 every instance stored without warning, 202 some stored or warned, 409 none."""
    if outcomes and all(o.status == 0 for o in outcomes):
        return 200
    if any(o.stored for o in outcomes):
        return 202
    return 409


def to_json(ds: Dataset) -> bytes:
    """DICOM JSON (PS3.18 Annex F) of `ds`."""
    return json.dumps(ds.to_json_dict(), separators=(",", ":")).encode()


def from_json(body: bytes) -> Dataset:
    """Read a DICOM JSON response (an object, or a list of one, as some servers send)."""
    data: Any = json.loads(body)
    if isinstance(data, list):
        data = data[0] if data else {}
    return Dataset.from_json(data)


def _xml_attributes(parent: ElementTree.Element, ds: Dataset) -> None:
    for element in ds:
        attr = ElementTree.SubElement(
            parent,
            "DicomAttribute",
            {"tag": f"{element.tag.group:04X}{element.tag.element:04X}", "vr": element.VR},
        )
        if element.keyword:
            attr.set("keyword", element.keyword)
        if element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                node = ElementTree.SubElement(attr, "Item", number=str(number))
                _xml_attributes(node, item)
            continue
        values = element.value if element.VM > 1 else [element.value]
        for number, value in enumerate(values, start=1):
            if value is None or value == "":
                continue
            ElementTree.SubElement(attr, "Value", number=str(number)).text = str(value)


def to_xml(ds: Dataset) -> bytes:
    """The Native DICOM Model (PS3.19 Annex A) of `ds`, as PS3.18 ``application/dicom+xml``."""
    root = ElementTree.Element(
        "NativeDicomModel", xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM"
    )
    _xml_attributes(root, ds)
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ElementTree.tostring(root)


def _xml_dataset(node: ElementTree.Element) -> Dataset:
    ds = Dataset()
    for attr in node:
        if not attr.tag.endswith("DicomAttribute"):
            continue
        tag = int(attr.get("tag", "0"), 16)
        vr = attr.get("vr", "UN")
        if vr == "SQ":
            items = [_xml_dataset(i) for i in attr if i.tag.endswith("Item")]
            ds.add_new(tag, vr, items)
            continue
        values = [v.text or "" for v in attr if v.tag.endswith("Value")]
        converted: list[Any] = (
            [int(v) for v in values] if vr in ("US", "UL", "SS", "SL", "IS") else values
        )
        ds.add_new(tag, vr, converted[0] if len(converted) == 1 else (converted or None))
    return ds


def from_xml(body: bytes) -> Dataset:
    """Read an ``application/dicom+xml`` response (the attributes PS3.18 puts in it)."""
    return _xml_dataset(ElementTree.fromstring(body))
