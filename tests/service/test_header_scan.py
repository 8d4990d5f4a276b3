"""The scanned header (C-STORE hot path) against pydicom's full read of the same bytes.

For each dataset the receive path's own checks run twice, once on ``dcmread`` and once on
:func:`service.header_scan.scan_header`: the same :class:`InstanceHeader`, study and series,
and the same completeness verdict; what the scanner does not take (Big Endian, deflated,
encapsulated pixels, no preamble) goes to pydicom.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from bench.realct import realct_missing_reason, unpack_lidc
from service.header_scan import scan_header
from service.instance_handler import _DEFER_BYTES, _incomplete
from service.selection import InstanceHeader
from tests.conftest import make_ct_dataset


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(
        buffer,
        enforce_file_format=True,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=syntax != ExplicitVRBigEndian,
    )
    return buffer.getvalue()


def verdicts(data: bytes) -> tuple[tuple[object, ...], tuple[object, ...] | None]:
    """(pydicom's, the scanner's) (header, study, series, completeness) of `data`."""

    def of(ds: Dataset) -> tuple[object, ...]:
        try:  # as the handler does: any decoding failure is "cannot understand"
            problem = _incomplete(ds, len(data))
            if problem is not None:
                return ("incomplete",)
            return (
                InstanceHeader.from_dataset(ds),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
            )
        except Exception:
            return ("not decodable",)

    full = of(dcmread(io.BytesIO(data), defer_size=_DEFER_BYTES))
    scanned = scan_header(data)
    return full, None if scanned is None else of(scanned.dataset)


def ct(index: int = 0, **options: object) -> Dataset:
    return make_ct_dataset(study_uid="1.2.3", series_uid="1.2.3.4", index=index, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_same_header_as_pydicom(syntax: str) -> None:
    for ds in (
        ct(),
        ct(3, thickness=2.5, images_in_acquisition=40, description="Thorax ^ 1.0 Br40"),
        ct(1, orientation=(1, 0, 0, 0, 0.9, 0.43), image_type=("DERIVED", "SECONDARY")),
    ):
        full, scanned = verdicts(encode(ds, syntax))
        assert scanned == full


def test_sequences_and_private_elements_are_walked() -> None:
    ds = ct()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = generate_uid()
    nested = Dataset()
    nested.CodeValue, nested.CodingSchemeDesignator, nested.CodeMeaning = "1", "99X", "x"
    item.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([item, item])
    block = ds.private_block(0x0029, "UNICT TEST", create=True)
    block.add_new(0x10, "OB", b"\1\2\3\4")
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        data = encode(ds, syntax)
        full, scanned = verdicts(data)
        assert scanned == full and full[0] != "incomplete"


def test_undefined_length_sequences_are_walked() -> None:
    ds = ct()
    item = Dataset()
    item.CodeValue = "T-D3000"
    ds.AnatomicRegionSequence = Sequence([item])
    ds["AnatomicRegionSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence[0].is_undefined_length_sequence_item = True  # type: ignore[attr-defined]
    full, scanned = verdicts(encode(ds))
    assert scanned == full and full[0] != "incomplete"


def test_cut_instances_get_the_same_verdict() -> None:
    data = encode(ct(rows=32, columns=32))
    for cut in (len(data) - 100, len(data) - 2048, 400):
        full, scanned = (
            verdicts(data[:cut])
            if cut > 400
            else (("incomplete",), scan_header(data[:cut]) and None)
        )
        assert scanned is None or scanned == full


@pytest.mark.parametrize(
    "syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian, RLELossless]
)
def test_other_syntaxes_go_to_pydicom(syntax: str) -> None:
    ds = ct()
    if syntax == RLELossless:
        ds.compress(RLELossless)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    else:
        data = encode(ds, syntax)
    assert scan_header(data) is None


def _lidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = realct_missing_reason()
    if reason is not None:
        pytest.skip(reason)
    folder = unpack_lidc(tmp_path_factory.mktemp("lidc"))
    yield from sorted(folder.rglob("*.dcm"))[:40]


def test_same_header_on_the_real_ct(tmp_path_factory: pytest.TempPathFactory) -> None:
    for path in _lidc(tmp_path_factory):
        full, scanned = verdicts(path.read_bytes())
        assert scanned == full, path.name


def test_mutated_bytes_never_pass_where_pydicom_fails() -> None:
    """300 seeded mutations of one instance: whatever the scanner reads, pydicom reads
    too, with the same verdict (the fuzz test of the listener covers the wire)."""
    import random

    rng = random.Random(18)
    base = encode(ct(rows=32, columns=32, images_in_acquisition=5))
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(128, len(data))
            data[at] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(132, len(data))]
        scanned = scan_header(bytes(data))
        if scanned is None:
            continue
        full, again = verdicts(bytes(data))  # raises if pydicom cannot read what passed
        assert again == full
