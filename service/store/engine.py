"""The job store's engine, transactions and state changes, shared by all its parts.

SQLite (single node) and PostgreSQL (several nodes) run the same code:

- On SQLite every transaction starts with ``BEGIN IMMEDIATE``: writers queue on the
  database lock instead of failing to upgrade a read lock, and a claim is a guarded
  ``UPDATE ... WHERE state = 'QUEUED'`` that cannot take a job twice.
- On PostgreSQL the rows a transaction will change are read with ``SELECT ... FOR UPDATE``
  (``SKIP LOCKED`` when claiming), so workers on several machines never take the same job.

Every state change goes through :meth:`StoreBase._transition`, which checks it against
:func:`service.store.states.check_transition`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, object_session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from service.store.models import Instance, Job, Series
from service.store.records import (
    InstanceRecord,
    JobRecord,
    QueuedHook,
    QueuedJob,
    RetryPolicy,
)
from service.store.states import JobState, check_transition

__all__ = ["Clock", "StoreBase", "create_store_engine", "utc_now"]

logger = logging.getLogger(__name__)

_QUEUED_KEY = "unict_queued_jobs"

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC. Injectable so that tests drive time."""


def utc_now() -> datetime:
    """The wall clock in UTC."""
    return datetime.now(UTC)


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


class StoreBase:
    """The connection, the transactions and the state changes every part of the store shares.

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

    def _logged(
        self,
        session: Session,
        job: Job,
        what: str,
        *,
        level: int = logging.INFO,
        stage: str | None = None,
    ) -> JobRecord:
        """Log `what` happened to `job` (with its series version) and return its record."""
        series = session.get_one(Series, job.series_id)
        extra: dict[str, object] = {"job_id": job.id, "series_uid": series.series_instance_uid}
        if stage is not None:
            extra["stage"] = stage
        logger.log(
            level,
            "job %d %s (series %s v%d)",
            job.id,
            what,
            series.series_instance_uid,
            job.version,
            extra=extra,
        )
        return JobRecord._from_rows(job, series)

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
