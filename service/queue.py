"""How a ``QUEUED`` job reaches a worker: the ``queue.backend`` setting.

- ``embedded`` (one node): no hook; the in-process :class:`~service.worker.Workers` poll
  the job store.
- ``procrastinate`` (several machines): :class:`ProcrastinateQueue` is the job store's
  :data:`~service.store.QueuedHook`. Whenever a job becomes ``QUEUED`` (series complete,
  retry after a retryable failure, expired lease, admin retry) it defers a procrastinate
  job *in the same transaction*, through procrastinate's own SQL function
  ``procrastinate_defer_jobs_v1`` (its Python connectors own their connections and cannot
  join ours). Its ``queueing_lock`` and ``lock`` are keyed on the series version, so a
  version waits in the queue at most once and runs on one worker at a time.
  ``unict-node worker`` processes (:func:`run_procrastinate_worker`) run those jobs.

The job store stays the source of truth: a delivery claims its job only if it is
``QUEUED`` (:meth:`~service.store.JobStore.claim_job`) under a lease, so a second
delivery of the same job does nothing. A worker lost mid-job is recovered twice over:
procrastinate's stalled-job recovery (a silent worker's jobs are retried, which also
frees the series' lock) and the lease's expiry (the job goes back to ``QUEUED`` and is
deferred again). Deterministic output UIDs keep a re-run from sending new objects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from importlib import resources
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.config import QueueSettings, Settings
from service.store import JobStore, QueuedHook, QueuedJob
from service.store.engine import create_store_engine

if TYPE_CHECKING:
    import procrastinate

    from service.worker import Workers

__all__ = [
    "TASK_NAME",
    "ProcrastinateQueue",
    "QueueStatus",
    "apply_procrastinate_schema",
    "job_lock",
    "queue_hook",
    "run_procrastinate_worker",
]

logger = logging.getLogger(__name__)

TASK_NAME = "unict.run_job"
"""The procrastinate task that runs one job of the job store (its only argument: job_id)."""

_QUEUEING_LOCK_INDEX = "procrastinate_jobs_queueing_lock_idx_v1"
# Any constant: serialises concurrent schema installs (two receivers starting at once).
_SCHEMA_ADVISORY_LOCK = 0x756E6963


def job_lock(series_instance_uid: str, version: int) -> str:
    """The procrastinate ``lock`` and ``queueing_lock`` of a series version."""
    return f"unict-series:{series_instance_uid}:v{version}"


class ProcrastinateQueue:
    """Defers a procrastinate job in the transaction that queues a job of the store.

    Parameters
    ----------
    queue_name
        The procrastinate queue (``queue.name``).
    """

    def __init__(self, queue_name: str) -> None:
        self.queue_name = queue_name

    def __call__(self, session: Session, job: QueuedJob) -> None:
        lock = job_lock(job.series_instance_uid, job.version)
        extra = {"job_id": job.job_id, "series_uid": job.series_instance_uid}
        try:
            # A savepoint: a delivery already waiting (same queueing lock) must not abort
            # the transaction that changes the job's state.
            with session.begin_nested():
                session.execute(
                    text(
                        "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW("
                        ":queue, :task, 0, :lock, :lock, CAST(:args AS jsonb), "
                        "CAST(:at AS timestamptz))::procrastinate_job_to_defer_v1])"
                    ),
                    {
                        "queue": self.queue_name,
                        "task": TASK_NAME,
                        "lock": lock,
                        "args": json.dumps({"job_id": job.job_id}),
                        "at": job.not_before,
                    },
                )
        except IntegrityError as exc:
            if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != (
                _QUEUEING_LOCK_INDEX
            ):
                raise
            logger.info("job %d: a delivery is already waiting", job.job_id, extra=extra)
            return
        logger.info("job %d deferred to queue %s", job.job_id, self.queue_name, extra=extra)


def queue_hook(settings: Settings) -> QueuedHook | None:
    """The job store's hook for ``queue.backend`` (``None`` for ``embedded``)."""
    if settings.queue.backend == "procrastinate":
        return ProcrastinateQueue(settings.queue.name)
    return None


def apply_procrastinate_schema(url: str) -> bool:
    """Install procrastinate's schema (of the installed version) in the database at `url`.

    PostgreSQL only; a no-op where ``procrastinate_jobs`` already exists.

    Returns
    -------
    bool
        Whether the schema was installed now.
    """
    if make_url(url).get_backend_name() != "postgresql":
        raise ValueError("procrastinate needs PostgreSQL")
    schema = (resources.files("procrastinate.sql") / "schema.sql").read_text(encoding="utf-8")
    engine = create_store_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_ADVISORY_LOCK})
            if conn.execute(text("SELECT to_regclass('procrastinate_jobs')")).scalar():
                return False
            # The raw psycopg connection, in the same transaction: without parameters the
            # script runs as is (several statements; '%' is not a placeholder).
            driver = conn.connection.driver_connection
            assert driver is not None
            driver.execute(schema)
        logger.info("procrastinate schema installed")
        return True
    finally:
        engine.dispose()


def _conninfo(url: str) -> str:
    """The libpq connection string of a SQLAlchemy ``postgresql+psycopg://`` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def procrastinate_app(url: str, concurrency: int) -> procrastinate.App:
    """A procrastinate app on the job store's database (pool sized for `concurrency`)."""
    import procrastinate

    connector = procrastinate.PsycopgConnector(
        conninfo=_conninfo(url), min_size=1, max_size=concurrency + 3
    )
    return procrastinate.App(connector=connector)


async def _maintain(app: procrastinate.App, store: JobStore, queue: QueueSettings) -> None:
    """Retry the procrastinate jobs of lost workers and take back expired leases, forever."""
    from procrastinate import exceptions
    from procrastinate.jobs import Status

    while True:
        try:
            stalled = await app.job_manager.get_stalled_jobs(
                queue=queue.name, seconds_since_heartbeat=queue.stalled_after_s
            )
            for job in stalled:
                logger.warning(
                    "procrastinate job %s of a lost worker (%s): retrying", job.id, job.lock
                )
                try:
                    await app.job_manager.retry_job(job)
                except exceptions.UniqueViolation:
                    # Another delivery of the same series version already waits: this one
                    # is redundant; ending it frees the series' lock.
                    await app.job_manager.finish_job(job, Status.FAILED, delete_job=False)
            # An expired lease re-queues the job, whose hook defers a new delivery.
            await asyncio.to_thread(store.reclaim_expired)
        except Exception:
            # Nothing is lost (the state is in the database); the next round tries again.
            logger.exception("queue maintenance failed; retrying")
        await asyncio.sleep(queue.maintenance_interval_s)


class QueueStatus:
    """Readiness of a :func:`run_procrastinate_worker` (the ``queue`` check of ``/readyz``).

    Ready while the procrastinate worker runs and its event loop gets a ``SELECT 1``
    through procrastinate's own connection pool within `timeout` seconds: that checks the
    queue's database connection and that the loop (heartbeat, job fetching) is not stuck.
    :meth:`status` is called from other threads (the HTTP API's).

    Parameters
    ----------
    queue_name
        The procrastinate queue (``queue.name``), for the detail line.
    timeout
        Seconds the probe query may take.
    """

    def __init__(self, queue_name: str, timeout: float = 2.0) -> None:
        self.queue_name = queue_name
        self.timeout = timeout
        self._app: procrastinate.App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def running(self, app: procrastinate.App, loop: asyncio.AbstractEventLoop) -> None:
        """The worker runs on `loop` with `app` (its connector open)."""
        self._app, self._loop = app, loop

    def stopped(self) -> None:
        """The worker stopped (or is stopping)."""
        self._app, self._loop = None, None

    def status(self) -> tuple[bool, str]:
        """``(ready, detail)``: the worker runs and reaches PostgreSQL."""
        app, loop = self._app, self._loop
        if app is None or loop is None:
            return False, f"procrastinate worker not running (queue {self.queue_name})"
        query = app.connector.execute_query_one_async("SELECT 1 AS one")
        try:
            probe = asyncio.run_coroutine_threadsafe(query, loop)
        except RuntimeError:  # the loop closed in between: the worker has stopped
            query.close()
            return False, f"procrastinate worker not running (queue {self.queue_name})"
        try:
            probe.result(self.timeout)
        except concurrent.futures.TimeoutError:
            probe.cancel()
            return False, f"procrastinate did not answer within {self.timeout:g} s"
        except Exception as exc:
            return False, f"procrastinate connection failed: {type(exc).__name__}"
        return True, f"procrastinate worker on queue {self.queue_name}"


def run_procrastinate_worker(
    settings: Settings,
    store: JobStore,
    workers: Workers,
    status: QueueStatus | None = None,
) -> None:
    """Run procrastinate workers for ``queue.name`` until SIGTERM or SIGINT.

    Each delivery runs :meth:`Workers.run_job` in a thread (``workers.count`` at once);
    one background task does the stalled-job and lease maintenance. On SIGTERM,
    procrastinate stops fetching jobs and waits for the running ones, then this returns.

    Parameters
    ----------
    status
        Told when the worker runs and stops (the ``queue`` readiness check).
    """
    queue = settings.queue
    app = procrastinate_app(settings.database.url, settings.workers.count)

    @app.task(name=TASK_NAME, queue=queue.name, pass_context=True)
    def run_job(context: procrastinate.JobContext, job_id: int) -> None:
        delivery = context.job.id if context.job is not None else "?"
        workers.run_job(job_id, worker_id=f"{workers.name}-d{delivery}")

    async def main() -> None:
        async with app.open_async():
            maintenance = asyncio.create_task(_maintain(app, store, queue))
            if status is not None:
                status.running(app, asyncio.get_running_loop())
            try:
                await app.run_worker_async(
                    queues=[queue.name],
                    name=workers.name,
                    concurrency=settings.workers.count,
                    update_heartbeat_interval=queue.heartbeat_s,
                    stalled_worker_timeout=queue.stalled_after_s,
                    delete_jobs="successful",
                )
            finally:
                if status is not None:
                    status.stopped()
                maintenance.cancel()
                await asyncio.gather(maintenance, return_exceptions=True)

    logger.info(
        "worker %s: %d at once on procrastinate queue %s",
        workers.name,
        settings.workers.count,
        queue.name,
    )
    asyncio.run(main())
