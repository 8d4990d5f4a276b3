"""The node's HTTP API (FastAPI): health, readiness, metrics, and the job records.

- ``GET /healthz``: the process is alive (nothing else is checked).
- ``GET /readyz``: every readiness check by name (database reachable, engine loaded,
  DICOM listener bound, spool space above the floor, ...); 503 when any fails.
- ``GET /metrics``: Prometheus text format (see :mod:`service.metrics`).
- ``GET /jobs`` (``?state=FAILED&since=2025-01-01T00:00Z&until=...&study_uid=...
  &limit=100&offset=0``), ``GET /jobs/{id}`` (stages, timings, error, what was sent
  where), ``POST /jobs/{id}/retry``.
- ``GET /openapi.json``: the OpenAPI document, generated from the routes and the response
  models of :mod:`service.api_models` (:func:`openapi_schema`).

``unict-node serve`` and ``unict-node worker`` both serve this app, each with its own
readiness checks (:mod:`service.readiness`), in a :class:`service.http_server.ServerThread`.

Everything but ``/healthz`` and ``/readyz`` needs the bearer token when one is configured
(always when the API listens beyond loopback; see :attr:`HttpSettings.token_required`).
Every error is JSON ``{"error": ...}``: a malformed filter or page is 400, an unknown
route or job 404, a wrong state 409.

Handlers are plain ``def`` functions: FastAPI runs them in its thread pool, so the
blocking database calls do not stall the event loop. A job store that cannot be reached
answers 503, not 500: the node is up, its database is not.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute

from service.api_models import (
    CheckResult,
    ErrorBody,
    Health,
    JobDetail,
    JobList,
    Readiness,
    job_detail,
)
from service.config import Destination, DicomwebDestination, HttpSettings
from service.errors import IllegalTransition, JobNotFound
from service.metrics import CONTENT_TYPE, NodeMetrics
from service.store import JobRecord, JobState, JobStore
from service.uids import UID_MAX_LENGTH, UID_PATTERN

__all__ = [
    "MAX_JOB_ID",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "Check",
    "NodeStatus",
    "api_token",
    "create_app",
    "job_detail",
    "openapi_schema",
]

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
"""Most jobs one ``/jobs`` page holds."""

MAX_JOB_ID = 2**31 - 1
"""Job ids are 32-bit integers in the database; larger ones cannot exist (404)."""

MAX_OFFSET = 2**31 - 1
"""Largest ``/jobs`` offset (larger ones do not fit the database's integers)."""

_DESCRIPTION = (
    "Health, readiness, metrics and the job records of a UniCT DICOM node. Everything but "
    "/healthz and /readyz needs the bearer token when one is configured (always when the "
    "API listens beyond loopback)."
)


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


@dataclass(frozen=True)
class _AppState:
    """What :func:`create_app` gives the routes (``app.state.api``)."""

    node: NodeStatus
    token: bytes | None
    """``Bearer <token>`` as bytes; ``None`` when no token is required."""
    metrics: NodeMetrics
    addresses: Mapping[str, str]


def _state(request: Request) -> _AppState:
    state: _AppState = request.app.state.api
    return state


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _require_token(
    request: Request,
    # Declares the scheme in the document; the check below reads the header itself.
    _: Annotated[Any, Depends(HTTPBearer(auto_error=False, scheme_name="bearer"))],
) -> None:
    expected = _state(request).token
    if expected is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, expected):
        raise HTTPException(401, "bearer token required", headers={"WWW-Authenticate": "Bearer"})


def _timestamp(name: str, value: str | None) -> datetime | None:
    """ISO 8601 (a date alone is its midnight); UTC when no offset is given."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except (ValueError, OverflowError):
        raise HTTPException(400, f"{name} must be an ISO 8601 time (2025-01-31T08:00Z)") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _state_filter(value: str | None) -> JobState | None:
    if value is None:
        return None
    try:
        return JobState(value.upper())
    except ValueError:
        raise HTTPException(
            400, f"state must be one of {', '.join(s.value for s in JobState)}"
        ) from None


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "A filter or the page is malformed.",
        401: "Bearer token missing or wrong.",
        404: "No such job.",
        409: "The job is in a state that cannot be retried.",
        503: "The job store is unreachable.",
    }
    return {s: {"model": ErrorBody, "description": described[s]} for s in statuses}


_GUARDED = [Depends(_require_token)]

JobId = Annotated[int, Path(ge=0, description="The job's id.")]

router = APIRouter()


@router.get(
    "/healthz", operation_id="healthz", summary="The process is alive (nothing else is checked)."
)
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Every readiness check by name: database, engine, DICOM listener, spool space, "
    "assembler, workers.",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A check failed."}},
)
def readyz(request: Request) -> Response:
    checks = list(_state(request).node.readiness())
    body = Readiness(
        ready=all(c.ok for c in checks),
        checks={c.name: CheckResult(ok=c.ok, detail=c.detail) for c in checks},
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics (text format 0.0.4): instances and bytes received, "
    "associations refused, jobs by state, stage latencies, send failures, queue depth.",
    dependencies=_GUARDED,
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(401),
    },
)
def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.get(
    "/jobs",
    operation_id="listJobs",
    summary="Jobs, newest first, filtered by state, creation time and study; paged.",
    dependencies=_GUARDED,
    responses=_errors(400, 401, 503),
)
def list_jobs(
    request: Request,
    state: Annotated[
        str | None,
        Query(
            description="Only jobs in this state (any case).",
            json_schema_extra={"enum": [s.value for s in JobState]},
        ),
    ] = None,
    since: Annotated[
        str | None,
        Query(
            description="Only jobs created at or after this ISO 8601 time (UTC when no "
            "offset is given; a date alone means its midnight).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            description="Only jobs created before this ISO 8601 time.",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    study_uid: Annotated[
        str | None,
        Query(
            description="Only jobs of series in this study.",
            pattern=UID_PATTERN,
            max_length=UID_MAX_LENGTH,
        ),
    ] = None,
    limit: Annotated[int, Query(ge=0, le=MAX_LIMIT)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    filters: dict[str, Any] = {
        "state": _state_filter(state),
        "since": _timestamp("since", since),
        "until": _timestamp("until", until),
        "study_instance_uid": study_uid,
    }
    store = _state(request).node.store
    jobs = store.list_jobs(**filters, limit=limit, offset=offset)
    total = store.count_jobs(**filters)
    following = offset + len(jobs)
    return JobList(
        jobs=jobs,
        total=total,
        limit=limit,
        offset=offset,
        next_offset=following if jobs and following < total else None,
    )


@router.get(
    "/jobs/{job_id:int}",
    operation_id="getJob",
    summary="One job: stages, timings, error, what was sent where.",
    dependencies=_GUARDED,
    responses=_errors(401, 404, 503),
)
def get_job(request: Request, job_id: JobId) -> JobDetail:
    api = _state(request)
    job = api.node.store.get_job(job_id) if job_id <= MAX_JOB_ID else None
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job_detail(job, api.addresses)


@router.post(
    "/jobs/{job_id:int}/retry",
    operation_id="retryJob",
    summary="Run a FAILED or DONE job again (back to QUEUED, attempts reset).",
    dependencies=_GUARDED,
    responses=_errors(401, 404, 409, 503),
)
def retry_job(request: Request, job_id: JobId) -> JobRecord:
    if job_id > MAX_JOB_ID:
        raise HTTPException(404, f"no job {job_id}")
    try:
        job = _state(request).node.store.retry(job_id)
    except JobNotFound:
        raise HTTPException(404, f"no job {job_id}") from None
    except IllegalTransition as exc:
        raise HTTPException(409, str(exc)) from None
    logger.info("job %d retried through the API", job_id, extra={"job_id": job_id})
    return job


@router.get(
    "/openapi.json",
    operation_id="openapi",
    summary="This document.",
    dependencies=_GUARDED,
    responses={
        200: {
            "description": "OpenAPI document.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **_errors(401),
    },
)
def openapi(request: Request) -> Response:
    return JSONResponse(request.app.openapi())


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own 404 (no route: /jobs/abc) and 405 too: every error is JSON.
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, exc.detail, exc.headers)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    what = "; ".join(
        f"{'.'.join(str(part) for part in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
    )
    return _error(400, what or "malformed request")


async def _store_down(request: Request, exc: Exception) -> Response:
    # The type only: a driver's message may quote the statement's parameters.
    logger.error(
        "HTTP %s %s: job store error %s", request.method, request.url.path, type(exc).__name__
    )
    return _error(503, "the job store is unreachable")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    logger.info("HTTP API up%s", " (token required)" if app.state.api.token else "")
    yield
    logger.info("HTTP API down")


def _application() -> FastAPI:
    app = FastAPI(
        title="UniCT node",
        version="1",
        description=_DESCRIPTION,
        openapi_url=None,  # served by the guarded route above
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan,
        exception_handlers={
            HTTPException: _http_error,
            RequestValidationError: _invalid,
            SQLAlchemyError: _store_down,
        },
    )
    # The routes themselves, not a mounted router: `app.routes` lists every path served.
    app.router.routes.extend(router.routes)
    app.openapi = lambda: _document(app)  # type: ignore[method-assign]
    return app


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without FastAPI's ``anyOf: [..., null]`` for an optional
    one: a query string has no null, only absence."""
    options = schema.get("anyOf")
    if not isinstance(options, list):
        return schema
    kept = [o for o in options if o != {"type": "null"}]
    if len(kept) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**kept[0], **rest}


def _document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, less its 422 answers (a malformed request is a 400 here) and
    the null of optional query parameters."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
                for parameter in operation.get("parameters", []):
                    parameter["schema"] = _not_null(parameter["schema"])
        schemas = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = schema
    return app.openapi_schema


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the node's HTTP API, as ``/openapi.json`` serves it."""
    return _application().openapi()


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
) -> FastAPI:
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
        More routes with their own authentication (the STOW-RS endpoints; not in the
        OpenAPI document).

    Returns
    -------
    FastAPI
        The ASGI application.
    """
    app = _application()
    app.state.api = _AppState(
        node=node_status,
        token=f"Bearer {token}".encode() if token else None,
        metrics=metrics or NodeMetrics(node_status.store),
        addresses={d.name: d.address for d in destinations},
    )
    app.router.routes.extend(routes)
    return app
