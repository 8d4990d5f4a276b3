"""More listener processes on the node's DICOM port, so that associations use every core.

One Python process runs one association's Python code at a time (the interpreter lock);
with several senders at once the receive path is bound by it (``BENCHMARKS.md``, issue 18).
With ``dicom.listener_processes`` above 1, the receiver starts that many minus one extra
processes (``spawn``), each with its own Storage SCP, handler and batch recorder on the
same job store and spool. The receiver's process accepts every connection and passes it
(the socket itself, ``SCM_RIGHTS`` over a pipe) to the process serving the fewest
connections, itself included: the kernel's ``SO_REUSEPORT`` hash gave two processes a
3/1 split of four senders half the time. The job store serialises their writes
(SQLite's write lock, PostgreSQL's row locks), so a series whose instances come on
associations served by different processes is still one series version with one job.

What a child process learns that the parent must know travels back on one queue, in order
per child: instances recorded and associations ended (for the assembler, which runs in the
parent), connections closed (for the balance), and the counters of the metrics endpoint. Association ids carry the child's
index in their high bits, so they never collide with the parent's.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.synchronize
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.reduction import send_handle
from typing import Any

from service.config import DicomSettings, StorageSettings
from service.instance_handler import AssociationListener, SeriesRef
from service.metrics import NodeMetrics

__all__ = ["ID_BITS", "ChildSpec", "Forward", "ForwardedMetrics", "ListenerProcesses"]

logger = logging.getLogger(__name__)

#: Association ids of child `i` start at ``i << ID_BITS``.
ID_BITS = 40

_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to serve: picklable."""

    index: int
    dicom: DicomSettings
    storage: StorageSettings
    database_url: str
    log_level: int


class Forward:
    """Child side: the assembler's calls, put on the queue."""

    def __init__(self, events: Any) -> None:
        self.events = events

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        self.events.put(("instance", association_id, series))

    def association_ended(self, association_id: int, *, released: bool) -> None:
        self.events.put(("ended", association_id, released))


class _Counter:
    def __init__(self, events: Any, name: str, label: str | None = None) -> None:
        self.events, self.name, self.label = events, name, label

    def labels(self, **labels: str) -> _Counter:
        (value,) = labels.values()
        return _Counter(self.events, self.name, value)

    def inc(self, amount: float = 1) -> None:
        self.events.put(("metric", self.name, self.label, amount))


class ForwardedMetrics:
    """The counters the receive path increments, forwarded to the parent's registry."""

    def __init__(self, events: Any) -> None:
        for name in (
            "instances_received",
            "bytes_received",
            "instances_refused",
            "associations_refused",
        ):
            setattr(self, name, _Counter(events, name))


class ListenerProcesses:
    """The parent's side: start, watch and stop the extra listener processes.

    Parameters
    ----------
    count
        Extra processes (``dicom.listener_processes - 1``).
    listener, metrics
        Where the children's events go (the assembler, the node's counters).
    child_main
        What a child runs (:func:`service.receiver.serve_child_listener`): importable by
        name, as ``spawn`` needs.
    """

    def __init__(
        self,
        count: int,
        dicom: DicomSettings,
        storage: StorageSettings,
        database_url: str,
        *,
        listener: AssociationListener | None,
        metrics: NodeMetrics | None,
        child_main: Callable[[ChildSpec, Any, Any, Any, Any], None],
    ) -> None:
        self.child_main = child_main
        self.count = count
        self.dicom = dicom
        self.storage = storage
        self.database_url = database_url
        self.listener = listener
        self.metrics = metrics
        self._context = multiprocessing.get_context("spawn")
        self._events: Any = self._context.Queue()
        self._stop: multiprocessing.synchronize.Event = self._context.Event()
        self._processes: list[SpawnProcess] = []
        self._pipes: list[Any] = []
        self._loads: list[int] = []  # connections passed to each child and not yet closed
        self._loads_lock = threading.Lock()
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        """Start the children and wait until each is ready for connections."""
        self._pump = threading.Thread(target=self._drain, name="listener-events", daemon=True)
        self._pump.start()
        readies = []
        for index in range(1, self.count + 1):
            ready = self._context.Event()
            spec = ChildSpec(
                index,
                self.dicom,
                self.storage,
                self.database_url,
                logging.getLogger().getEffectiveLevel(),
            )
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=self.child_main,
                args=(spec, self._events, ready, self._stop, theirs),
                name=f"unict-listener-{index}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._pipes.append(ours)
            self._loads.append(0)
            readies.append(ready)
        deadline = time.monotonic() + _START_TIMEOUT_S
        for index, (ready, process) in enumerate(zip(readies, self._processes, strict=True), 1):
            while not ready.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"listener process {index} did not start (exit code {process.exitcode})"
                    )
        logger.info("%d more listener processes", self.count)

    def open_connections(self) -> int:
        """Connections the children serve now."""
        with self._loads_lock:
            return sum(self._loads)

    def dispatch(self, conn: socket.socket, own_load: int) -> bool:
        """Pass `conn` to the child serving the fewest connections, unless this process
        (`own_load`) serves fewer still; ``False``: serve it here. Ties go to a child: the
        receiver's process also runs the node's other threads (assembly, workers, HTTP)."""
        with self._loads_lock:
            if not self._loads:
                return False
            index = min(range(len(self._loads)), key=self._loads.__getitem__)
            if self._loads[index] > own_load or not self._processes[index].is_alive():
                return False
            self._loads[index] += 1
        try:
            send_handle(self._pipes[index], conn.fileno(), self._processes[index].pid)
        except OSError:
            with self._loads_lock:
                self._loads[index] -= 1
            raise
        return True

    @property
    def alive(self) -> bool:
        """Whether every child is running."""
        return all(p.is_alive() for p in self._processes)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the children (each ends its associations and records what it queued)."""
        self._stop.set()
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                logger.error("listener process %s did not stop; killed", process.name)
                process.kill()
                process.join(5)
        self._processes = []
        for pipe in self._pipes:
            pipe.close()
        self._pipes, self._loads = [], []
        if self._pump is not None:
            self._events.put(("done", 0, None))
            self._pump.join(timeout=10)
            self._pump = None

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get()
            except (EOFError, OSError):
                return
            kind = event[0]
            if kind == "done":
                return
            try:
                if kind == "instance" and self.listener is not None:
                    self.listener.instance_received(event[1], event[2])
                elif kind == "ended" and self.listener is not None:
                    self.listener.association_ended(event[1], released=bool(event[2]))
                elif kind == "closed":
                    with self._loads_lock:
                        if event[1] - 1 < len(self._loads):
                            self._loads[event[1] - 1] -= 1
                elif kind == "metric" and self.metrics is not None:
                    _, name, label, amount = event
                    counter = getattr(self.metrics, name)
                    if label is not None:
                        key = "status" if name == "instances_refused" else "reason"
                        counter = counter.labels(**{key: label})
                    counter.inc(amount)
            except Exception:
                logger.exception("listener event %s not handled", kind)
