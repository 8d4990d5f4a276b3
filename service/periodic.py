"""A background thread that runs one pass every interval (or when woken) until stopped.

The assembler and the retention cleaner each own one. A pass that raises is logged and
the next pass runs as usual: a dead thread would stop the work for good, and a failed
pass loses nothing (what it did not finish is still in the store or on disk).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["PeriodicThread"]

logger = logging.getLogger(__name__)


class PeriodicThread:
    """Run `task` every `interval()` seconds in a daemon thread.

    Parameters
    ----------
    name
        The thread's name (``unict-assembler``, ...), also in the log.
    task
        One pass; its return value is ignored.
    interval
        Seconds until the next pass, read before each wait (settings may change).
    """

    def __init__(self, name: str, task: Callable[[], object], interval: Callable[[], float]) -> None:
        self.name = name
        self._task = task
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread.

        Raises
        ------
        RuntimeError
            It is already running.
        """
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Run the next pass now instead of at the end of the interval."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (a pass in progress finishes) and wait up to `timeout`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval())
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._task()
            except Exception:
                logger.exception("%s: pass failed; retrying in the next pass", self.name)
