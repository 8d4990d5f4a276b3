"""STOW-RS receiver: ``POST /studies`` and ``POST /studies/{study}`` (PS3.18 §10.5).

The body (``multipart/related; type="application/dicom"``) is read as it arrives; each
part is written to a temporary file in the spool and, as soon as it is complete, goes
through :meth:`Receiver.store_file <service.receiver.Receiver.store_file>`: the C-STORE
path, with its durability (file and folder ``fsync``-ed before success), spool floor, SOP class
and transfer syntax checks, job store record and assembler notice. A request is to the
assembler what an association is: when its body has been read to the closing delimiter
it "releases", and a series whose expected count (Images in Acquisition, or the C-FIND
of ``assembly.sender_query`` keyed by the client's name) is reached closes at once;
otherwise, and for a body cut short, the quiet period decides.

Who may store: the clients of ``dicomweb.clients``, by bearer token (``token_env``), or
by the CN of a verified client certificate (``cert_cn``, HTTPS with ``http.tls``). The
client's name is recorded as the series' calling AE.

Statuses:

- 200 every instance stored; 202 some stored (or with warnings), the others in
  ``FailedSOPSequence`` / ``OtherFailuresSequence`` with their PS3.18 failure reasons
  (``0xA700`` out of resources, ``0xA900`` not of the study in the URL or mismatch,
  ``0xC000`` not DICOM / cannot understand, ``0x0122`` SOP class not supported,
  ``0xC122`` transfer syntax not supported); 409 none stored;
- 400 a malformed multipart body (or study UID) with nothing stored; a body that breaks
  after some parts keeps those (202, the break in ``OtherFailuresSequence``);
- 401 no or unknown credentials; 406 an Accept the service cannot produce; 413 a body
  over ``dicomweb.max_request_mb`` (parts completed before the limit stay stored and are
  listed); 415 not ``multipart/related; type="application/dicom"``.

Reasons in words go in ``Warning: 299`` headers (no patient data).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from service.dicomweb.multipart import (
    ContentTypeError,
    MultipartError,
    MultipartParser,
    Part,
    boundary_of,
    parse_content_type,
)
from service.dicomweb.peer_certificate import TLS_CLIENT_CN
from service.dicomweb.settings import DicomwebSettings, secret_from_env
from service.dicomweb.stow_response import (
    FAILURE_CANNOT_UNDERSTAND,
    JSON_MEDIA_TYPE,
    XML_MEDIA_TYPE,
    InstanceOutcome,
    build_response,
    http_status,
    to_json,
    to_xml,
)
from service.receiver import STATUS_CANNOT_UNDERSTAND, StoreResult

__all__ = ["StoreTarget", "StowService", "client_cn_of"]

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_WARNINGS = 20
#: Parts of one request stored at once (each is an fsync-ed write and a job store record).
STORE_CONCURRENCY = 4


class StoreTarget(Protocol):
    """What the service stores into (the :class:`~service.receiver.Receiver`)."""

    @property
    def spool_dir(self) -> Path:
        """Where part files are written (the same filesystem as the spool)."""
        ...

    def store_file(
        self,
        source: Path,
        *,
        caller: str,
        connection: int,
        requested_class: str | None = None,
        requested_instance: str | None = None,
        study_uid: str | None = None,
    ) -> StoreResult:
        """Spool and record one file."""
        ...

    def connection_ended(self, connection: int, *, released: bool) -> None:
        """The request ended (released: its body was read whole)."""
        ...


def client_cn_of(request: Request) -> str | None:
    """The subject CN of the request's verified TLS client certificate, if any.

    Set under HTTPS by :class:`~service.dicomweb.peer_certificate.PeerCertificateProtocol`
    (``scope["state"]``).
    """
    state = request.scope.get("state") or {}
    value = state.get(TLS_CLIENT_CN) if isinstance(state, Mapping) else None
    return str(value) if value else None


@dataclass(frozen=True)
class _Negotiated:
    media_type: str


def _negotiate(accept: str) -> _Negotiated | None:
    """JSON (the default) or XML from an Accept header; ``None``: neither acceptable."""
    if not accept.strip():
        return _Negotiated(JSON_MEDIA_TYPE)
    choices: list[tuple[float, int, str]] = []
    for position, entry in enumerate(accept.split(",")):
        media_type, params = parse_content_type(entry.strip())
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 0.0
        if quality <= 0:
            continue
        if media_type in (JSON_MEDIA_TYPE, "application/json", "application/*", "*/*"):
            choices.append((quality, -position, JSON_MEDIA_TYPE))
        elif media_type in (XML_MEDIA_TYPE, "application/xml"):
            choices.append((quality, -position, XML_MEDIA_TYPE))
    if not choices:
        return None
    return _Negotiated(max(choices)[2])


def _warning_header(reasons: Sequence[str]) -> dict[str, str]:
    if not reasons:
        return {}
    shown = [r.replace('"', "'") for r in reasons[:_MAX_WARNINGS]]
    if len(reasons) > _MAX_WARNINGS:
        shown.append(f"and {len(reasons) - _MAX_WARNINGS} more")
    return {"Warning": ", ".join(f'299 unict-node "{r}"' for r in shown)}


class StowService:
    """The STOW-RS endpoints, storing through `target`.

    Parameters
    ----------
    target
        The receiver (its :meth:`store_file` and spool folder).
    settings
        The ``dicomweb`` section: clients and the request size limit.
    env
        Where the clients' tokens are read from (``token_env``).
    """

    def __init__(
        self,
        target: StoreTarget,
        settings: DicomwebSettings,
        env: Mapping[str, str] = os.environ,
    ) -> None:
        self.target = target
        self.settings = settings
        self.max_bytes = settings.max_request_mb * 2**20
        self._tokens: list[tuple[bytes, str]] = []
        self._cns: dict[str, str] = {}
        for client in settings.clients:
            if client.token_env is not None:
                token = secret_from_env(client.token_env, env)
                if token is None:
                    logger.warning(
                        "dicomweb client %s: environment variable %s is not set; its token "
                        "is refused",
                        client.name,
                        client.token_env,
                    )
                else:
                    self._tokens.append((f"Bearer {token}".encode(), client.name))
            if client.cert_cn is not None:
                self._cns[client.cert_cn] = client.name

    def routes(self) -> list[Route]:
        """``POST /studies`` and ``POST /studies/{study}``."""
        return [
            Route("/studies", self.handle, methods=["POST"]),
            Route("/studies/{study}", self.handle, methods=["POST"]),
        ]

    def client_of(self, request: Request) -> str | None:
        """The allowed client the request comes from, ``None`` when none."""
        given = request.headers.get("authorization", "").encode()
        name = None
        if given:
            for expected, client in self._tokens:
                if hmac.compare_digest(given, expected):
                    name = client
        if name is None:
            cn = client_cn_of(request)
            if cn is not None:
                name = self._cns.get(cn)
        return name

    async def handle(self, request: Request) -> Response:
        """Serve one STOW-RS request."""
        client = self.client_of(request)
        if client is None:
            peer = request.client.host if request.client is not None else "?"
            logger.warning("STOW-RS from %s refused (401): no known client's credentials", peer)
            return self._error(
                401,
                "a known client's bearer token or certificate is required",
                {"WWW-Authenticate": 'Bearer realm="stow-rs"'},
            )
        negotiated = _negotiate(request.headers.get("accept", ""))
        if negotiated is None:
            return self._error(406, f"Accept must allow {JSON_MEDIA_TYPE} or {XML_MEDIA_TYPE}")
        study = request.path_params.get("study")
        if study is not None and (len(study) > 64 or not _UID.match(study)):
            return self._error(400, "the study in the URL is not a UID")
        try:
            boundary = boundary_of(
                request.headers.get("content-type", ""), related_type="application/dicom"
            )
        except ContentTypeError as exc:
            logger.warning(
                "STOW-RS from %s refused (415): %s; Content-Type %r",
                client,
                exc,
                request.headers.get("content-type", "")[:200],
            )
            return self._error(415, str(exc))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            logger.warning("STOW-RS from %s refused: %s bytes > max_request_mb", client, length)
            return self._error(
                413,
                f"body of {length} bytes is over dicomweb.max_request_mb "
                f"({self.settings.max_request_mb} MB)",
            )
        return await self._receive(request, client, study, boundary, negotiated)

    async def _receive(
        self,
        request: Request,
        client: str,
        study: str | None,
        boundary: bytes,
        negotiated: _Negotiated,
    ) -> Response:
        connection = object()  # the request's identity for the assembler, alive until the end
        key = id(connection)
        parser = MultipartParser(boundary, self.target.spool_dir)
        reasons: list[str] = []
        received = 0
        too_large = False
        broken: str | None = None
        # Parts are stored while the body is still being read, a few at once (their fsyncs
        # overlap); the outcomes keep the parts' order.
        slots = asyncio.Semaphore(STORE_CONCURRENCY)
        tasks: list[asyncio.Task[InstanceOutcome]] = []

        async def store(part: Part) -> InstanceOutcome:
            async with slots:
                return await self._store(part, client, key, study, reasons)

        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > self.max_bytes:
                    too_large = True
                    break
                for part in parser.feed(chunk):
                    tasks.append(asyncio.create_task(store(part)))
                    await asyncio.sleep(0)  # let the store start before reading on
            if not too_large:
                parser.close()
        except MultipartError as exc:
            broken = str(exc)
        except ClientDisconnect:
            broken = "the client closed the connection before the end of the body"
        finally:
            parser.abort()
            # Even on an unexpected error: every part taken is stored (or refused) and the
            # assembler hears that this "association" ended.
            outcomes = list(await asyncio.gather(*tasks))
            complete = not too_large and broken is None
            if outcomes:
                self.target.connection_ended(key, released=complete)
        del connection
        stored = sum(o.stored for o in outcomes)
        logger.info(
            "STOW-RS from %s: %d part(s), %d stored%s",
            client,
            len(outcomes),
            stored,
            "; body over the limit" if too_large else (f"; {broken}" if broken else ""),
        )
        if too_large:
            reasons.append(
                f"body over dicomweb.max_request_mb ({self.settings.max_request_mb} MB); "
                f"reading stopped after {parser.parts_seen} complete part(s)"
            )
            return self._dataset(413, outcomes, negotiated, reasons)
        if broken is not None:
            reasons.append(f"malformed multipart body: {broken}")
            if stored == 0:
                return self._dataset(400, outcomes, negotiated, reasons)
            outcomes.append(InstanceOutcome("", "", FAILURE_CANNOT_UNDERSTAND, broken))
            return self._dataset(202, outcomes, negotiated, reasons)
        if not outcomes:
            return self._error(400, "the multipart body has no parts")
        return self._dataset(http_status(outcomes), outcomes, negotiated, reasons)

    async def _store(
        self, part: Part, client: str, connection: int, study: str | None, reasons: list[str]
    ) -> InstanceOutcome:
        number = part.index + 1
        try:
            media_type = part.content_type
            if media_type not in (None, "application/dicom"):
                reasons.append(f"part {number}: {media_type} is not application/dicom")
                return InstanceOutcome("", "", FAILURE_CANNOT_UNDERSTAND, "not application/dicom")
            result = await run_in_threadpool(
                self.target.store_file,
                part.path,
                caller=client,
                connection=connection,
                study_uid=study,
            )
        finally:
            part.path.unlink(missing_ok=True)
        status = result.status
        if status == STATUS_CANNOT_UNDERSTAND:
            status = FAILURE_CANNOT_UNDERSTAND  # PS3.18 names C000 for the Cxxx family
        if not result.ok:
            reasons.append(f"part {number}: {result.reason}")
        return InstanceOutcome(result.sop_class_uid, result.sop_instance_uid, status, result.reason)

    @staticmethod
    def _dataset(
        status: int,
        outcomes: Sequence[InstanceOutcome],
        negotiated: _Negotiated,
        reasons: Sequence[str],
    ) -> Response:
        ds = build_response(outcomes)
        body = to_xml(ds) if negotiated.media_type == XML_MEDIA_TYPE else to_json(ds)
        return Response(
            body,
            status_code=status,
            media_type=negotiated.media_type,
            headers=_warning_header(reasons),
        )

    @staticmethod
    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        # No instance was read: a plain JSON error, as the rest of the node's API answers.
        return Response(
            json.dumps({"error": message}).encode(),
            status_code=status,
            media_type="application/json",
            headers={**(headers or {}), **_warning_header([message])},
        )
