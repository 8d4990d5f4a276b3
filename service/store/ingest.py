"""Recording received instances: the receiver's part of the job store.

An instance is recorded after its file is in the spool, in one transaction that also
starts a new series version when a late or changed instance arrives (never a silent mix).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.stages import Stage
from service.store.engine import StoreBase
from service.store.models import Instance, Job, Series
from service.store.records import ReceivedInstance, RecordOutcome, RecordResult
from service.store.states import JobState

__all__ = ["IngestStore"]

logger = logging.getLogger(__name__)


def _instance_columns(series_id: int, rec: ReceivedInstance, now: datetime) -> dict[str, Any]:
    """The ``instances`` row of a received instance in series version ``series_id``."""
    return {
        "series_id": series_id,
        "sop_instance_uid": rec.sop_instance_uid,
        "sop_class_uid": rec.sop_class_uid,
        "path": str(rec.path),
        "size": rec.size,
        "sha256": rec.sha256,
        "received_at": now,
        "header": dict(rec.header),
    }


def _expected_count_update(rec: ReceivedInstance, count_source: str | None) -> dict[str, Any]:
    """The series columns an instance's Images in Acquisition sets: none when it has no
    count, or when the count came from the sender's C-FIND (which takes precedence)."""
    if rec.expected_count is None or count_source == "C-FIND":
        return {}
    return {"expected_count": rec.expected_count, "expected_count_source": "ImagesInAcquisition"}


class IngestStore(StoreBase):
    """What the receiver calls: :meth:`record_instance`, or :meth:`record_instances` for a batch."""

    def record_instance(self, received: ReceivedInstance) -> RecordResult:
        """Record an instance written to the spool; idempotent on its SOP Instance UID.

        - A new instance of a series version still receiving is added to it.
        - The same SOP Instance UID with the same content (SHA-256) is a no-op.
        - A new instance for a series whose job has left ``RECEIVING`` (queued, running,
          done ...), or the same SOP Instance UID with different content, starts a new
          series version: it carries the previous version's instances over (the changed one
          replaced), gets a new job, and the previous job is marked superseded (and
          ``FAILED`` if it had not started yet). Never a silent mix.

        Returns
        -------
        RecordResult
            What was done, and the series version and job the instance belongs to.
        """
        for attempt in range(3):
            try:
                with self._tx() as session:
                    now = self._clock()
                    fast = self._record_common(session, received, now)
                    return fast if fast is not None else self._record(session, received, now)
            except IntegrityError:
                # Two associations raced to create the same series version (PostgreSQL;
                # SQLite serialises writers): the loser reads the winner's row next time.
                if attempt == 2:
                    raise
                logger.debug("series %s: concurrent insert, retrying", received.series_instance_uid)
        raise AssertionError("unreachable")

    def record_instances(self, batch: Sequence[ReceivedInstance]) -> list[RecordResult]:
        """Record several instances in one transaction, each as :meth:`record_instance` would.

        The receiver's batched path: one commit (one ``fsync`` of the database's log) for
        the instances an association delivered while the previous batch was being
        written. Results are in the order of `batch`. When two writers race to create the
        same series version (PostgreSQL), the batch is rolled back and its instances are
        recorded one by one.
        """
        if not batch:
            return []
        try:
            with self._tx() as session:
                now = self._clock()
                results: list[RecordResult] = []
                start = 0
                while start < len(batch):
                    end = start + 1
                    series_uid = batch[start].series_instance_uid
                    while end < len(batch) and batch[end].series_instance_uid == series_uid:
                        end += 1
                    run = batch[start:end]
                    done = self._record_run(session, run, now) if len(run) > 1 else []
                    results.extend(done)
                    for received in run[len(done) :]:
                        fast = self._record_common(session, received, now)
                        if fast is None:
                            fast = self._record(session, received, now)
                            # The next instance's statements read what this one wrote:
                            # flush the ORM objects, and reload them after core updates.
                            session.flush()
                            session.expire_all()
                        results.append(fast)
                    start = end
                return results
        except IntegrityError:
            logger.debug("batch of %d: concurrent insert, recording one by one", len(batch))
            return [self.record_instance(received) for received in batch]

    def _record_run(
        self, session: Session, run: Sequence[ReceivedInstance], now: datetime
    ) -> list[RecordResult]:
        """New instances of one series version still receiving, in four statements.

        Records the longest leading part of `run` (instances of one series) whose SOP
        Instance UIDs are neither stored nor repeated in the run, when the series' latest
        version is receiving; returns their results (empty: nothing recorded, the caller
        takes them one by one).
        """
        row = session.execute(
            select(Series.id, Series.version, Series.expected_count_source, Job.id, Job.state)
            .join(Job, Job.series_id == Series.id)
            .where(Series.series_instance_uid == run[0].series_instance_uid)
            .order_by(Series.version.desc())
            .limit(1)
            .with_for_update(of=(Series.__table__, Job.__table__))
        ).first()
        if row is None or row[4] is not JobState.RECEIVING:
            return []
        series_id, version, count_source, job_id, _ = row
        uids = [rec.sop_instance_uid for rec in run]
        stored = set(
            session.scalars(
                select(Instance.sop_instance_uid).where(
                    Instance.series_id == series_id, Instance.sop_instance_uid.in_(uids)
                )
            )
        )
        new: list[ReceivedInstance] = []
        for rec in run:
            if rec.sop_instance_uid in stored:
                break
            stored.add(rec.sop_instance_uid)
            new.append(rec)
        if not new:
            return []
        session.execute(insert(Instance), [_instance_columns(series_id, rec, now) for rec in new])
        counted = next((rec for rec in reversed(new) if rec.expected_count is not None), new[-1])
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(
                instance_count=Series.instance_count + len(new),
                last_received_at=now,
                **_expected_count_update(counted, count_source),
            )
        )
        return [RecordResult(RecordOutcome.STORED, series_id, version, job_id) for _ in new]

    def _record_common(
        self, session: Session, rec: ReceivedInstance, now: datetime
    ) -> RecordResult | None:
        """The common cases in three statements, without loading ORM objects: an instance
        of a series version still receiving, or a resend of one already stored.

        One query reads the latest version, its job and the same SOP instance if stored,
        locking the version and the job (``FOR UPDATE`` on PostgreSQL; SQLite's
        ``BEGIN IMMEDIATE`` serialises writers). ``None`` leaves the rest (first instance
        of a series, late or changed instances) to :meth:`_record`, in the same
        transaction. This is the C-STORE hot path: ``_record`` alone costs about twice
        as much per instance (``bench/bench_ingest.py``).
        """
        row = session.execute(
            select(
                Series.id,
                Series.version,
                Series.expected_count_source,
                Job.id,
                Job.state,
                Instance.sha256,
            )
            .join(Job, Job.series_id == Series.id)
            .outerjoin(
                Instance,
                (Instance.series_id == Series.id)
                & (Instance.sop_instance_uid == rec.sop_instance_uid),
            )
            .where(Series.series_instance_uid == rec.series_instance_uid)
            .order_by(Series.version.desc())
            .limit(1)
            .with_for_update(of=(Series.__table__, Job.__table__))
        ).first()
        if row is None:
            return None
        series_id, version, count_source, job_id, state, stored_sha = row
        receiving = state is JobState.RECEIVING
        if stored_sha is not None and stored_sha == rec.sha256:
            if receiving:  # a resend is still activity: keep the quiet period from expiring
                session.execute(
                    update(Series).where(Series.id == series_id).values(last_received_at=now)
                )
            return RecordResult(RecordOutcome.DUPLICATE, series_id, version, job_id)
        if stored_sha is not None or not receiving:
            return None
        session.execute(insert(Instance).values(**_instance_columns(series_id, rec, now)))
        session.execute(
            update(Series)
            .where(Series.id == series_id)
            .values(
                instance_count=Series.instance_count + 1,
                last_received_at=now,
                **_expected_count_update(rec, count_source),
            )
        )
        return RecordResult(RecordOutcome.STORED, series_id, version, job_id)

    def _record(self, session: Session, rec: ReceivedInstance, now: datetime) -> RecordResult:
        latest = session.scalars(
            select(Series)
            .where(Series.series_instance_uid == rec.series_instance_uid)
            .order_by(Series.version.desc())
            .limit(1)
            .with_for_update()
        ).first()
        if latest is None:
            series, job = self._new_version(session, rec, version=1, now=now)
            self._add_instance(session, series, rec, now)
            return RecordResult(RecordOutcome.STORED, series.id, series.version, job.id)

        job = session.scalars(select(Job).where(Job.series_id == latest.id).with_for_update()).one()
        existing = session.scalars(
            select(Instance).where(
                Instance.series_id == latest.id,
                Instance.sop_instance_uid == rec.sop_instance_uid,
            )
        ).first()
        receiving = job.state is JobState.RECEIVING
        if existing is not None and existing.sha256 == rec.sha256:
            if receiving:  # a resend is still activity: keep the quiet period from expiring
                latest.last_received_at = now
            return RecordResult(RecordOutcome.DUPLICATE, latest.id, latest.version, job.id)
        if existing is None and receiving:
            self._add_instance(session, latest, rec, now)
            return RecordResult(RecordOutcome.STORED, latest.id, latest.version, job.id)

        # Late or changed instance: a new version with everything received so far.
        series, new_job = self._new_version(session, rec, version=latest.version + 1, now=now)
        series.first_received_at = latest.first_received_at
        if latest.expected_count_source == "ImagesInAcquisition" and series.expected_count is None:
            series.expected_count = latest.expected_count
            series.expected_count_source = latest.expected_count_source
        carried = session.scalars(
            select(Instance).where(
                Instance.series_id == latest.id,
                Instance.sop_instance_uid != rec.sop_instance_uid,
            )
        ).all()
        for old in carried:
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=old.sop_instance_uid,
                    sop_class_uid=old.sop_class_uid,
                    path=old.path,
                    size=old.size,
                    sha256=old.sha256,
                    received_at=old.received_at,
                    header=old.header,
                )
            )
        series.instance_count = len(carried)
        self._add_instance(session, series, rec, now)
        job.superseded_by = new_job.id
        job.updated_at = now
        why = "changed content of an instance" if existing is not None else "a late instance"
        if job.state in (JobState.RECEIVING, JobState.QUEUED):
            self._transition(job, JobState.FAILED, now)
            job.error_stage = Stage.ASSEMBLY
            job.error_reason = f"superseded by job {new_job.id} (version {series.version}): {why}"
        logger.warning(
            "series %s: %s (sop %s) after job %d reached %s; new version %d, job %d",
            rec.series_instance_uid,
            why,
            rec.sop_instance_uid,
            job.id,
            job.state.value,
            series.version,
            new_job.id,
        )
        return RecordResult(
            RecordOutcome.NEW_VERSION, series.id, series.version, new_job.id, job.id
        )

    def _new_version(
        self, session: Session, rec: ReceivedInstance, *, version: int, now: datetime
    ) -> tuple[Series, Job]:
        series = Series(
            study_instance_uid=rec.study_instance_uid,
            series_instance_uid=rec.series_instance_uid,
            version=version,
            calling_ae=rec.calling_ae,
            first_received_at=now,
            last_received_at=now,
            instance_count=0,
        )
        session.add(series)
        session.flush()
        job = Job(
            series_id=series.id,
            version=version,
            state=JobState.RECEIVING,
            attempts=0,
            max_attempts=self.retry_policy.max_attempts,
            timings={},
            outputs={},
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        return series, job

    @staticmethod
    def _add_instance(
        session: Session, series: Series, rec: ReceivedInstance, now: datetime
    ) -> None:
        session.add(Instance(**_instance_columns(series.id, rec, now)))
        series.instance_count += 1
        series.last_received_at = now
        for name, value in _expected_count_update(rec, series.expected_count_source).items():
            setattr(series, name, value)
