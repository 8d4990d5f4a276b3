"""A streaming parser of ``multipart/related`` bodies (RFC 2387, framing of RFC 2046 §5.1).

STOW-RS bodies are large (a CT series is hundreds of MB), so the body is never held in
memory: :class:`MultipartParser` is fed chunks as they arrive and writes each part's
content to its own temporary file, handing back every part as soon as its closing
delimiter is seen. A part is complete only then: a body cut short leaves its last part
unfinished, and :meth:`MultipartParser.close` says so.

Starlette's parser handles ``multipart/form-data`` only, and python-multipart keeps
``multipart/related`` parts in memory; this one is small enough to keep here.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from email.message import Message
from enum import Enum
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "ContentTypeError",
    "MultipartError",
    "MultipartParser",
    "Part",
    "parse_content_type",
]

#: Part headers longer than this are refused (a body that is not multipart at all).
MAX_HEADER_BYTES = 16 * 1024
#: RFC 2046: a boundary is 1-70 characters of these; Orthanc's DICOMweb plugin 1.7 sends
#: 73, so up to 200 are taken.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,199}[0-9A-Za-z'()+_,\-./:=?]$")


class MultipartError(ValueError):
    """The body is not a well-formed multipart body."""


class ContentTypeError(ValueError):
    """The request's Content-Type is not the multipart/related the service takes."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """Split a Content-Type header into its media type (lower case) and parameters.

    Quoted parameter values are unquoted; parameter names are lower case.
    """
    message = Message()
    message["content-type"] = value
    media_type = message.get_content_type().lower()
    params = {k.lower(): v for k, v in message.get_params(failobj=[])[1:]}
    if value.strip() and "/" not in value.split(";", 1)[0]:
        media_type = value.split(";", 1)[0].strip().lower()
    return media_type, {k: str(v) for k, v in params.items()}


def boundary_of(content_type: str, *, related_type: str) -> bytes:
    """The boundary of a ``multipart/related; type=<related_type>`` Content-Type.

    Raises
    ------
    ContentTypeError
        Not multipart/related, another ``type`` parameter, or no valid boundary.
    """
    media_type, params = parse_content_type(content_type)
    if media_type != "multipart/related":
        raise ContentTypeError(f"Content-Type {media_type or '(none)'} is not multipart/related")
    given = params.get("type", "").strip().lower()
    if given and given != related_type:
        raise ContentTypeError(
            f'multipart/related type "{given}" is not supported (only "{related_type}")'
        )
    boundary = params.get("boundary", "")
    if not _BOUNDARY.match(boundary):
        raise ContentTypeError("multipart/related without a valid boundary parameter")
    return boundary.encode("ascii")


@dataclass(frozen=True)
class Part:
    """One complete part: its headers (lower-case names) and its content on disk."""

    index: int
    headers: dict[str, str]
    path: Path
    size: int

    @property
    def content_type(self) -> str | None:
        """The part's media type (lower case), ``None`` when it has no Content-Type."""
        value = self.headers.get("content-type")
        return parse_content_type(value)[0] if value else None

    @property
    def content_type_params(self) -> dict[str, str]:
        """The parameters of the part's Content-Type (``transfer-syntax``, ...)."""
        value = self.headers.get("content-type")
        return parse_content_type(value)[1] if value else {}


class _State(Enum):
    PREAMBLE = "preamble"
    AFTER_DELIMITER = "after delimiter"
    HEADERS = "headers"
    BODY = "body"
    END = "end"


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and headers:  # folded continuation line (RFC 822)
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


class MultipartParser:
    """Incremental ``multipart/related`` parser writing parts to files in `directory`.

    Use::

        parser = MultipartParser(boundary, directory)
        for chunk in body:
            for part in parser.feed(chunk):
                ...               # part.path is complete; remove it when done
        parser.close()            # raises MultipartError if the body ended early

    Part files are named ``.stow.*.part`` (the retention cleaner removes such files left
    by a crash). Files of parts not handed back are removed by :meth:`close` and
    :meth:`abort`.
    """

    def __init__(self, boundary: bytes, directory: Path) -> None:
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        self._directory = directory
        self._buffer = bytearray()
        self._state = _State.PREAMBLE
        self._headers: dict[str, str] = {}
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._size = 0
        self._count = 0

    @property
    def parts_seen(self) -> int:
        """How many parts have been handed back."""
        return self._count

    def feed(self, chunk: bytes) -> list[Part]:
        """Parse `chunk`; return the parts it completed.

        Raises
        ------
        MultipartError
            The body is malformed (the parts already returned stay valid).
        """
        if self._state is _State.END:
            return []  # the epilogue is ignored
        self._buffer += chunk
        done: list[Part] = []
        while True:
            if self._state is _State.PREAMBLE:
                if not self._preamble():
                    break
            elif self._state is _State.AFTER_DELIMITER:
                if not self._after_delimiter():
                    break
            elif self._state is _State.HEADERS:
                if not self._read_headers():
                    break
            elif self._state is _State.BODY:
                part = self._body()
                if part is None:
                    break
                done.append(part)
            else:  # END
                self._buffer.clear()
                break
        return done

    def close(self) -> None:
        """The body has ended: check it ended with the close delimiter.

        Raises
        ------
        MultipartError
            No part at all, or the body ended inside a part (truncated).
        """
        state = self._state
        self.abort()
        if state is _State.END:
            return
        if state is _State.PREAMBLE:
            raise MultipartError("no multipart delimiter found in the body")
        raise MultipartError(
            f"body ended before the closing delimiter (part {self._count + 1} incomplete)"
        )

    def abort(self) -> None:
        """Drop the part being written (its file is removed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    # ------------------------------------------------------------ states

    def _preamble(self) -> bool:
        buffer = self._buffer
        if buffer.startswith(self._dash_boundary):
            del buffer[: len(self._dash_boundary)]
            self._state = _State.AFTER_DELIMITER
            return True
        index = buffer.find(self._delimiter)
        if index < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise MultipartError("no multipart delimiter at the start of the body")
            # keep what could be the start of a delimiter
            keep = len(self._delimiter)
            if len(buffer) > keep:
                del buffer[: len(buffer) - keep]
            return False
        del buffer[: index + len(self._delimiter)]
        self._state = _State.AFTER_DELIMITER
        return True

    def _after_delimiter(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer.startswith(b"--"):
            self._state = _State.END
            return True
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) > 1024:
                raise MultipartError("malformed delimiter line")
            return False
        if buffer[:end].strip(b" \t"):  # only transport padding may follow a delimiter
            raise MultipartError("malformed delimiter line")
        del buffer[: end + 2]
        self._state = _State.HEADERS
        return True

    def _read_headers(self) -> bool:
        buffer = self._buffer
        if buffer.startswith(b"\r\n"):  # no headers at all
            del buffer[:2]
            self._headers = {}
        else:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("part headers too long")
                return False
            self._headers = _parse_headers(bytes(buffer[:end]))
            del buffer[: end + 4]
        fd, name = tempfile.mkstemp(dir=self._directory, prefix=".stow.", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self._path = Path(name)
        self._size = 0
        self._state = _State.BODY
        return True

    def _body(self) -> Part | None:
        buffer = self._buffer
        assert self._file is not None and self._path is not None
        index = buffer.find(self._delimiter)
        if index < 0:
            # write all but what could be the start of the delimiter
            safe = len(buffer) - len(self._delimiter) + 1
            if safe > 0:
                self._file.write(buffer[:safe])
                self._size += safe
                del buffer[:safe]
            return None
        self._file.write(buffer[:index])
        self._size += index
        del buffer[: index + len(self._delimiter)]
        self._file.close()
        part = Part(self._count, self._headers, self._path, self._size)
        self._file = None
        self._path = None
        self._count += 1
        self._state = _State.AFTER_DELIMITER
        return part
