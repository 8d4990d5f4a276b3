"""The node: job store, DICOM listener, assembler, workers and HTTP API wired together.

Typical use (the integrator's CLI)::

    settings = load_settings(Path("config.yaml"))
    setup_logging(settings.logging)
    node = Node(settings, processor=my_processor, engine_status=my_engine_status)
    node.start()          # migrations (if configured), listener bound, threads running
    ...                   # until SIGTERM
    node.stop()

The processor is ``Callable[[ClaimedJob], ProcessOutcome]`` (see :mod:`service.worker`);
``engine_status`` answers ``(loaded, detail)`` for ``/readyz``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType

from service.assembly import Assembler, CFindCounter, SeriesCounter
from service.config import Settings
from service.dicomweb.stow import StowService
from service.http import Check, api_token, create_app
from service.http_server import ServerThread
from service.metrics import NodeMetrics
from service.queue import apply_procrastinate_schema, queue_hook
from service.readiness import database_check, spool_space_check, status_check
from service.receiver import Receiver
from service.retention import RetentionCleaner
from service.sender import Sender
from service.store import Clock, JobStore, RetryPolicy, run_migrations, utc_now
from service.worker import Processor, SendFunction, Workers

__all__ = ["EngineStatus", "Node"]

logger = logging.getLogger(__name__)

EngineStatus = Callable[[], tuple[bool, str]]
"""Whether the inference engine is loaded, and a line saying which or why not."""


class Node:
    """One UniCT node.

    Parameters
    ----------
    settings
        The validated settings.
    processor
        Runs the analysis of a claimed job (the pipeline).
    engine_status
        Readiness of the inference engine.
    clock
        Time source of the job store (tests inject a fake one).
    send
        Replaces the C-STORE :class:`~service.sender.Sender` (tests).
    counter
        Replaces the C-FIND series counter built from ``assembly.sender_query``.
    """

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        engine_status: EngineStatus,
        *,
        clock: Clock = utc_now,
        send: SendFunction | None = None,
        counter: SeriesCounter | None = None,
    ) -> None:
        self.settings = settings
        self.engine_status = engine_status
        self._store = JobStore(
            settings.database.url,
            clock=clock,
            retry=RetryPolicy(
                max_attempts=settings.workers.max_attempts,
                backoff_s=settings.workers.retry_backoff_s,
                max_backoff_s=settings.workers.max_retry_backoff_s,
            ),
            on_queued=queue_hook(settings),
        )
        # With queue.backend procrastinate the node only receives: `unict-node worker`
        # processes run the jobs.
        self._embedded = settings.queue.backend == "embedded"
        if counter is None and settings.assembly.query_sender_for_count:
            counter = CFindCounter(
                settings.dicom.ae_title,
                settings.assembly.sender_query,
                settings.assembly.query_timeout_s,
            )
        self.metrics = NodeMetrics(self._store)
        self.assembler = Assembler(
            self._store, settings.assembly, settings.selection, counter=counter
        )
        self.receiver = Receiver(
            settings.dicom,
            settings.storage,
            self._store,
            listener=self.assembler,
            metrics=self.metrics,
        )
        self.sender: SendFunction = send or Sender(
            settings.destinations, settings.sender, calling_ae=settings.dicom.ae_title
        )
        self.workers = Workers(
            self._store, processor, self.sender, settings.workers, metrics=self.metrics
        )
        self.retention = RetentionCleaner(
            self._store, settings.storage.spool_dir, settings.retention
        )
        # STOW-RS (POST /studies) on the same HTTP server, into the same ingest path.
        self.stow = (
            StowService(self.receiver, settings.dicomweb) if settings.dicomweb.enabled else None
        )
        self.app = create_app(
            self,
            token=api_token(settings.http),
            metrics=self.metrics,
            destinations=settings.destinations,
            routes=self.stow.routes() if self.stow is not None else (),
        )
        self._http: ServerThread | None = None
        self._started = False

    @property
    def store(self) -> JobStore:
        """The job store (job records: ``list_jobs``, ``get_job``, ``retry``)."""
        return self._store

    # ------------------------------------------------------------ lifecycle

    def start(self, *, http: bool = True) -> None:
        """Start everything; on any failure stop what was started and re-raise.

        Parameters
        ----------
        http
            Also serve the HTTP API (uvicorn in a thread).
        """
        if self._started:
            raise RuntimeError("the node is already running")
        try:
            if self.settings.database.migrate_on_start:
                run_migrations(self.settings.database.url)
                if not self._embedded:
                    apply_procrastinate_schema(self.settings.database.url)
            self._store.ping()
            self.settings.storage.spool_dir.mkdir(parents=True, exist_ok=True)
            self.receiver.start()
            self.assembler.start()
            if self._embedded:
                self.workers.start()
            if self.settings.retention.enabled:
                self.retention.start()
            if http:
                server = ServerThread(
                    self.app,
                    self.settings.http.host,
                    self.settings.http.port,
                    tls=self.settings.http.tls,
                )
                server.start()
                self._http = server
        except BaseException:
            self.stop()
            raise
        self._started = True
        logger.info("node %s started", self.settings.dicom.ae_title)

    def stop(self) -> None:
        """Stop in reverse order: HTTP, listener, assembler, workers (running jobs finish),
        retention cleaner."""
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.receiver.stop()
        self.assembler.stop()
        self.workers.stop()
        self.retention.stop()
        self._store.close()
        if self._started:
            logger.info("node %s stopped", self.settings.dicom.ae_title)
        self._started = False

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------ status

    @property
    def dicom_port(self) -> int:
        """The DICOM listener's bound port."""
        return self.receiver.port

    @property
    def http_port(self) -> int:
        """The HTTP API's bound port."""
        if self._http is None:
            raise RuntimeError("the HTTP API is not running")
        return self._http.port

    @property
    def listener_bound(self) -> bool:
        """Whether the DICOM listener is bound and serving."""
        return self.receiver.is_bound

    @property
    def ready(self) -> bool:
        """Whether every readiness check passes now."""
        return all(c.ok for c in self.readiness())

    def readiness(self) -> list[Check]:
        """Run the readiness checks (what ``/readyz`` reports)."""
        checks = [database_check(self._store), status_check("engine", self.engine_status)]
        if self.receiver.is_bound:
            host, port = self.receiver.address
            checks.append(
                Check("dicom_listener", True, f"{self.settings.dicom.ae_title} on {host}:{port}")
            )
        else:
            checks.append(Check("dicom_listener", False, "not bound"))
        checks.append(spool_space_check(self.settings.storage))
        checks.append(
            Check(
                "assembler",
                self.assembler.is_alive,
                "running" if self.assembler.is_alive else "not running",
            )
        )
        if self._embedded:
            alive, wanted = self.workers.alive, self.settings.workers.count
            checks.append(Check("workers", alive == wanted, f"{alive} of {wanted} running"))
        else:
            checks.append(
                Check(
                    "workers",
                    True,
                    f"`unict-node worker` processes on queue {self.settings.queue.name}",
                )
            )
        return checks
