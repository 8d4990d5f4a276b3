"""Worker threads: claim a queued job, run the processor, send the outputs, record it all.

A worker holds a lease on its job, renewed in the background while the processor runs;
a job whose lease expired (the worker crashed or hung) is taken back by
:meth:`JobStore.reclaim_expired` and runs again. The processor is injected:
``Callable[[ClaimedJob], ProcessOutcome]`` (the real one runs UniCT through
``service.pipeline.analyse_series``). Its :class:`~service.errors.StageError` failures are
recorded with their stage and reason, re-queued with backoff when retryable.

With a :class:`~service.metrics.NodeMetrics`, each stage's seconds go into its latency
histogram and every instance left unsent at a destination counts as a send failure.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from service.config import WorkersSettings
from service.errors import LeaseLost, StageError
from service.metrics import NodeMetrics
from service.selection import InstanceHeader
from service.sender import Output, SendFailure, SendResult
from service.stages import Stage
from service.store import InstanceRecord, JobRecord, JobState, JobStore

__all__ = [
    "ClaimedJob",
    "ProcessOutcome",
    "Processor",
    "SendFunction",
    "Workers",
    "sort_instances",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimedJob:
    """What a processor gets: one series version to analyse."""

    job_id: int
    version: int
    study_instance_uid: str
    series_instance_uid: str
    instance_paths: tuple[Path, ...]
    """The instance files, sorted along the slice normal (instance number if unknown)."""
    attempt: int = 1


@dataclass(frozen=True)
class ProcessOutcome:
    """What a processor returns: the objects to send and how long each stage took."""

    outputs: tuple[Output, ...]
    timings: Mapping[str, float] = field(default_factory=dict)
    """Seconds per stage (keys are :class:`~service.errors.Stage` values)."""
    summary: Mapping[str, Any] = field(default_factory=dict)
    """What was found (JSON-ready), kept with the job as ``outputs["result"]``."""


Processor = Callable[[ClaimedJob], ProcessOutcome]
SendFunction = Callable[[Sequence[Output]], list[SendResult]]


def sort_instances(instances: Sequence[InstanceRecord]) -> list[InstanceRecord]:
    """Order instances along the slice normal (PACS send in no guaranteed order).

    Falls back to InstanceNumber, then the SOP Instance UID, where positions are missing.
    """
    headers = [InstanceHeader.from_json(i.header) for i in instances]
    normal = next((n for h in headers if (n := h.slice_normal()) is not None), None)

    def key(pair: tuple[InstanceRecord, InstanceHeader]) -> tuple[float, float, str]:
        record, header = pair
        offset = math.inf
        if normal is not None and header.image_position is not None:
            offset = sum(p * n for p, n in zip(header.image_position, normal, strict=True))
        number = float(header.instance_number) if header.instance_number is not None else math.inf
        return (offset, number, record.sop_instance_uid)

    return [r for r, _ in sorted(zip(instances, headers, strict=True), key=key)]


class _LeaseKeeper:
    """Renews a job's lease every third of its length until closed; notes a lost lease."""

    def __init__(self, store: JobStore, job_id: int, worker_id: str, lease_s: float) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{worker_id}-{job_id}", daemon=True
        )

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                renewed = self.store.renew_lease(self.job_id, self.worker_id, self.lease_s)
            except Exception:
                # A database hiccup: try again next period; the lease may still hold.
                logger.exception(
                    "job %d: lease renewal failed", self.job_id, extra={"job_id": self.job_id}
                )
                continue
            if not renewed:
                logger.warning(
                    "job %d: lease lost by %s",
                    self.job_id,
                    self.worker_id,
                    extra={"job_id": self.job_id},
                )
                self.lost.set()
                return


class Workers:
    """A pool of worker threads on one job store.

    Parameters
    ----------
    store
        The job store.
    processor
        Runs the analysis of a claimed job.
    send
        Sends outputs to every destination (a :class:`~service.sender.Sender`).
    settings
        The ``workers`` settings: count, lease, polling.
    name
        Prefix of the worker ids (lease owners); defaults to a random one per process.
    metrics
        Where stage latencies and send failures are recorded (none when ``None``).
    """

    def __init__(
        self,
        store: JobStore,
        processor: Processor,
        send: SendFunction,
        settings: WorkersSettings,
        *,
        name: str | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.processor = processor
        self.send = send
        self.settings = settings
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ one job

    def run_once(self, worker_id: str | None = None) -> JobRecord | None:
        """Reclaim expired leases, then claim and run one job if any is due.

        Returns
        -------
        JobRecord or None
            The job's record after this run (``DONE``, ``FAILED``, re-``QUEUED``), or
            ``None`` when no job was due or the lease was lost midway.
        """
        worker_id = worker_id or f"{self.name}-0"
        self.store.reclaim_expired()
        job = self.store.claim_next_job(worker_id, self.settings.lease_s)
        if job is None:
            return None
        return self._run_claimed(job, worker_id)

    def run_job(self, job_id: int, worker_id: str | None = None) -> JobRecord | None:
        """Claim and run one given job (a queue backend delivered it).

        Returns
        -------
        JobRecord or None
            The job's record after this run, or ``None`` when it was not ``QUEUED`` (taken
            by another worker, ended, superseded) or the lease was lost midway: a second
            delivery of the same job never runs it twice.
        """
        worker_id = worker_id or f"{self.name}-0"
        job = self.store.claim_job(job_id, worker_id, self.settings.lease_s)
        if job is None:
            logger.info(
                "job %d: delivered but not QUEUED; nothing to do", job_id, extra={"job_id": job_id}
            )
            return None
        return self._run_claimed(job, worker_id)

    def _run_claimed(self, job: JobRecord, worker_id: str) -> JobRecord | None:
        extra = {"job_id": job.id, "series_uid": job.series_instance_uid}
        paths = tuple(i.path for i in sort_instances(self.store.job_instances(job.id)))
        claimed = ClaimedJob(
            job_id=job.id,
            version=job.version,
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=job.series_instance_uid,
            instance_paths=paths,
            attempt=job.attempts,
        )
        try:
            with _LeaseKeeper(self.store, job.id, worker_id, self.settings.lease_s) as lease:
                return self._run(claimed, worker_id, lease, extra)
        except LeaseLost as exc:
            logger.warning("job %d abandoned: %s", job.id, exc, extra=extra)
            return None

    def _run(
        self,
        job: ClaimedJob,
        worker_id: str,
        lease: _LeaseKeeper,
        extra: Mapping[str, object],
    ) -> JobRecord | None:
        started = time.perf_counter()
        try:
            outcome = self.processor(job)
        except StageError as exc:
            return self.store.fail(
                job.job_id,
                worker_id,
                stage=exc.stage,
                reason=exc.reason,
                retryable=exc.retryable,
                timings={"process_total": time.perf_counter() - started},
            )
        except Exception as exc:
            # A defect, not a data problem: record it (with the traceback in the log) and
            # do not retry; an admin can after a fix.
            logger.exception("job %d: processor crashed", job.job_id, extra=extra)
            return self.store.fail(
                job.job_id,
                worker_id,
                stage=None,
                reason=f"unexpected {type(exc).__name__}: {exc}",
                retryable=False,
                timings={"process_total": time.perf_counter() - started},
            )
        timings = {**outcome.timings, "process_total": time.perf_counter() - started}
        if self.metrics is not None:
            self.metrics.observe_stages(outcome.timings)
        if lease.lost.is_set():
            logger.warning(
                "job %d: lease lost while processing; outputs dropped", job.job_id, extra=extra
            )
            return None

        record = self.store.get_job(job.job_id)
        if record is not None and record.superseded_by is not None:
            return self.store.fail(
                job.job_id,
                worker_id,
                stage=Stage.SEND,
                reason=f"superseded by job {record.superseded_by} (newer series version) "
                "before sending; outputs not sent",
                retryable=False,
                timings=timings,
            )
        self.store.mark_sending(job.job_id, worker_id, timings, outcome.summary or None)
        send_started = time.perf_counter()
        try:
            results = self.send(outcome.outputs)
        except StageError as exc:
            send_timing = {Stage.SEND.value: time.perf_counter() - send_started}
            # A SendFailure (a StageError of the send stage) carries every instance's result.
            sent = [r.to_json() for r in exc.results] if isinstance(exc, SendFailure) else None
            if self.metrics is not None:
                self.metrics.observe_stages(send_timing)
                self.metrics.count_send_failures(
                    [r.destination for r in exc.results if not r.ok]
                    if isinstance(exc, SendFailure)
                    else ["unknown"]
                )
            return self.store.fail(
                job.job_id,
                worker_id,
                stage=exc.stage,
                reason=exc.reason,
                retryable=exc.retryable,
                timings=send_timing,
                sent=sent,
            )
        send_timing = {Stage.SEND.value: time.perf_counter() - send_started}
        if self.metrics is not None:
            self.metrics.observe_stages(send_timing)
        return self.store.finish(
            job.job_id,
            worker_id,
            timings=send_timing,
            sent=[r.to_json() for r in results],
        )

    # ------------------------------------------------------------ threads

    def start(self) -> None:
        """Start ``settings.count`` worker threads."""
        if self._threads:
            raise RuntimeError("the workers are already running")
        self._stop.clear()
        for i in range(self.settings.count):
            worker_id = f"{self.name}-{i}"
            thread = threading.Thread(
                target=self._loop, args=(worker_id,), name=worker_id, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """Look for a job now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs and wait for running ones to finish (up to `timeout`)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    @property
    def alive(self) -> int:
        """How many worker threads run."""
        return sum(t.is_alive() for t in self._threads)

    def _loop(self, worker_id: str) -> None:
        while not self._stop.is_set():
            try:
                record = self.run_once(worker_id)
            except Exception:
                # The job (if one was claimed) keeps its lease and is reclaimed when it
                # expires: nothing is lost, and the worker stays alive.
                logger.exception("%s: job store error", worker_id)
                record = None
            if record is not None and record.state is not JobState.QUEUED:
                continue  # maybe more work: look again at once
            self._wake.wait(self.settings.poll_interval_s)
            self._wake.clear()
