"""The node's exception hierarchy: callers catch by kind, and every job failure names its stage."""

from __future__ import annotations

from service.stages import Stage

__all__ = [
    "ConfigError",
    "IllegalTransition",
    "JobNotFound",
    "LeaseLost",
    "SendError",
    "SeriesGeometryError",
    "StageError",
    "UniCTNodeError",
]


class UniCTNodeError(Exception):
    """Base class of the node's own errors."""


class ConfigError(UniCTNodeError):
    """config.yaml (or an environment override) is invalid; the message names the key and line."""


class StageError(UniCTNodeError):
    """A job stage failed for a reason that is recorded with the job.

    Parameters
    ----------
    stage
        Where it failed.
    reason
        A sentence an admin can act on; no patient identifiers.
    retryable
        Whether trying again later may succeed (e.g. the PACS was down).
    """

    def __init__(self, stage: Stage, reason: str, *, retryable: bool = False) -> None:
        super().__init__(f"{stage.value}: {reason}")
        self.stage = stage
        self.reason = reason
        self.retryable = retryable


class SeriesGeometryError(StageError):
    """A series whose geometry cannot be turned into one volume (missing or inconsistent headers)."""

    def __init__(self, reason: str) -> None:
        super().__init__(Stage.LOAD, reason, retryable=False)


class SendError(StageError):
    """A C-STORE to a destination failed (network error or non-success DIMSE status)."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(Stage.SEND, reason, retryable=retryable)


class IllegalTransition(UniCTNodeError):
    """A job state change that the table in :mod:`service.store.states` does not allow."""


class JobNotFound(UniCTNodeError, LookupError):
    """No job has the given id."""


class LeaseLost(UniCTNodeError):
    """A worker no longer holds the lease on its job (it expired and was re-taken)."""
