"""service.queue: procrastinate deliveries deferred in the job store's own transactions.

Needs PostgreSQL (``UNICT_TEST_POSTGRES_URL``); each test gets a fresh schema.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from service.queue import (
    TASK_NAME,
    ProcrastinateQueue,
    apply_procrastinate_schema,
    job_lock,
)
from service.store import JobState, JobStore, QueuedJob, RetryPolicy, run_migrations
from tests.service.store.test_repository import receive_series

pytestmark = pytest.mark.postgres

QUEUE = "unict-test"


@pytest.fixture
def store(postgres_url: str) -> JobStore:
    run_migrations(postgres_url)
    assert apply_procrastinate_schema(postgres_url) is True
    assert apply_procrastinate_schema(postgres_url) is False  # idempotent
    store = JobStore(
        postgres_url,
        retry=RetryPolicy(max_attempts=2, backoff_s=60),
        on_queued=ProcrastinateQueue(QUEUE),
    )
    yield store
    store.close()


def deliveries(store: JobStore) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT queue_name, task_name, lock, queueing_lock, args, status, scheduled_at "
                "FROM procrastinate_jobs ORDER BY id"
            )
        ).mappings()
        return [dict(r) for r in rows]


def test_series_completion_defers_one_delivery_in_the_same_transaction(store: JobStore) -> None:
    series_uid, series_id, job_id = receive_series(store, 3)
    assert deliveries(store) == []
    job = store.complete_series(series_id, instance_count=3)
    assert job is not None and job.state is JobState.QUEUED
    [delivery] = deliveries(store)
    assert delivery["queue_name"] == QUEUE and delivery["task_name"] == TASK_NAME
    assert delivery["lock"] == delivery["queueing_lock"] == job_lock(series_uid, 1)
    assert delivery["args"] == {"job_id": job_id} and delivery["status"] == "todo"
    # The same series version queued again (admin retry) while its delivery still waits:
    # the queueing lock keeps one delivery, and the state change still commits.
    claimed = store.claim_job(job_id, "w", 60)
    assert claimed is not None
    store.fail(job_id, "w", stage="inference", reason="boom", retryable=False)
    assert store.retry(job_id).state is JobState.QUEUED
    assert len(deliveries(store)) == 1


def test_a_failing_enqueue_rolls_the_state_change_back(postgres_url: str) -> None:
    run_migrations(postgres_url)  # no procrastinate schema: the defer fails

    store = JobStore(postgres_url, on_queued=ProcrastinateQueue(QUEUE))
    try:
        _, series_id, job_id = receive_series(store, 2)
        with pytest.raises(sa.exc.ProgrammingError):
            store.complete_series(series_id, instance_count=2)
        job = store.get_job(job_id)
        assert job is not None and job.state is JobState.RECEIVING  # no dual write
    finally:
        store.close()


def test_a_retryable_failure_defers_a_delivery_at_its_retry_time(store: JobStore) -> None:
    _, series_id, job_id = receive_series(store, 2)
    store.complete_series(series_id, instance_count=2)
    with store.engine.begin() as conn:  # the first delivery ran (procrastinate deletes it)
        conn.execute(sa.text("DELETE FROM procrastinate_jobs"))
    assert store.claim_job(job_id, "w", 60) is not None
    failed = store.fail(job_id, "w", stage="send", reason="PACS down", retryable=True)
    assert failed.state is JobState.QUEUED and failed.next_retry_at is not None
    [delivery] = deliveries(store)
    assert delivery["scheduled_at"] == failed.next_retry_at


def test_claim_job_takes_a_queued_job_once(store: JobStore) -> None:
    _, series_id, job_id = receive_series(store, 2)
    store.complete_series(series_id, instance_count=2)
    first = store.claim_job(job_id, "a", 60)
    assert first is not None and first.state is JobState.RUNNING and first.lease_owner == "a"
    assert store.claim_job(job_id, "b", 60) is None  # a second delivery does nothing


def test_queued_job_args_are_json(store: JobStore) -> None:
    # The hook is callable alone (what the store passes it).
    hook = ProcrastinateQueue(QUEUE)
    with store._tx() as session:
        hook(session, QueuedJob(7, "1.2", generate_uid(), 3, None))
    [delivery] = deliveries(store)
    assert json.loads(json.dumps(delivery["args"])) == {"job_id": 7}
