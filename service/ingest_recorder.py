"""Recording received instances in batches, behind the receive path.

The Storage SCP answers a C-STORE once the instance's file is written, ``fsync``-ed and its
folder ``fsync``-ed: the spool file is the write-ahead record. Its row in the job store is
written here, by one thread, for all instances that arrived while the previous batch was
being written, in one transaction (:meth:`IngestStore.record_instances
<service.store.ingest.IngestStore.record_instances>`): one database commit per batch
instead of one per instance, and none on the sender's clock.

What keeps this safe:

- an instance is acknowledged only once its file is durable; a crash before its row is
  written leaves a complete file that :func:`service.spool_recovery.recover_spool`
  records at the next start, before the listener opens;
- the assembler hears of an instance (``instance_received``) only after its row is
  committed, and of an association's end only after every instance it delivered
  (events keep their order in one queue);
- :meth:`BatchRecorder.flush` waits until everything submitted so far is recorded: the SCP
  calls it before it answers an A-RELEASE-RQ, so a sender whose association was released
  finds its instances in the job store;
- a database that cannot be reached is retried with a backoff; the batch is never dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from service.instance_handler import AssociationListener, SeriesRef
from service.store import JobStore, ReceivedInstance

__all__ = ["BatchRecorder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Received:
    instance: ReceivedInstance
    connection: int


@dataclass(frozen=True)
class _Ended:
    connection: int
    released: bool


class BatchRecorder:
    """One thread that records spooled instances in the job store, in batches.

    Parameters
    ----------
    store
        The job store.
    listener
        Told about recorded instances and ended associations, in order (the assembler).
    max_batch
        Most instances in one transaction.
    linger_s
        How long the first queued instance waits for others to join its batch (a flush,
        an association's release, ends the wait).
    retry_s
        First wait after a failed batch (doubled up to 5 s).
    """

    def __init__(
        self,
        store: JobStore,
        listener: AssociationListener | None = None,
        *,
        max_batch: int = 128,
        linger_s: float = 0.05,
        retry_s: float = 0.2,
    ) -> None:
        self.store = store
        self.listener = listener
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.retry_s = retry_s
        self._queue: deque[_Received | _Ended] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._done = 0
        self._stopping = False
        self._flushing = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ producer side

    def submit(self, instance: ReceivedInstance, connection: int) -> None:
        """Queue a durable spool file for its row (called after its ``fsync``)."""
        self._put(_Received(instance, connection))

    def association_ended(self, connection: int, *, released: bool) -> None:
        """Pass an association's end to the listener after its instances are recorded."""
        self._put(_Ended(connection, released))

    def _put(self, item: _Received | _Ended) -> None:
        with self._cond:
            self._queue.append(item)
            self._submitted += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything submitted so far is recorded; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._done < target:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._thread is None or not self._thread.is_alive():
                        return self._done >= target
                    self._cond.wait(min(left, 0.5))
            finally:
                self._flushing -= 1
        return True

    @property
    def pending(self) -> int:
        """Items submitted and not yet recorded."""
        with self._cond:
            return self._submitted - self._done

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the recording thread."""
        if self._thread is not None:
            raise RuntimeError("the recorder is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ingest-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Record what is queued, then stop (what is left is recovered at the next start)."""
        thread = self._thread
        if thread is None:
            return
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout=timeout)
        self._thread = None

    # ------------------------------------------------------------ the thread

    def _take(self) -> list[_Received | _Ended]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            # Let a batch gather: a commit per instance would cost more CPU than the
            # receive path itself, and this thread's Python time is taken from the
            # association threads (one interpreter lock). A flush or a full batch ends
            # the wait at once.
            deadline = time.monotonic() + self.linger_s
            while (
                len(self._queue) < self.max_batch
                and not self._flushing
                and not self._stopping
                and (left := deadline - time.monotonic()) > 0
            ):
                self._cond.wait(left)
            batch: list[_Received | _Ended] = []
            while self._queue and len(batch) < self.max_batch:
                batch.append(self._queue.popleft())
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return  # stopping, nothing queued
            self._record(batch)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def _record(self, batch: list[_Received | _Ended]) -> None:
        received = [item for item in batch if isinstance(item, _Received)]
        wait = self.retry_s
        while True:
            try:
                results = self.store.record_instances([item.instance for item in received])
                break
            except SQLAlchemyError as exc:
                # The files are durable in the spool; keep them queued until the store is
                # back (a crash meanwhile leaves them to the recovery at the next start).
                logger.error(
                    "job store unavailable, %d spooled instances wait for their rows: %s",
                    len(received),
                    exc,
                )
                time.sleep(wait)
                wait = min(wait * 2, 5.0)
        by_item = dict(zip(map(id, received), results, strict=True))
        for item in batch:
            if self.listener is None:
                continue
            if isinstance(item, _Ended):
                self.listener.association_ended(item.connection, released=item.released)
                continue
            result = by_item[id(item)]
            rec = item.instance
            self.listener.instance_received(
                item.connection,
                SeriesRef(
                    series_id=result.series_id,
                    version=result.version,
                    job_id=result.job_id,
                    study_instance_uid=rec.study_instance_uid,
                    series_instance_uid=rec.series_instance_uid,
                    calling_ae=rec.calling_ae,
                ),
            )
