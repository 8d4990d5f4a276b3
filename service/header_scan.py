"""A received instance's header, read without building the whole dataset.

The C-STORE hot path needs about fifteen attributes of each instance (UIDs, geometry, the
image size) and the assurance that every element ends inside the data. pydicom's
``dcmread`` builds a :class:`~pydicom.dataset.Dataset` of all of them (about 0.2 ms of
Python per CT slice, and the checks read it again); :func:`scan_header` walks the element
headers with ``struct`` only, keeps the raw elements the node reads, and hands them to
pydicom as a small dataset, so that value decoding (character sets, DS, IS) stays pydicom's.

It reads Little Endian datasets (Implicit and Explicit VR, the two a CT arrives in almost
always) with native Pixel Data. Anything else (Big Endian, deflated, encapsulated pixel
data, a malformed element) returns ``None`` and the caller reads the file with pydicom.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

__all__ = ["ScannedHeader", "scan_header"]

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 §7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)

#: The top-level attributes the receive path reads (service.selection.InstanceHeader, the
#: completeness check, the series keys), and Specific Character Set for their decoding.
WANTED = frozenset(
    int(Tag(keyword))
    for keyword in (
        "SpecificCharacterSet",
        "ImageType",
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "SeriesDescription",
        "SliceThickness",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "ImagesInAcquisition",
        "SamplesPerPixel",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "BitsAllocated",
    )
)

_TAG = struct.Struct("<HH")
_U32 = struct.Struct("<L")
_U16 = struct.Struct("<H")


class _Unsupported(Exception):
    """Not for the fast path: the caller reads the file with pydicom."""


@dataclass(frozen=True)
class ScannedHeader:
    """What :func:`scan_header` found."""

    dataset: Dataset
    """The wanted attributes (raw, decoded by pydicom on access) and the Pixel Data element
    (its value not read), with the file meta."""
    transfer_syntax: str


def _element(data: bytes, offset: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at `offset`."""
    group, elem = _TAG.unpack_from(data, offset)
    tag = group << 16 | elem
    if group == 0xFFFE:  # item and delimiters: no VR in either encoding
        return tag, None, _U32.unpack_from(data, offset + 4)[0], offset + 8
    if explicit:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            return tag, vr, _U32.unpack_from(data, offset + 8)[0], offset + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unsupported(f"no VR at {offset}")
        return tag, vr, _U16.unpack_from(data, offset + 6)[0], offset + 8
    return tag, None, _U32.unpack_from(data, offset + 4)[0], offset + 8


def _skip_undefined(data: bytes, offset: int, explicit: bool, end_tag: int) -> int:
    """Offset after the delimiter `end_tag` of an undefined-length sequence or item."""
    size = len(data)
    while offset + 8 <= size:
        tag, vr, length, value = _element(data, offset, explicit)
        if tag == end_tag:
            return value
        if length == _UNDEFINED:
            if tag == _ITEM:
                offset = _skip_undefined(data, value, explicit, _ITEM_END)
            elif vr == b"SQ" or vr is None:
                offset = _skip_undefined(data, value, explicit, _SEQ_END)
            else:
                raise _Unsupported("undefined length outside a sequence")
        else:
            offset = value + length
    raise _Unsupported("sequence without its delimiter")


def _walk(
    data: bytes, offset: int, explicit: bool, wanted: frozenset[int]
) -> tuple[dict[BaseTag, DataElement | RawDataElement], int]:
    """The wanted raw elements of the dataset from `offset` to the end, and where the
    Pixel Data element starts (-1: none)."""
    found: dict[BaseTag, DataElement | RawDataElement] = {}
    size = len(data)
    pixel_start = -1
    previous = -1
    while offset < size:
        if offset + 8 > size:
            raise _Unsupported("element header cut short")
        tag, vr, length, value = _element(data, offset, explicit)
        if tag <= previous:
            raise _Unsupported("elements out of order")
        previous = tag
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                raise _Unsupported("encapsulated Pixel Data")
            if tag in wanted:
                raise _Unsupported("a wanted attribute of undefined length")
            offset = _skip_undefined(data, value, explicit, _SEQ_END)
            continue
        if value + length > size:
            raise _Unsupported("value past the end (the completeness check tells)")
        if tag == _PIXEL_DATA:
            pixel_start = offset
            found[Tag(tag)] = RawDataElement(
                Tag(tag), vr.decode() if vr else None, length, None, value, not explicit, True
            )
        elif tag in wanted:
            found[Tag(tag)] = RawDataElement(
                Tag(tag),
                vr.decode() if vr else None,
                length,
                data[value : value + length],
                value,
                not explicit,
                True,
            )
        offset = value + length
    return found, pixel_start


def scan_header(data: bytes) -> ScannedHeader | None:
    """The header of the Part 10 object `data`, or ``None`` when it is not for this path."""
    try:
        if len(data) < 144 or data[128:132] != b"DICM":
            return None
        transfer_syntax, start = _walk_meta(data)
        if transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE):
            return None
        explicit = transfer_syntax == EXPLICIT_LE
        # What pydicom checks before it reads a dataset, so that nothing passes here that
        # pydicom (the pipeline's reader) refuses: a first element of group 0008 or later
        # (no command set elements), encoded as the transfer syntax says.
        if start + 8 > len(data) or _TAG.unpack_from(data, start)[0] < 0x0008:
            return None
        looks_explicit = all(65 <= c <= 90 for c in data[start + 4 : start + 6])
        if looks_explicit != explicit:
            return None
        found, pixel_start = _walk(data, start, explicit, WANTED)
    except (_Unsupported, struct.error, IndexError, UnicodeDecodeError):
        return None
    if pixel_start < 0:
        return None
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    dataset = Dataset(found)
    dataset.file_meta = meta
    dataset.set_original_encoding(transfer_syntax == IMPLICIT_LE, True)
    return ScannedHeader(dataset, transfer_syntax)


def _walk_meta(data: bytes) -> tuple[str | None, int]:
    """The File Meta Information's Transfer Syntax UID, and where the dataset starts."""
    offset = 132
    syntax: str | None = None
    size = len(data)
    while offset + 8 <= size:
        group, _ = _TAG.unpack_from(data, offset)
        if group != 0x0002:
            break
        tag, _vr, length, value = _element(data, offset, True)
        if length == _UNDEFINED or value + length > size:
            raise _Unsupported("file meta element")
        if tag == 0x00020010:
            syntax = data[value : value + length].decode("ascii").rstrip("\0 ")
        offset = value + length
    return syntax, offset
