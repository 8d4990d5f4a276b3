"""Readiness checks shared by ``unict-node serve`` and ``unict-node worker`` (``/readyz``).

Each check answers a named :class:`~service.http.Check`; a check never raises (a failure
to check is a failed check). :class:`service.node.Node` adds the receiver's own checks
(DICOM listener, assembler, workers); :class:`WorkerStatus` is what a ``worker`` process
serves: database, engine, queue and spool space.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from service.config import StorageSettings
from service.http import Check
from service.store import JobStore

__all__ = ["Status", "WorkerStatus", "database_check", "spool_space_check", "status_check"]

Status = Callable[[], tuple[bool, str]]
"""A component's readiness: whether it is ready, and a line saying which or why not."""


def database_check(store: JobStore) -> Check:
    """``database``: the job store answers a ping."""
    try:
        store.ping()
    except Exception as exc:
        # The type only: a driver's message may quote the connection string.
        return Check("database", False, f"unreachable: {type(exc).__name__}")
    return Check("database", True, "reachable")


def status_check(name: str, status: Status) -> Check:
    """A check named `name` from a :data:`Status` (``engine``: the processor's status)."""
    try:
        ok, detail = status()
    except Exception as exc:
        ok, detail = False, f"{name} status failed: {exc}"
    return Check(name, ok, detail)


def spool_space_check(storage: StorageSettings) -> Check:
    """``spool_space``: the spool folder's filesystem has at least ``min_free_mb`` free."""
    floor = storage.min_free_mb
    try:
        free_mb = shutil.disk_usage(storage.spool_dir).free // 2**20
    except OSError as exc:
        return Check("spool_space", False, f"spool unusable: {exc.strerror}")
    return Check("spool_space", free_mb >= floor, f"{free_mb} MB free, floor {floor} MB")


class WorkerStatus:
    """What a ``unict-node worker`` process serves over HTTP (a :class:`~service.http.NodeStatus`).

    Parameters
    ----------
    store
        The worker's job store (``/jobs``, the ``database`` check).
    engine_status
        The processor's :meth:`~service.processor.UniCTProcessor.status` (``engine``).
    queue_status
        The procrastinate worker's status (``queue``;
        :meth:`service.queue.QueueStatus.status`).
    storage
        The storage settings (``spool_space``: the worker reads the spool).
    """

    def __init__(
        self,
        store: JobStore,
        engine_status: Status,
        queue_status: Status,
        storage: StorageSettings,
    ) -> None:
        self._store = store
        self.engine_status = engine_status
        self.queue_status = queue_status
        self.storage = storage

    @property
    def store(self) -> JobStore:
        """The job store."""
        return self._store

    def readiness(self) -> list[Check]:
        """``database``, ``engine``, ``queue`` and ``spool_space``, run now."""
        return [
            database_check(self._store),
            status_check("engine", self.engine_status),
            status_check("queue", self.queue_status),
            spool_space_check(self.storage),
        ]
