"""The job store: series, instances and jobs in SQLite or PostgreSQL."""

from service.store.migrate import run_migrations
from service.store.repository import (
    Clock,
    InstanceRecord,
    JobRecord,
    JobStore,
    PendingSeries,
    ReceivedInstance,
    RecordOutcome,
    RecordResult,
    RetryPolicy,
    utc_now,
)
from service.store.states import TRANSITIONS, JobState, check_transition

__all__ = [
    "TRANSITIONS",
    "Clock",
    "InstanceRecord",
    "JobRecord",
    "JobState",
    "JobStore",
    "PendingSeries",
    "ReceivedInstance",
    "RecordOutcome",
    "RecordResult",
    "RetryPolicy",
    "check_transition",
    "run_migrations",
    "utc_now",
]
