"""The job store: series, instances and jobs in SQLite or PostgreSQL."""

from service.store.migrate import run_migrations
from service.store.records import (
    InstanceRecord,
    JobRecord,
    PendingSeries,
    QueuedHook,
    QueuedJob,
    ReceivedInstance,
    RecordOutcome,
    RecordResult,
    RetryPolicy,
    StudyRetention,
)
from service.store.repository import Clock, JobStore, utc_now
from service.store.states import ENDED_STATES, TRANSITIONS, JobState, check_transition

__all__ = [
    "ENDED_STATES",
    "TRANSITIONS",
    "Clock",
    "InstanceRecord",
    "JobRecord",
    "JobState",
    "JobStore",
    "PendingSeries",
    "QueuedHook",
    "QueuedJob",
    "ReceivedInstance",
    "RecordOutcome",
    "RecordResult",
    "RetryPolicy",
    "StudyRetention",
    "check_transition",
    "run_migrations",
    "utc_now",
]
