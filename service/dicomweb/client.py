"""STOW-RS sender: one attempt at storing outputs at a ``type: dicomweb`` destination.

:class:`service.sender.Sender` runs the attempts (its retries, backoff and per-instance
results are the same as for C-STORE); this module makes one: ``POST {url}/studies`` with
the instances as ``multipart/related; type="application/dicom"`` (at most
``max_instances_per_request`` a request), and reads the Store Instances Response for
each instance's outcome.

What an instance's result says:

- stored: listed in ``ReferencedSOPSequence`` (status its ``WarningReason`` or 0), or not
  listed in a 200/202 response that lists nothing;
- failed with its ``FailureReason`` when listed in ``FailedSOPSequence`` (``0xA7xx``
  is retried, as for C-STORE);
- no status (retried) when no response came (connection refused, timeout) or the server
  answered 408, 429 or 5xx; 401/403 are ``0x0124`` (refused: not authorised), any other
  answer without the instance listed ``0xC000``; neither is retried.
"""

from __future__ import annotations

import logging
import os
import ssl
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO

import httpx
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from service.dicomweb.settings import DicomwebDestination, secret_from_env
from service.dicomweb.stow_response import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_NOT_AUTHORIZED,
    JSON_MEDIA_TYPE,
    XML_MEDIA_TYPE,
    from_json,
    from_xml,
)

__all__ = ["StowOutcome", "encode_multipart", "stow"]

logger = logging.getLogger(__name__)

_RETRYABLE_HTTP = frozenset({408, 429})


@dataclass(frozen=True)
class StowOutcome:
    """One instance's outcome at a STOW-RS destination."""

    sop_instance_uid: str
    ok: bool
    status: int | None
    detail: str


def _part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def encode_multipart(parts: Sequence[bytes], boundary: str) -> bytes:
    """A ``multipart/related; type="application/dicom"`` body of Part 10 files."""
    out = BytesIO()
    for data in parts:
        out.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def _auth(
    destination: DicomwebDestination, env: Mapping[str, str]
) -> tuple[dict[str, str], httpx.BasicAuth | None]:
    if destination.token_env is not None:
        token = secret_from_env(destination.token_env, env)
        if token is None:
            raise ValueError(f"environment variable {destination.token_env} is not set")
        return {"Authorization": f"Bearer {token}"}, None
    if destination.username is not None and destination.password_env is not None:
        password = secret_from_env(destination.password_env, env)
        if password is None:
            raise ValueError(f"environment variable {destination.password_env} is not set")
        return {}, httpx.BasicAuth(destination.username, password)
    return {}, None


def _batches(datasets: Sequence[Dataset], size: int) -> Iterator[Sequence[Dataset]]:
    for start in range(0, len(datasets), size):
        yield datasets[start : start + size]


def _read_response(response: httpx.Response) -> Dataset | None:
    if not response.content:
        return None
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if media_type in (XML_MEDIA_TYPE, "application/xml", "text/xml"):
            return from_xml(response.content)
        if media_type in (JSON_MEDIA_TYPE, "application/json"):
            return from_json(response.content)
    except Exception as exc:  # a peer's malformed response: judged by its HTTP status
        logger.warning("unreadable STOW-RS response (%s): %s", media_type, exc)
    return None


def _outcomes(batch: Sequence[Dataset], response: httpx.Response) -> list[StowOutcome]:
    ds = _read_response(response)
    listed: dict[str, StowOutcome] = {}
    if ds is not None:
        for item in ds.get("ReferencedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            warning = int(item.get("WarningReason", 0) or 0)
            detail = "stored" if not warning else f"stored with warning 0x{warning:04X}"
            listed[uid] = StowOutcome(uid, True, warning, detail)
        for item in ds.get("FailedSOPSequence", []):
            uid = str(item.get("ReferencedSOPInstanceUID", ""))
            reason = int(item.get("FailureReason", FAILURE_CANNOT_UNDERSTAND))
            listed[uid] = StowOutcome(
                uid, False, reason, f"HTTP {response.status_code}, failure 0x{reason:04X}"
            )
    code = response.status_code
    out = []
    for dataset in batch:
        uid = str(dataset.SOPInstanceUID)
        if uid in listed:
            out.append(listed[uid])
        elif code in (200, 202) and not listed:
            out.append(StowOutcome(uid, True, 0, f"HTTP {code}"))
        elif code in _RETRYABLE_HTTP or code >= 500:
            out.append(StowOutcome(uid, False, None, f"HTTP {code}"))
        elif code in (401, 403):
            out.append(StowOutcome(uid, False, FAILURE_NOT_AUTHORIZED, f"HTTP {code}"))
        else:
            out.append(
                StowOutcome(uid, False, FAILURE_CANNOT_UNDERSTAND, f"HTTP {code}, not listed")
            )
    return out


def stow(
    destination: DicomwebDestination,
    datasets: Sequence[Dataset],
    *,
    timeout_s: float,
    env: Mapping[str, str] = os.environ,
) -> list[StowOutcome]:
    """Store `datasets` at `destination` by STOW-RS; one outcome per dataset, in order."""
    try:
        headers, auth = _auth(destination, env)
    except ValueError as exc:
        return [
            StowOutcome(str(d.SOPInstanceUID), False, FAILURE_NOT_AUTHORIZED, str(exc))
            for d in datasets
        ]
    verify: ssl.SSLContext | bool = True
    if destination.ca_file is not None or destination.cert_file is not None:
        verify = ssl.create_default_context(
            cafile=None if destination.ca_file is None else str(destination.ca_file)
        )
        if destination.cert_file is not None and destination.key_file is not None:
            verify.load_cert_chain(str(destination.cert_file), str(destination.key_file))
    out: list[StowOutcome] = []
    with httpx.Client(timeout=timeout_s, verify=verify, auth=auth) as http:
        for batch in _batches(datasets, destination.max_instances_per_request):
            boundary = uuid.uuid4().hex
            body = encode_multipart([_part10(d) for d in batch], boundary)
            try:
                response = http.post(
                    f"{destination.url}/studies",
                    content=body,
                    headers={
                        **headers,
                        "Content-Type": (
                            f'multipart/related; type="application/dicom"; boundary={boundary}'
                        ),
                        "Accept": JSON_MEDIA_TYPE,
                    },
                )
            except httpx.HTTPError as exc:
                logger.warning("STOW-RS to %s: %s", destination.name, type(exc).__name__)
                out += [
                    StowOutcome(str(d.SOPInstanceUID), False, None, f"no response: {exc}")
                    for d in batch
                ]
                continue
            if response.status_code not in (200, 202):
                logger.warning("STOW-RS to %s: HTTP %d", destination.name, response.status_code)
            out += _outcomes(batch, response)
    return out
