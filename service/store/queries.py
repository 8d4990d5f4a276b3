"""Jobs as the HTTP API, the CLI and the metrics read them, and the admin retry."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, func, select

from service.errors import IllegalTransition, JobNotFound
from service.store.engine import StoreBase
from service.store.models import Job, Series
from service.store.records import JobRecord
from service.store.states import JobState

__all__ = ["QueryStore"]


class QueryStore(StoreBase):
    """What the HTTP API, the CLI and the metrics call: jobs listed, counted, retried."""

    def retry(self, job_id: int) -> JobRecord:
        """Admin retry: a ``FAILED`` or ``DONE`` job back to ``QUEUED`` with fresh attempts.

        Raises
        ------
        JobNotFound
            No such job.
        IllegalTransition
            The job is in another state, or was superseded by a newer series version.
        """
        now = self._clock()
        with self._tx() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            if job.superseded_by is not None:
                raise IllegalTransition(
                    f"job {job_id} was superseded by job {job.superseded_by}; retry that one"
                )
            if job.state not in (JobState.FAILED, JobState.DONE):
                # RUNNING -> QUEUED exists for expired leases, not for admins: re-queueing a
                # running job would run it twice.
                raise IllegalTransition(
                    f"job {job_id} is {job.state.value}: only FAILED or DONE jobs can be retried"
                )
            self._transition(job, JobState.QUEUED, now)
            job.attempts = 0
            job.next_retry_at = None
            job.error_stage = None
            job.error_reason = None
            return self._logged(session, job, "re-queued by an admin")

    def get_job(self, job_id: int) -> JobRecord | None:
        """One job, or ``None``."""
        with self._tx() as session:
            job = session.get(Job, job_id)
            if job is None:
                return None
            return JobRecord._from_rows(job, session.get_one(Series, job.series_id))

    def list_jobs(
        self,
        *,
        state: JobState | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally filtered.

        Parameters
        ----------
        state
            Only jobs in this state.
        since, until
            Only jobs created at or after `since` and before `until` (timezone-aware).
        study_instance_uid
            Only jobs of series in this study.
        limit, offset
            The page.
        """
        stmt = (
            select(Job, Series)
            .join(Series, Job.series_id == Series.id)
            .where(*self._filters(state, since, until, study_instance_uid))
            .order_by(Job.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._tx() as session:
            return [JobRecord._from_rows(j, s) for j, s in session.execute(stmt)]

    def count_jobs(
        self,
        *,
        state: JobState | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        study_instance_uid: str | None = None,
    ) -> int:
        """How many jobs :meth:`list_jobs` would list with the same filters and no page."""
        stmt = (
            select(func.count(Job.id))
            .join(Series, Job.series_id == Series.id)
            .where(*self._filters(state, since, until, study_instance_uid))
        )
        with self._tx() as session:
            return int(session.scalar(stmt) or 0)

    @staticmethod
    def _filters(
        state: JobState | None,
        since: datetime | None,
        until: datetime | None,
        study_instance_uid: str | None,
    ) -> list[ColumnElement[bool]]:
        clauses: list[ColumnElement[bool]] = []
        if state is not None:
            clauses.append(Job.state == state)
        if since is not None:
            clauses.append(Job.created_at >= since)
        if until is not None:
            clauses.append(Job.created_at < until)
        if study_instance_uid is not None:
            clauses.append(Series.study_instance_uid == study_instance_uid)
        return clauses

    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (every state present, zero included)."""
        with self._tx() as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state))
            counts = dict.fromkeys(JobState, 0)
            counts.update({state: n for state, n in rows})
            return counts
