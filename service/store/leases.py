"""Leases on jobs: the workers' and the queue's part of the job store.

A worker claims a ``QUEUED`` job (the oldest due, or one a queue delivered), holds a lease
it renews while it works, and ends the job with :meth:`LeaseStore.finish` or
:meth:`LeaseStore.fail`; :meth:`LeaseStore.reclaim_expired` takes back the jobs of workers
that crashed or hung.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.errors import JobNotFound, LeaseLost
from service.stages import Stage
from service.store.engine import StoreBase
from service.store.models import Job, Series
from service.store.records import InstanceRecord, JobRecord
from service.store.states import ACTIVE_STATES, JobState, check_transition

__all__ = ["LeaseStore"]


class LeaseStore(StoreBase):
    """What the workers and the queue call: claims, leases, and the end of a run."""

    def claim_next_job(self, worker_id: str, lease_s: float) -> JobRecord | None:
        """Take the oldest runnable ``QUEUED`` job and lease it to `worker_id`.

        Atomic on both backends: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, a guarded
        ``UPDATE ... WHERE state = 'QUEUED'`` on SQLite.

        Returns
        -------
        JobRecord or None
            The job, now ``RUNNING`` with its attempt counted; ``None`` if none is due.
        """
        now = self._clock()
        due = (Job.state == JobState.QUEUED) & (
            Job.next_retry_at.is_(None) | (Job.next_retry_at <= now)
        )
        with self._tx() as session:
            if self._is_sqlite:
                while True:
                    candidate = session.scalars(
                        select(Job.id).where(due).order_by(Job.id).limit(1)
                    ).first()
                    if candidate is None:
                        return None
                    check_transition(JobState.QUEUED, JobState.RUNNING)
                    result = session.execute(
                        update(Job)
                        .where(Job.id == candidate, Job.state == JobState.QUEUED)
                        .values(
                            state=JobState.RUNNING,
                            attempts=Job.attempts + 1,
                            lease_owner=worker_id,
                            lease_expires_at=now + timedelta(seconds=lease_s),
                            next_retry_at=None,
                            updated_at=now,
                        )
                        .execution_options(synchronize_session=False)
                    )
                    if result.rowcount == 1:  # type: ignore[attr-defined]
                        job = session.get_one(Job, candidate, populate_existing=True)
                        break
            else:
                found = session.scalars(
                    select(Job)
                    .where(due)
                    .order_by(Job.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if found is None:
                    return None
                job = found
                self._take_lease(job, worker_id, lease_s, now)
            return self._claimed(session, job, worker_id)

    def _take_lease(self, job: Job, worker_id: str, lease_s: float, now: datetime) -> None:
        """``QUEUED`` -> ``RUNNING`` with one more attempt, leased to ``worker_id``."""
        self._transition(job, JobState.RUNNING, now)
        job.attempts += 1
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_s)
        job.next_retry_at = None

    def _claimed(self, session: Session, job: Job, worker_id: str) -> JobRecord:
        """The record of a job just leased, logged with its attempt and series."""
        return self._logged(
            session, job, f"claimed by {worker_id}, attempt {job.attempts}/{job.max_attempts}"
        )

    def claim_job(self, job_id: int, worker_id: str, lease_s: float) -> JobRecord | None:
        """Take one given ``QUEUED`` job and lease it to `worker_id` (a queue delivered it).

        Its retry time is not checked: the queue already held the delivery until then, and
        the worker's clock may differ from the receiver's.

        Returns
        -------
        JobRecord or None
            The job, now ``RUNNING`` with its attempt counted; ``None`` if it is not
            ``QUEUED`` (another worker has it, it ended, or it was superseded).
        """
        now = self._clock()
        with self._tx() as session:
            stmt = select(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
            if not self._is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            job = session.scalars(stmt).first()
            if job is None:
                return None
            self._take_lease(job, worker_id, lease_s, now)
            return self._claimed(session, job, worker_id)

    def job_instances(self, job_id: int) -> list[InstanceRecord]:
        """The instances of the series version a job analyses."""
        with self._tx() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFound(f"no job {job_id}")
            series_id = job.series_id
        return self.series_instances(series_id)

    def renew_lease(self, job_id: int, worker_id: str, lease_s: float) -> bool:
        """Extend the lease of `worker_id` on a running job; ``False`` if it lost it."""
        now = self._clock()
        with self._tx() as session:
            result = session.execute(
                update(Job)
                .where(
                    Job.id == job_id,
                    Job.lease_owner == worker_id,
                    Job.state.in_(ACTIVE_STATES),
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def _leased(self, session: Session, job_id: int, worker_id: str | None) -> Job:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise JobNotFound(f"no job {job_id}")
        if worker_id is not None and (
            job.lease_owner != worker_id or job.state not in ACTIVE_STATES
        ):
            raise LeaseLost(
                f"job {job_id} is {job.state.value}, leased to {job.lease_owner or 'nobody'}, "
                f"not to {worker_id}"
            )
        return job

    def mark_sending(
        self,
        job_id: int,
        worker_id: str,
        timings: Mapping[str, float],
        result: Mapping[str, Any] | None = None,
    ) -> JobRecord:
        """``RUNNING -> SENDING``, with the processing stage timings and what was found
        (``outputs["result"]``: findings, measurements, report text; no patient data).

        Raises
        ------
        LeaseLost
            `worker_id` no longer holds the job.
        """
        now = self._clock()
        with self._tx() as session:
            job = self._leased(session, job_id, worker_id)
            self._transition(job, JobState.SENDING, now)
            job.timings = {**job.timings, **timings}
            if result is not None:
                job.outputs = {**job.outputs, "result": dict(result)}
            return JobRecord._from_rows(job, session.get_one(Series, job.series_id))

    def finish(
        self,
        job_id: int,
        worker_id: str,
        *,
        timings: Mapping[str, float],
        sent: Sequence[Mapping[str, Any]],
    ) -> JobRecord:
        """``SENDING -> DONE``: record the send timings and what was sent where."""
        now = self._clock()
        with self._tx() as session:
            job = self._leased(session, job_id, worker_id)
            self._transition(job, JobState.DONE, now)
            job.timings = {**job.timings, **timings}
            job.outputs = {**job.outputs, "sent": [dict(s) for s in sent]}
            job.lease_owner = None
            job.lease_expires_at = None
            job.error_stage = None
            job.error_reason = None
            return self._logged(session, job, "DONE")

    def fail(
        self,
        job_id: int,
        worker_id: str | None,
        *,
        stage: Stage | None,
        reason: str,
        retryable: bool,
        timings: Mapping[str, float] | None = None,
        sent: Sequence[Mapping[str, Any]] | None = None,
    ) -> JobRecord:
        """Record a failure: back to ``QUEUED`` with a backoff if `retryable` and attempts
        remain, otherwise ``FAILED``.

        Parameters
        ----------
        job_id, worker_id
            The job and the worker holding it (``None`` to skip the lease check).
        stage
            The :class:`~service.stages.Stage` where it failed (``None`` if unknown).
        reason
            What went wrong, for an admin; no patient identifiers.
        retryable
            Whether another run may succeed.
        timings, sent
            Stage timings and per-instance send results gathered so far.
        """
        now = self._clock()
        with self._tx() as session:
            job = self._leased(session, job_id, worker_id)
            if retryable and job.attempts < job.max_attempts:
                self._transition(job, JobState.QUEUED, now)
                job.next_retry_at = now + self.retry_policy.delay(job.attempts)
            else:
                self._transition(job, JobState.FAILED, now)
                job.next_retry_at = None
                if retryable:
                    reason = f"{reason} (gave up after {job.attempts} attempts)"
            job.error_stage = stage
            job.error_reason = reason
            job.lease_owner = None
            job.lease_expires_at = None
            if timings:
                job.timings = {**job.timings, **timings}
            if sent is not None:
                job.outputs = {**job.outputs, "sent": [dict(s) for s in sent]}
            return self._logged(
                session,
                job,
                f"{job.state.value} at {stage or 'an unknown stage'}: {reason}",
                level=logging.WARNING,
                stage=stage,
            )

    def reclaim_expired(self) -> list[JobRecord]:
        """Take back running jobs whose lease expired (their worker crashed or hung).

        Each goes back to ``QUEUED`` (at once) if attempts remain, otherwise to ``FAILED``.
        """
        now = self._clock()
        out: list[JobRecord] = []
        with self._tx() as session:
            stmt = (
                select(Job)
                .where(Job.state.in_(ACTIVE_STATES), Job.lease_expires_at < now)
                .order_by(Job.id)
            )
            if not self._is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            for job in session.scalars(stmt).all():
                owner = job.lease_owner
                job.error_stage = None
                job.lease_owner = None
                job.lease_expires_at = None
                if job.attempts < job.max_attempts:
                    self._transition(job, JobState.QUEUED, now)
                    job.next_retry_at = now
                    job.error_reason = f"lease of {owner} expired; re-queued"
                else:
                    self._transition(job, JobState.FAILED, now)
                    job.error_reason = f"lease of {owner} expired after {job.attempts} attempts"
                out.append(
                    self._logged(session, job, job.error_reason, level=logging.WARNING)
                )
        return out
