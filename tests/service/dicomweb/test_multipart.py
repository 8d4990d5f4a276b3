"""The streaming multipart/related parser: any chunking gives the same parts; truncated
and malformed bodies are errors; Content-Type parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.dicomweb.multipart import (
    ContentTypeError,
    MultipartError,
    MultipartParser,
    Part,
    boundary_of,
)

BOUNDARY = b"b0undary"


def body(parts: list[bytes], *, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for i, data in enumerate(parts):
        out += b"--" + BOUNDARY + b"\r\nContent-Type: application/dicom\r\nX-Index: %d\r\n\r\n" % i
        out += data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n" + epilogue


def parse(data: bytes, chunk: int, directory: Path) -> list[tuple[dict[str, str], bytes]]:
    parser = MultipartParser(BOUNDARY, directory)
    parts: list[Part] = []
    for start in range(0, len(data), chunk):
        parts += parser.feed(data[start : start + chunk])
    parser.close()
    out = [(p.headers, p.path.read_bytes()) for p in parts]
    for p in parts:
        assert p.size == p.path.stat().st_size
        p.path.unlink()
    return out


# Contents that look like the delimiter without being one.
CONTENTS = [b"DICM" + bytes(range(256)) * 3, b"", b"\r\n--b0undar", b"x\r\n--b0undarX\r\n--"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 13, 64, 100_000])
def test_every_chunking_gives_the_same_parts(tmp_path: Path, chunk: int) -> None:
    data = body(CONTENTS, preamble=b"preamble text\r\n", epilogue=b"epilogue")
    parts = parse(data, chunk, tmp_path)
    assert [content for _, content in parts] == CONTENTS
    assert [headers["x-index"] for headers, _ in parts] == ["0", "1", "2", "3"]
    assert all(h["content-type"] == "application/dicom" for h, _ in parts)
    assert list(tmp_path.iterdir()) == []  # no part file left behind


def test_a_part_without_headers(tmp_path: Path) -> None:
    data = b"--" + BOUNDARY + b"\r\n\r\nDATA\r\n--" + BOUNDARY + b"--"
    assert parse(data, 5, tmp_path) == [({}, b"DATA")]


@pytest.mark.parametrize("cut", [10, 40, -3])
def test_a_truncated_body_is_an_error_and_keeps_only_complete_parts(
    tmp_path: Path, cut: int
) -> None:
    data = body([b"A" * 20, b"B" * 20])
    parser = MultipartParser(BOUNDARY, tmp_path)
    parts = parser.feed(data[:cut])
    with pytest.raises(MultipartError, match="closing delimiter"):
        parser.close()
    assert all(p.path.read_bytes() in (b"A" * 20, b"B" * 20) for p in parts)
    assert len(list(tmp_path.iterdir())) == len(parts)  # the incomplete part's file is gone


def test_a_body_without_delimiter_is_an_error(tmp_path: Path) -> None:
    parser = MultipartParser(BOUNDARY, tmp_path)
    assert parser.feed(b"this is not multipart at all") == []
    with pytest.raises(MultipartError, match="no multipart delimiter"):
        parser.close()


def test_malformed_header_line(tmp_path: Path) -> None:
    parser = MultipartParser(BOUNDARY, tmp_path)
    with pytest.raises(MultipartError, match="header"):
        parser.feed(b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nDATA")


@pytest.mark.parametrize(
    ("value", "boundary"),
    [
        ('multipart/related; type="application/dicom"; boundary=abc', b"abc"),
        ('Multipart/Related; boundary="a b\'c"; type=application/dicom', b"a b'c"),
        ("multipart/related; boundary=xyz", b"xyz"),
        # Orthanc's DICOMweb plugin 1.7: two UUIDs, 73 characters (RFC 2046 says 70).
        ("multipart/related; boundary=" + "a" * 36 + "-" + "b" * 36, b"a" * 36 + b"-" + b"b" * 36),
    ],
)
def test_content_type_accepted(value: str, boundary: bytes) -> None:
    assert boundary_of(value, related_type="application/dicom") == boundary


@pytest.mark.parametrize(
    "value",
    [
        "",
        "application/dicom",
        "multipart/form-data; boundary=abc",
        'multipart/related; type="application/dicom+json"; boundary=abc',
        'multipart/related; type="application/dicom"',
    ],
)
def test_content_type_refused(value: str) -> None:
    with pytest.raises(ContentTypeError):
        boundary_of(value, related_type="application/dicom")
