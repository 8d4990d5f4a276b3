"""The job store's records: what its callers give it and get back (frozen dataclasses).

No record carries an ORM object out of its transaction; :class:`JobRecord` is the one
definition of a job that the workers, the HTTP API and the CLI see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.store.models import Job, Series
from service.store.states import JobState

__all__ = [
    "InstanceRecord",
    "JobRecord",
    "PendingSeries",
    "QueuedHook",
    "QueuedJob",
    "ReceivedInstance",
    "RecordOutcome",
    "RecordResult",
    "RetryPolicy",
    "StudyRetention",
]


@dataclass(frozen=True)
class QueuedJob:
    """A job that has just become ``QUEUED``, as a queue backend needs to see it."""

    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    version: int
    not_before: datetime | None
    """Its next retry time (``None``: due now)."""


QueuedHook = Callable[[Session, QueuedJob], None]
"""Called inside the transaction that makes a job ``QUEUED``, just before it commits, so
that a queue backend can enqueue it atomically with the state change: a crash between the
two can neither lose the job nor deliver one that was never queued."""


@dataclass(frozen=True)
class ReceivedInstance:
    """A received instance, already written to the spool, to record."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    sha256: str
    calling_ae: str
    header: Mapping[str, Any]
    expected_count: int | None = None
    """Instances the series should have, when the data says so (``ImagesInAcquisition``)."""


class RecordOutcome(StrEnum):
    """What :meth:`JobStore.record_instance` did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"


@dataclass(frozen=True)
class RecordResult:
    """Where a received instance went."""

    outcome: RecordOutcome
    series_id: int
    version: int
    job_id: int
    superseded_job_id: int | None = None


@dataclass(frozen=True)
class PendingSeries:
    """A series version still receiving (its job is ``RECEIVING``)."""

    series_id: int
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    version: int
    calling_ae: str
    instance_count: int
    expected_count: int | None
    last_received_at: datetime


@dataclass(frozen=True)
class InstanceRecord:
    """A stored instance of a series version."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    size: int
    sha256: str
    header: Mapping[str, Any]


@dataclass(frozen=True)
class JobRecord:
    """A job as the API and the workers see it."""

    id: int
    series_id: int
    version: int
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str
    state: JobState
    attempts: int
    max_attempts: int
    instance_count: int
    expected_count: int | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    next_retry_at: datetime | None
    error_stage: str | None
    error_reason: str | None
    rejected_rule: str | None
    timings: Mapping[str, float]
    outputs: Mapping[str, Any]
    superseded_by: int | None
    created_at: datetime
    updated_at: datetime
    spool_removed_at: datetime | None
    """When its files left the spool (retention); ``None`` while they are kept."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (datetimes in ISO 8601)."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[name] = value
        return out

    @classmethod
    def _from_rows(cls, job: Job, series: Series) -> JobRecord:
        return cls(
            id=job.id,
            series_id=series.id,
            version=job.version,
            study_instance_uid=series.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            calling_ae=series.calling_ae,
            state=job.state,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            instance_count=series.instance_count,
            expected_count=series.expected_count,
            lease_owner=job.lease_owner,
            lease_expires_at=job.lease_expires_at,
            next_retry_at=job.next_retry_at,
            error_stage=job.error_stage,
            error_reason=job.error_reason,
            rejected_rule=job.rejected_rule,
            timings=dict(job.timings),
            outputs=dict(job.outputs),
            superseded_by=job.superseded_by,
            created_at=job.created_at,
            updated_at=job.updated_at,
            spool_removed_at=job.spool_removed_at,
        )


@dataclass(frozen=True)
class StudyRetention:
    """What the retention cleaner needs to know about a study."""

    study_instance_uid: str
    ended: bool
    """Every job of the study is ``DONE``, ``FAILED`` or ``REJECTED``."""
    ended_at: datetime
    """When the last of its jobs changed state."""
    failed: bool
    """One of its jobs is ``FAILED``."""
    job_ids: tuple[int, ...]
    spool_removed: bool
    """Its files were already removed (``spool_removed_at`` set on every job)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how late, a job that failed for a retryable reason runs again."""

    max_attempts: int = 3
    backoff_s: float = 30.0
    max_backoff_s: float = 3600.0

    def delay(self, attempts: int) -> timedelta:
        """Wait before the next run after `attempts` runs: doubling, capped."""
        seconds = self.backoff_s * (2 ** max(attempts - 1, 0))
        return timedelta(seconds=min(seconds, self.max_backoff_s))
