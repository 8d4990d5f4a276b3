"""The node's HTTP API (Starlette): health, readiness, metrics, and the job records.

- ``GET /healthz``: the process is alive (nothing else is checked).
- ``GET /readyz``: every readiness check by name (database reachable, engine loaded,
  DICOM listener bound, spool space above the floor, ...); 503 when any fails.
- ``GET /metrics``: Prometheus text format (see :mod:`service.metrics`).
- ``GET /jobs`` (``?state=FAILED&since=2025-01-01T00:00Z&until=...&study_uid=...
  &limit=100&offset=0``), ``GET /jobs/{id}`` (stages, timings, error, what was sent
  where), ``POST /jobs/{id}/retry``.
- ``GET /openapi.json``: the OpenAPI document (:mod:`service.openapi`).

``unict-node serve`` and ``unict-node worker`` both serve this app, each with its own
readiness checks (:mod:`service.readiness`), in a :class:`ServerThread`.

Everything but ``/healthz`` and ``/readyz`` needs the bearer token when one is configured
(always when the API listens beyond loopback; see :attr:`HttpSettings.token_required`).

Handlers are plain ``def`` functions: Starlette runs them in its thread pool, so the
blocking database calls do not stall the event loop. A job store that cannot be reached
answers 503, not 500: the node is up, its database is not.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import uvicorn
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.config import Destination, DicomwebDestination, HttpSettings, TlsSettings
from service.errors import IllegalTransition, JobNotFound
from service.metrics import CONTENT_TYPE, TIMED_STAGES, NodeMetrics
from service.openapi import MAX_JOB_ID, MAX_LIMIT, MAX_OFFSET, openapi_schema
from service.store import JobRecord, JobState, JobStore

__all__ = ["Check", "NodeStatus", "ServerThread", "api_token", "create_app", "job_detail"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One named readiness check and its outcome."""

    name: str
    ok: bool
    detail: str


class NodeStatus(Protocol):
    """What the API needs from the node."""

    @property
    def store(self) -> JobStore:
        """The job store."""
        ...

    def readiness(self) -> Sequence[Check]:
        """Run every readiness check now."""
        ...


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _timestamp(value: str) -> datetime:
    """ISO 8601 (a date alone is its midnight); UTC when no offset is given."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def job_detail(job: JobRecord, destinations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A job as ``/jobs/{id}`` shows it: the record plus stages, error and destinations.

    Parameters
    ----------
    job
        The job record.
    destinations
        Address (``AE@host:port``) of each configured destination, by name.

    Returns
    -------
    dict
        JSON-ready: every field of :meth:`JobRecord.to_dict`, and ``stages`` (each timed
        stage in pipeline order: done, failed or not run, with its seconds), ``error``
        (stage and reason, or ``None``) and ``destinations`` (per destination: address,
        instances stored and failed, and each instance's result).
    """
    out = job.to_dict()
    stages = []
    for stage in TIMED_STAGES:
        seconds = job.timings.get(stage.value)
        if job.error_stage == stage.value:
            status = "failed"
        elif seconds is not None:
            status = "done"
        else:
            status = "not run"
        stages.append({"stage": stage.value, "status": status, "seconds": seconds})
    out["stages"] = stages
    out["error"] = (
        None if job.error_reason is None else {"stage": job.error_stage, "reason": job.error_reason}
    )
    by_destination: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for result in job.outputs.get("sent") or []:
        by_destination[str(result.get("destination"))].append(result)
    addresses = destinations or {}
    out["destinations"] = [
        {
            "name": name,
            "address": addresses.get(name),
            "stored": sum(1 for r in results if r.get("ok")),
            "failed": sum(1 for r in results if not r.get("ok")),
            "instances": [dict(r) for r in results],
        }
        for name, results in by_destination.items()
    ]
    return out


def api_token(http: HttpSettings) -> str | None:
    """The bearer token :func:`create_app` requires under `http` (``None``: none required)."""
    return http.token.get_secret_value() if http.token_required else None


def create_app(
    node_status: NodeStatus,
    *,
    token: str | None = None,
    metrics: NodeMetrics | None = None,
    destinations: Sequence[Destination | DicomwebDestination] = (),
    routes: Sequence[BaseRoute] = (),
) -> Starlette:
    """Build the HTTP application.

    Parameters
    ----------
    node_status
        The node (or anything with its readiness checks and job store).
    token
        Bearer token every endpoint but ``/healthz`` and ``/readyz`` requires; ``None``
        for none (loopback only).
    metrics
        The node's metrics; a fresh set on `node_status`'s store when ``None``.
    destinations
        The configured destinations, to show their addresses in ``/jobs/{id}``.
    routes
        More routes with their own authentication (the STOW-RS endpoints).

    Returns
    -------
    Starlette
        The ASGI application.
    """
    expected = f"Bearer {token}".encode() if token else None
    registry = metrics or NodeMetrics(node_status.store)
    addresses = {d.name: d.address for d in destinations}
    schema = openapi_schema()

    def guarded(
        handler: Callable[[Request], Response],
    ) -> Callable[[Request], Response]:
        def wrapper(request: Request) -> Response:
            if expected is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    return _error(401, "bearer token required", {"WWW-Authenticate": "Bearer"})
            return handler(request)

        return wrapper

    def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    def readyz(request: Request) -> Response:
        checks = list(node_status.readiness())
        ready = all(c.ok for c in checks)
        body = {
            "ready": ready,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    def get_metrics(request: Request) -> Response:
        return Response(registry.render(), media_type=CONTENT_TYPE)

    def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    def list_jobs(request: Request) -> Response:
        params = request.query_params
        try:
            state = JobState(params["state"].upper()) if "state" in params else None
        except ValueError:
            return _error(400, f"state must be one of {', '.join(s.value for s in JobState)}")
        try:
            since = _timestamp(params["since"]) if "since" in params else None
            until = _timestamp(params["until"]) if "until" in params else None
        except (ValueError, OverflowError):
            return _error(400, "since and until must be ISO 8601 times (2025-01-31T08:00Z)")
        study_uid = params.get("study_uid")
        if study_uid is not None and (len(study_uid) > 64 or not _UID.match(study_uid)):
            return _error(400, "study_uid must be a UID (digits and dots, at most 64)")
        try:
            limit = int(params.get("limit", 100))
            offset = int(params.get("offset", 0))
        except ValueError:
            return _error(400, "limit and offset must be integers")
        if not (0 <= limit <= MAX_LIMIT and 0 <= offset <= MAX_OFFSET):
            return _error(400, f"limit must be 0..{MAX_LIMIT}, offset 0..{MAX_OFFSET}")
        filters: dict[str, Any] = {
            "state": state,
            "since": since,
            "until": until,
            "study_instance_uid": study_uid,
        }
        store = node_status.store
        jobs = store.list_jobs(**filters, limit=limit, offset=offset)
        total = store.count_jobs(**filters)
        following = offset + len(jobs)
        return JSONResponse(
            {
                "jobs": [j.to_dict() for j in jobs],
                "total": total,
                "limit": limit,
                "offset": offset,
                "next_offset": following if jobs and following < total else None,
            }
        )

    def get_job(request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        job = node_status.store.get_job(job_id) if job_id <= MAX_JOB_ID else None
        if job is None:
            return _error(404, f"no job {job_id}")
        return JSONResponse(job_detail(job, addresses))

    def retry_job(request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        if job_id > MAX_JOB_ID:
            return _error(404, f"no job {job_id}")
        try:
            job = node_status.store.retry(job_id)
        except JobNotFound:
            return _error(404, f"no job {job_id}")
        except IllegalTransition as exc:
            return _error(409, str(exc))
        logger.info("job %d retried through the API", job_id, extra={"job_id": job_id})
        return JSONResponse(job.to_dict())

    def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no route: /jobs/abc) and 405 answer in plain text; every
        # error of this API is JSON ``{"error": ...}``, as the OpenAPI document says.
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, exc.detail, dict(exc.headers or {}))

    def store_down(request: Request, exc: Exception) -> Response:
        # The type only: a driver's message may quote the statement's parameters.
        logger.error(
            "HTTP %s %s: job store error %s", request.method, request.url.path, type(exc).__name__
        )
        return _error(503, "the job store is unreachable")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("HTTP API up%s", " (token required)" if expected else "")
        yield
        logger.info("HTTP API down")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", guarded(get_metrics)),
            Route("/jobs", guarded(list_jobs)),
            Route("/jobs/{job_id:int}", guarded(get_job)),
            Route("/jobs/{job_id:int}/retry", guarded(retry_job), methods=["POST"]),
            Route("/openapi.json", guarded(openapi)),
            *routes,
        ],
        exception_handlers={HTTPException: http_error, SQLAlchemyError: store_down},
        lifespan=lifespan,
    )


class ServerThread:
    """An ASGI app served by uvicorn in a daemon thread, with its own event loop.

    uvicorn installs no signal handlers outside the main thread, so the process keeps its
    own SIGTERM handling (``serve``'s, or procrastinate's in ``worker``).

    Parameters
    ----------
    app
        The application (:func:`create_app`).
    host, port
        Where to listen (port 0: any free port; :attr:`port` says which).
    tls
        ``http.tls``: HTTPS when enabled.
    """

    def __init__(
        self, app: Starlette, host: str, port: int, *, tls: TlsSettings | None = None
    ) -> None:
        self.host = host
        self._wanted_port = port
        options: dict[str, Any] = {}
        if tls is not None and tls.enabled:
            # HTTPS; with ca_file, client certificates are verified and their CN reaches
            # the STOW-RS allow-list (required with require_client_cert).
            from service.dicomweb.peer_certificate import PeerCertificateProtocol

            options = {
                "ssl_certfile": str(tls.cert_file),
                "ssl_keyfile": str(tls.key_file),
                "ssl_ca_certs": None if tls.ca_file is None else str(tls.ca_file),
                "ssl_cert_reqs": (
                    ssl.CERT_REQUIRED
                    if tls.require_client_cert
                    else ssl.CERT_OPTIONAL
                    if tls.ca_file is not None
                    else ssl.CERT_NONE
                ),
                "http": PeerCertificateProtocol,
            }
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; return once the socket is bound.

        Raises
        ------
        RuntimeError
            The server could not bind (see the log) or did not start within `timeout`.
        """
        server = self._server

        def serve() -> None:
            try:
                server.run()
            except SystemExit:
                # uvicorn exits the process when it cannot bind; here that ends only its
                # thread, and start() reports it.
                logger.error("HTTP API stopped at start-up")

        thread = threading.Thread(target=serve, name="unict-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(
                    f"HTTP API could not start on {self.host}:{self._wanted_port} (see the log)"
                )
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("HTTP API did not start in time")
            time.sleep(0.01)
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        if self._thread is None or not self._server.servers:
            raise RuntimeError("the HTTP API is not running")
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (requests in flight finish) and wait up to `timeout` for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
