"""Series versions still receiving, and their completion: the assembler's part of the store."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from service.store.engine import StoreBase
from service.store.models import Job, Series
from service.store.records import JobRecord, PendingSeries
from service.store.states import JobState

__all__ = ["AssemblyStore"]


class AssemblyStore(StoreBase):
    """What the assembler calls: pending series, their expected count, their completion."""

    def pending_series(self, *, quiet_since: datetime | None = None) -> list[PendingSeries]:
        """Series versions still receiving; with `quiet_since`, only those quiet since then."""
        stmt = (
            select(Series, Job)
            .join(Job, Job.series_id == Series.id)
            .where(Job.state == JobState.RECEIVING)
            .order_by(Series.id)
        )
        if quiet_since is not None:
            stmt = stmt.where(Series.last_received_at <= quiet_since)
        with self._tx() as session:
            return [
                PendingSeries(
                    series_id=s.id,
                    job_id=j.id,
                    study_instance_uid=s.study_instance_uid,
                    series_instance_uid=s.series_instance_uid,
                    version=s.version,
                    calling_ae=s.calling_ae,
                    instance_count=s.instance_count,
                    expected_count=s.expected_count,
                    last_received_at=s.last_received_at,
                )
                for s, j in session.execute(stmt)
            ]

    def series_ready(self, quiet_period_s: float) -> list[PendingSeries]:
        """Series versions still receiving with no new instance for `quiet_period_s`."""
        return self.pending_series(quiet_since=self._clock() - timedelta(seconds=quiet_period_s))

    def set_expected_count(self, series_id: int, count: int, source: str) -> None:
        """Record how many instances a series version should have (e.g. from a C-FIND)."""
        with self._tx() as session:
            series = session.get(Series, series_id, with_for_update=True)
            if series is None:
                raise LookupError(f"no series version {series_id}")
            series.expected_count = count
            series.expected_count_source = source

    def complete_series(
        self, series_id: int, *, instance_count: int, rejected_rule: str | None = None
    ) -> JobRecord | None:
        """Close a series version and queue (or reject) its job, in one transaction.

        Parameters
        ----------
        series_id
            The series version.
        instance_count
            How many instances the caller's decision was based on. If more arrived since,
            nothing changes and ``None`` is returned: the caller decides again later.
        rejected_rule
            The first selection rule the series failed, or ``None`` to queue it.

        Returns
        -------
        JobRecord or None
            The job, now ``QUEUED`` or ``REJECTED``; ``None`` if the series changed or its
            job had already left ``RECEIVING``.
        """
        now = self._clock()
        with self._tx() as session:
            series = session.get(Series, series_id, with_for_update=True)
            if series is None:
                raise LookupError(f"no series version {series_id}")
            job = session.scalars(
                select(Job).where(Job.series_id == series_id).with_for_update()
            ).one()
            if job.state is not JobState.RECEIVING or series.instance_count != instance_count:
                return None
            series.completed_at = now
            if rejected_rule is None:
                self._transition(job, JobState.QUEUED, now)
                job.next_retry_at = None
            else:
                self._transition(job, JobState.REJECTED, now)
                job.rejected_rule = rejected_rule
            return JobRecord._from_rows(job, series)
