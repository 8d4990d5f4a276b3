"""service.periodic: passes on wake and on interval; a failing pass does not end the thread."""

from __future__ import annotations

import threading

import pytest

from service.periodic import PeriodicThread


def test_runs_when_woken_survives_a_failing_pass_and_stops() -> None:
    passes: list[int] = []
    ran = threading.Semaphore(0)

    def task() -> None:
        passes.append(len(passes))
        ran.release()
        if len(passes) == 1:
            raise RuntimeError("first pass fails")

    thread = PeriodicThread("unict-test", task, lambda: 3600.0)  # only wakes run a pass
    thread.start()
    with pytest.raises(RuntimeError, match="already running"):
        thread.start()
    for _ in range(2):
        thread.wake()
        assert ran.acquire(timeout=10)
    assert passes == [0, 1] and thread.is_alive
    thread.stop()
    assert not thread.is_alive


def test_runs_every_interval() -> None:
    ran = threading.Semaphore(0)
    thread = PeriodicThread("unict-test", ran.release, lambda: 0.01)
    thread.start()
    try:
        assert all(ran.acquire(timeout=10) for _ in range(3))
    finally:
        thread.stop()
