"""Job states and the one table of allowed transitions.

``RECEIVING -> QUEUED -> RUNNING -> SENDING -> DONE``; any active state can end in
``FAILED`` (with the stage and reason); ``REJECTED`` is for series the selection rules turn
away. A running or sending job goes back to ``QUEUED`` when it is retried after a retryable
failure or when its lease expired; ``FAILED`` and ``DONE`` go back to ``QUEUED`` when an
admin retries them.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

from service.errors import IllegalTransition

__all__ = ["ACTIVE_STATES", "ENDED_STATES", "TRANSITIONS", "JobState", "check_transition"]


class JobState(StrEnum):
    """Where a job is in its life."""

    RECEIVING = "RECEIVING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"
    REJECTED = "REJECTED"


_S = JobState

TRANSITIONS: MappingProxyType[JobState, frozenset[JobState]] = MappingProxyType(
    {
        # series complete: selected, or turned away by a rule; FAILED when superseded
        _S.RECEIVING: frozenset({_S.QUEUED, _S.REJECTED, _S.FAILED}),
        # claimed by a worker; FAILED when superseded before it started
        _S.QUEUED: frozenset({_S.RUNNING, _S.FAILED}),
        # QUEUED again: retryable failure or expired lease
        _S.RUNNING: frozenset({_S.SENDING, _S.QUEUED, _S.FAILED}),
        _S.SENDING: frozenset({_S.DONE, _S.QUEUED, _S.FAILED}),
        # admin retry
        _S.DONE: frozenset({_S.QUEUED}),
        _S.FAILED: frozenset({_S.QUEUED}),
        _S.REJECTED: frozenset(),
    }
)
"""Allowed transitions: ``TRANSITIONS[old]`` is the set of states `old` may move to."""

ACTIVE_STATES = frozenset({_S.RUNNING, _S.SENDING})
"""States in which a worker holds a lease on the job."""

ENDED_STATES = frozenset({_S.DONE, _S.FAILED, _S.REJECTED})
"""States a job stays in unless an admin retries it: its files may leave the spool."""


def check_transition(old: JobState, new: JobState) -> None:
    """Raise unless `old` -> `new` is in :data:`TRANSITIONS`.

    Raises
    ------
    IllegalTransition
        The transition is not allowed.
    """
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"a job cannot go from {old.value} to {new.value}")
