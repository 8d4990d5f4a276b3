"""A whole node with its STOW-RS receiver on loopback (HTTP port 0), and helpers to send it
multipart bodies. A plain module (not a conftest) so tests import what they use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from service.config import HttpSettings, Settings
from service.dicomweb.settings import DicomwebClient, DicomwebSettings
from service.node import Node
from tests.service.node_harness import Destination, PipelineProcessor, node_settings

CLIENT = "STOWCLIENT"
TOKEN_ENV = "UNICT_TEST_STOW_TOKEN"
TOKEN = "stow-token-for-tests-4b1d"
BOUNDARY = "unict-test-boundary-7f3a"


def stow_settings(
    tmp_path: Path,
    destination: Destination | None,
    *,
    max_request_mb: int = 64,
    **options: Any,
) -> Settings:
    """:func:`node_settings` with the HTTP API on a free loopback port and STOW-RS on."""
    settings = node_settings(tmp_path, destination, **options)
    return settings.model_copy(
        update={
            "http": HttpSettings(host="127.0.0.1", port=0),
            "dicomweb": DicomwebSettings(
                enabled=True,
                clients=(DicomwebClient(name=CLIENT, token_env=TOKEN_ENV),),
                max_request_mb=max_request_mb,
            ),
        }
    )


@contextmanager
def running_stow_node(
    settings: Settings, processor: PipelineProcessor | None = None
) -> Iterator[tuple[Node, str]]:
    """A started node with HTTP; yields it and its DICOMweb root URL."""
    node = Node(settings, processor or PipelineProcessor(), lambda: (True, "fake engine"))
    node.start(http=True)
    try:
        yield node, f"http://127.0.0.1:{node.http_port}"
    finally:
        node.stop()


def part10(ds: Dataset) -> bytes:
    """`ds` as a DICOM Part 10 file."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def multipart(
    parts: Sequence[bytes | tuple[str, bytes]], boundary: str = BOUNDARY, *, close: bool = True
) -> bytes:
    """A multipart/related body; a part is its bytes (application/dicom) or (type, bytes)."""
    out = BytesIO()
    for part in parts:
        media_type, data = part if isinstance(part, tuple) else ("application/dicom", part)
        out.write(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    if close:
        out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def stow_headers(*, boundary: str = BOUNDARY, accept: str | None = None) -> dict[str, str]:
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
    }
    if accept is not None:
        headers["Accept"] = accept
    return headers
