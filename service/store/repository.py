"""The job store: every state change of series and jobs, one transaction each.

:class:`JobStore` is what the receiver, the assembler, the workers and the HTTP API use.
SQLite (single node) and PostgreSQL (several nodes) run the same code:

- On SQLite every transaction starts with ``BEGIN IMMEDIATE``: writers queue on the
  database lock instead of failing to upgrade a read lock, and a claim is a guarded
  ``UPDATE ... WHERE state = 'QUEUED'`` that cannot take a job twice.
- On PostgreSQL the rows a transaction will change are read with ``SELECT ... FOR UPDATE``
  (``SKIP LOCKED`` when claiming), so workers on several machines never take the same job.

Every state change goes through :func:`service.store.states.check_transition`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Engine,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from service.errors import IllegalTransition, JobNotFound, LeaseLost
from service.store.models import Instance, Job, Series
from service.store.states import ACTIVE_STATES, ENDED_STATES, JobState, check_transition

__all__ = [
    "Clock",
    "InstanceRecord",
    "JobRecord",
    "JobStore",
    "PendingSeries",
    "QueuedHook",
    "QueuedJob",
    "ReceivedInstance",
    "RecordOutcome",
    "RecordResult",
    "RetryPolicy",
    "StudyRetention",
    "create_store_engine",
    "utc_now",
]

logger = logging.getLogger(__name__)

_QUEUED_KEY = "unict_queued_jobs"

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC. Injectable so that tests drive time."""


def utc_now() -> datetime:
    """The wall clock in UTC."""
    return datetime.now(UTC)


# --------------------------------------------------------------------------- records


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
that a queue backend can enqueue it atomically with the state change (DESIGN.md §6)."""


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
    """Its files were already removed (``outputs["spool_removed_at"]`` on every job)."""


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


# --------------------------------------------------------------------------- engine


def create_store_engine(url: str) -> Engine:
    """Create the SQLAlchemy engine for `url`, configured for concurrent writers.

    SQLite gets WAL, foreign keys, a busy timeout and ``BEGIN IMMEDIATE`` transactions;
    PostgreSQL gets ``pool_pre_ping`` so a restarted server is noticed.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE (below) instead of
            # pysqlite's deferred BEGIN.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


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


# --------------------------------------------------------------------------- the store


class JobStore:
    """Series, instances and jobs in a SQL database.

    Parameters
    ----------
    url
        SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``.
        The schema must exist (see :func:`service.store.run_migrations`).
    clock
        Source of "now" for every timestamp, lease and retry time.
    retry
        Attempts and backoff of jobs that fail for a retryable reason.
    on_queued
        Called in the same transaction whenever a job becomes ``QUEUED`` (series complete,
        retry, expired lease, admin retry); an exception there rolls the change back.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock = utc_now,
        retry: RetryPolicy | None = None,
        on_queued: QueuedHook | None = None,
    ) -> None:
        self.url = url
        self.engine = create_store_engine(url)
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._clock = clock
        self.retry_policy = retry or RetryPolicy()
        self._on_queued = on_queued

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    def now(self) -> datetime:
        """The store's clock (the one every timestamp it writes comes from)."""
        return self._clock()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session
            queued: list[Job] = session.info.pop(_QUEUED_KEY, [])
            if self._on_queued is not None:
                for job in queued:
                    if job.state is not JobState.QUEUED:
                        continue
                    series = session.get_one(Series, job.series_id)
                    self._on_queued(
                        session,
                        QueuedJob(
                            job_id=job.id,
                            study_instance_uid=series.study_instance_uid,
                            series_instance_uid=series.series_instance_uid,
                            version=job.version,
                            not_before=job.next_retry_at,
                        ),
                    )

    def ping(self) -> None:
        """Run a trivial query; raises if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()

    # ----------------------------------------------------------------- receiving

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
            job.error_stage = "assembly"
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

    # ----------------------------------------------------------------- assembly

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

    def series_instances(self, series_id: int) -> list[InstanceRecord]:
        """The instances of a series version, in arrival order."""
        with self._tx() as session:
            rows = session.scalars(
                select(Instance).where(Instance.series_id == series_id).order_by(Instance.id)
            ).all()
            return [
                InstanceRecord(
                    sop_instance_uid=r.sop_instance_uid,
                    sop_class_uid=r.sop_class_uid,
                    path=Path(r.path),
                    size=r.size,
                    sha256=r.sha256,
                    header=dict(r.header),
                )
                for r in rows
            ]

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

    # ----------------------------------------------------------------- workers

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

    @staticmethod
    def _claimed(session: Session, job: Job, worker_id: str) -> JobRecord:
        """The record of a job just leased, logged with its attempt and series."""
        series = session.get_one(Series, job.series_id)
        logger.info(
            "job %d claimed by %s (attempt %d/%d, series %s v%d)",
            job.id,
            worker_id,
            job.attempts,
            job.max_attempts,
            series.series_instance_uid,
            job.version,
            extra={"job_id": job.id, "series_uid": series.series_instance_uid},
        )
        return JobRecord._from_rows(job, series)

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
            series = session.get_one(Series, job.series_id)
            logger.info(
                "job %d DONE (series %s v%d)",
                job.id,
                series.series_instance_uid,
                job.version,
                extra={"job_id": job.id, "series_uid": series.series_instance_uid},
            )
            return JobRecord._from_rows(job, series)

    def fail(
        self,
        job_id: int,
        worker_id: str | None,
        *,
        stage: str | None,
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
            The :class:`~service.errors.Stage` value where it failed (``None`` if unknown).
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
            series = session.get_one(Series, job.series_id)
            logger.warning(
                "job %d %s at %s: %s",
                job.id,
                job.state.value,
                stage or "an unknown stage",
                reason,
                extra={"job_id": job.id, "series_uid": series.series_instance_uid, "stage": stage},
            )
            return JobRecord._from_rows(job, series)

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
                series = session.get_one(Series, job.series_id)
                logger.warning(
                    "job %d: %s",
                    job.id,
                    job.error_reason,
                    extra={"job_id": job.id, "series_uid": series.series_instance_uid},
                )
                out.append(JobRecord._from_rows(job, series))
        return out

    # ----------------------------------------------------------------- retention

    def studies_for_retention(self) -> list[StudyRetention]:
        """Every study with its jobs' state, oldest-ended first."""
        stmt = select(Series.study_instance_uid, Job.id, Job.state, Job.updated_at, Job.outputs)
        stmt = stmt.join(Series, Job.series_id == Series.id)
        studies: dict[str, list[tuple[int, JobState, datetime, Mapping[str, Any]]]] = {}
        with self._tx() as session:
            for study, job_id, state, updated, outputs in session.execute(stmt):
                studies.setdefault(study, []).append((job_id, state, updated, outputs or {}))
        out = [
            StudyRetention(
                study_instance_uid=study,
                ended=all(state in ENDED_STATES for _, state, _, _ in jobs),
                ended_at=max(updated for _, _, updated, _ in jobs),
                failed=any(state is JobState.FAILED for _, state, _, _ in jobs),
                job_ids=tuple(sorted(job_id for job_id, _, _, _ in jobs)),
                spool_removed=all("spool_removed_at" in outputs for _, _, _, outputs in jobs),
            )
            for study, jobs in studies.items()
        ]
        return sorted(out, key=lambda s: s.ended_at)

    def study_files(self, study_instance_uid: str) -> set[Path]:
        """The spool files of every instance of every version of a study's series."""
        stmt = (
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .where(Series.study_instance_uid == study_instance_uid)
            .distinct()
        )
        with self._tx() as session:
            return {Path(p) for p in session.scalars(stmt)}

    def files_in_use(self) -> set[Path]:
        """Spool files that a job not yet ended refers to: never to be removed.

        Read in the same transaction as nothing else, so the cleaner checks it again right
        before deleting (a late instance may have started a new version meanwhile).
        """
        stmt = (
            select(Instance.path)
            .join(Series, Instance.series_id == Series.id)
            .join(Job, Job.series_id == Series.id)
            .where(Job.state.not_in(ENDED_STATES))
            .distinct()
        )
        with self._tx() as session:
            return {Path(p) for p in session.scalars(stmt)}

    def mark_spool_removed(self, job_ids: Sequence[int]) -> None:
        """Note on each job (``outputs["spool_removed_at"]``) that its files left the spool."""
        now = self._clock()
        with self._tx() as session:
            for job_id in job_ids:
                job = session.get(Job, job_id, with_for_update=True)
                if job is not None:
                    job.outputs = {**job.outputs, "spool_removed_at": now.isoformat()}

    # ----------------------------------------------------------------- admin

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
            series = session.get_one(Series, job.series_id)
            logger.info(
                "job %d re-queued by an admin",
                job.id,
                extra={"job_id": job.id, "series_uid": series.series_instance_uid},
            )
            return JobRecord._from_rows(job, series)

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

    @staticmethod
    def _transition(job: Job, new: JobState, now: datetime) -> None:
        check_transition(job.state, new)
        job.state = new
        job.updated_at = now
        if new is JobState.QUEUED:
            # The queue hook runs when the transaction is about to commit, once the job's
            # retry time and everything else of this change are set.
            session = object_session(job)
            if session is not None:
                session.info.setdefault(_QUEUED_KEY, []).append(job)
