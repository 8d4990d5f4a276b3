"""What the HTTP API answers, as typed records: FastAPI validates every answer against
them and generates the OpenAPI document from them.

A job is :class:`service.store.JobRecord` itself, its one definition; :class:`JobDetail`
adds what ``/jobs/{id}`` shows besides the record.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.metrics import TIMED_STAGES
from service.stages import Stage
from service.store import JobRecord

__all__ = [
    "CheckResult",
    "DestinationResult",
    "ErrorBody",
    "Health",
    "JobDetail",
    "JobError",
    "JobList",
    "Readiness",
    "StageStatus",
    "job_detail",
]


class ErrorBody(BaseModel):
    """Every error of the API: one sentence."""

    error: str


class Health(BaseModel):
    """The process is alive."""

    status: Literal["alive"] = "alive"


class CheckResult(BaseModel):
    """One readiness check's outcome."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """Every readiness check by name; ready when all pass."""

    ready: bool
    checks: dict[str, CheckResult]


class JobList(BaseModel):
    """One page of jobs, newest first."""

    jobs: list[JobRecord]
    total: int = Field(description="Jobs matching the filters.")
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


@dataclass(frozen=True)
class StageStatus:
    """A timed stage of a job: done, failed or not run, with its seconds."""

    stage: Stage
    status: Literal["done", "failed", "not run"]
    seconds: float | None


@dataclass(frozen=True)
class JobError:
    """Where and why a job failed."""

    stage: str | None
    reason: str


@dataclass(frozen=True)
class DestinationResult:
    """What was sent to one destination."""

    name: str
    address: str | None
    """``AE@host:port`` of a configured destination; ``None`` if no longer configured."""
    stored: int
    failed: int
    instances: tuple[Mapping[str, Any], ...]
    """Each instance's send result."""


@dataclass(frozen=True)
class JobDetail(JobRecord):
    """A job as ``/jobs/{id}`` shows it: the record, its stages, error and destinations."""

    stages: tuple[StageStatus, ...]
    error: JobError | None
    destinations: tuple[DestinationResult, ...]


def job_detail(job: JobRecord, destinations: Mapping[str, str] | None = None) -> JobDetail:
    """A job with its stages (in pipeline order), error and what was sent where.

    Parameters
    ----------
    job
        The job record.
    destinations
        Address (``AE@host:port``) of each configured destination, by name.
    """
    stages = []
    for stage in TIMED_STAGES:
        seconds = job.timings.get(stage.value)
        status: Literal["done", "failed", "not run"]
        if job.error_stage == stage.value:
            status = "failed"
        elif seconds is not None:
            status = "done"
        else:
            status = "not run"
        stages.append(StageStatus(stage, status, seconds))
    by_destination: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for result in job.outputs.get("sent") or []:
        by_destination[str(result.get("destination"))].append(result)
    addresses = destinations or {}
    record = {f.name: getattr(job, f.name) for f in fields(JobRecord)}
    return JobDetail(
        **record,
        stages=tuple(stages),
        error=None if job.error_reason is None else JobError(job.error_stage, job.error_reason),
        destinations=tuple(
            DestinationResult(
                name=name,
                address=addresses.get(name),
                stored=sum(1 for r in results if r.get("ok")),
                failed=sum(1 for r in results if not r.get("ok")),
                instances=tuple(dict(r) for r in results),
            )
            for name, results in by_destination.items()
        ),
    )
