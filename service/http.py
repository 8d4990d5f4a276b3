"""The node's HTTP API (Starlette): health, readiness, metrics, and the job records.

- ``GET /healthz``: the process is alive (nothing else is checked).
- ``GET /readyz``: every readiness check by name (database reachable, engine loaded,
  DICOM listener bound, spool space above the floor, ...); 503 when any fails.
- ``GET /metrics``: job counts by state, Prometheus text format.
- ``GET /jobs`` (``?state=QUEUED&limit=100&offset=0``), ``GET /jobs/{id}``,
  ``POST /jobs/{id}/retry``: bearer token required when one is configured (always when
  the API listens beyond loopback; see :attr:`HttpSettings.token_required`).

Handlers are plain ``def`` functions: Starlette runs them in its thread pool, so the
blocking database calls do not stall the event loop.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.errors import IllegalTransition, JobNotFound
from service.store import JobState, JobStore

__all__ = ["Check", "NodeStatus", "create_app"]

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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(node_status: NodeStatus, *, token: str | None = None) -> Starlette:
    """Build the HTTP application.

    Parameters
    ----------
    node_status
        The node (or anything with its readiness checks and job store).
    token
        Bearer token the ``/jobs`` endpoints require; ``None`` for none (loopback only).

    Returns
    -------
    Starlette
        The ASGI application.
    """
    expected = f"Bearer {token}".encode() if token else None

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

    def metrics(request: Request) -> Response:
        counts = node_status.store.count_by_state()
        lines = [
            "# HELP unict_jobs Jobs by state.",
            "# TYPE unict_jobs gauge",
            *(f'unict_jobs{{state="{s.value}"}} {n}' for s, n in counts.items()),
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def list_jobs(request: Request) -> Response:
        params = request.query_params
        try:
            state = JobState(params["state"].upper()) if "state" in params else None
            limit = min(int(params.get("limit", 100)), 1000)
            offset = int(params.get("offset", 0))
        except ValueError:
            return _error(400, "state must be a job state; limit and offset integers")
        if limit < 0 or offset < 0:
            return _error(400, "limit and offset must not be negative")
        jobs = node_status.store.list_jobs(state=state, limit=limit, offset=offset)
        return JSONResponse({"jobs": [j.to_dict() for j in jobs]})

    def get_job(request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        job = node_status.store.get_job(job_id)
        if job is None:
            return _error(404, f"no job {job_id}")
        return JSONResponse(job.to_dict())

    def retry_job(request: Request) -> Response:
        job_id: int = request.path_params["job_id"]
        try:
            job = node_status.store.retry(job_id)
        except JobNotFound:
            return _error(404, f"no job {job_id}")
        except IllegalTransition as exc:
            return _error(409, str(exc))
        logger.info("job %d retried through the API", job_id, extra={"job_id": job_id})
        return JSONResponse(job.to_dict())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        logger.info("HTTP API up%s", " (token required)" if expected else "")
        yield
        logger.info("HTTP API down")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/jobs", guarded(list_jobs)),
            Route("/jobs/{job_id:int}", guarded(get_job)),
            Route("/jobs/{job_id:int}/retry", guarded(retry_job), methods=["POST"]),
        ],
        lifespan=lifespan,
    )
