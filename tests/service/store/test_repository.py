"""service.store.repository on SQLite and PostgreSQL (``-m postgres`` needs UNICT_TEST_POSTGRES_URL)."""

from __future__ import annotations

import json
import threading
from datetime import timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from pydicom.uid import generate_uid

from service.errors import IllegalTransition, JobNotFound, LeaseLost
from service.store import (
    JobState,
    JobStore,
    ReceivedInstance,
    RecordOutcome,
    RetryPolicy,
    run_migrations,
)
from service.store.models import metadata
from tests.conftest import FakeClock

CT = "1.2.840.10008.5.1.4.1.1.2"


def received(
    series_uid: str,
    sop_uid: str | None = None,
    *,
    sha: str = "a" * 64,
    study_uid: str = "1.2.3",
    expected: int | None = None,
) -> ReceivedInstance:
    sop_uid = sop_uid or generate_uid()
    return ReceivedInstance(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=CT,
        path=Path(f"/spool/{sop_uid}.{sha[:16]}.dcm"),
        size=1000,
        sha256=sha,
        calling_ae="STORESCU",
        header={"sop_instance_uid": sop_uid, "sop_class_uid": CT, "modality": "CT"},
        expected_count=expected,
    )


def receive_series(store: JobStore, n: int = 3, **kw: object) -> tuple[str, int, int]:
    series_uid = generate_uid()
    result = None
    for _ in range(n):
        result = store.record_instance(received(series_uid, **kw))  # type: ignore[arg-type]
    assert result is not None
    return series_uid, result.series_id, result.job_id


def queued_job(store: JobStore, n: int = 3) -> int:
    _, series_id, job_id = receive_series(store, n)
    job = store.complete_series(series_id, instance_count=n)
    assert job is not None and job.state is JobState.QUEUED
    return job_id


def test_migrations_match_the_models(store: JobStore) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    run_migrations(store.url)  # at every start: a no-op when up to date


def test_first_instance_creates_series_and_receiving_job(store: JobStore, clock: FakeClock) -> None:
    series_uid = generate_uid()
    result = store.record_instance(received(series_uid, expected=2))
    assert result.outcome is RecordOutcome.STORED and result.version == 1
    job = store.get_job(result.job_id)
    assert job is not None
    assert job.state is JobState.RECEIVING
    assert (job.series_instance_uid, job.instance_count, job.expected_count) == (series_uid, 1, 2)
    assert job.created_at == clock.now
    pending = store.pending_series()
    assert [p.series_id for p in pending] == [result.series_id]


def test_duplicate_same_content_is_a_no_op(store: JobStore) -> None:
    series_uid, sop = generate_uid(), generate_uid()
    first = store.record_instance(received(series_uid, sop))
    again = store.record_instance(received(series_uid, sop))
    assert again.outcome is RecordOutcome.DUPLICATE
    assert (again.series_id, again.job_id) == (first.series_id, first.job_id)
    assert len(store.series_instances(first.series_id)) == 1


def test_changed_content_makes_a_new_version(store: JobStore) -> None:
    series_uid, sop = generate_uid(), generate_uid()
    first = store.record_instance(received(series_uid, sop, sha="a" * 64))
    store.record_instance(received(series_uid))
    changed = store.record_instance(received(series_uid, sop, sha="b" * 64))
    assert changed.outcome is RecordOutcome.NEW_VERSION
    assert changed.version == 2 and changed.superseded_job_id == first.job_id
    instances = store.series_instances(changed.series_id)
    assert len(instances) == 2
    assert {i.sha256 for i in instances if i.sop_instance_uid == sop} == {"b" * 64}
    old = store.get_job(first.job_id)
    assert old is not None
    assert old.state is JobState.FAILED and old.superseded_by == changed.job_id
    assert old.error_reason is not None and "superseded" in old.error_reason


def test_late_instance_after_start_makes_a_new_job_never_a_mix(store: JobStore) -> None:
    series_uid, series_id, job_id = receive_series(store, 3)
    store.complete_series(series_id, instance_count=3)
    claimed = store.claim_next_job("w1", 60)
    assert claimed is not None and claimed.id == job_id
    late = store.record_instance(received(series_uid))
    assert late.outcome is RecordOutcome.NEW_VERSION and late.version == 2
    running = store.get_job(job_id)
    assert running is not None
    # The running job keeps its 3 instances and learns it was superseded.
    assert running.state is JobState.RUNNING and running.superseded_by == late.job_id
    assert len(store.job_instances(job_id)) == 3
    assert len(store.job_instances(late.job_id)) == 4
    more = store.record_instance(received(series_uid))
    assert more.outcome is RecordOutcome.STORED and more.job_id == late.job_id
    # A retry of the superseded job is refused: retry the newer one.
    store.fail(job_id, "w1", stage="infer", reason="x", retryable=False)
    with pytest.raises(IllegalTransition, match="superseded"):
        store.retry(job_id)


def test_late_instance_while_queued_fails_the_old_job(store: JobStore) -> None:
    job_id = queued_job(store)
    series_uid = store.get_job(job_id).series_instance_uid  # type: ignore[union-attr]
    late = store.record_instance(received(series_uid))
    old = store.get_job(job_id)
    assert old is not None and old.state is JobState.FAILED and old.superseded_by == late.job_id
    assert store.claim_next_job("w1", 60) is None  # nothing runnable until v2 completes


def test_complete_series_queues_or_rejects_with_guard(store: JobStore) -> None:
    _, series_id, job_id = receive_series(store, 3)
    assert store.complete_series(series_id, instance_count=2) is None  # more arrived since
    job = store.complete_series(series_id, instance_count=3)
    assert job is not None and job.state is JobState.QUEUED
    assert store.complete_series(series_id, instance_count=3) is None  # already closed

    _, series_id, job_id = receive_series(store, 2)
    job = store.complete_series(
        series_id, instance_count=2, rejected_rule="2 slices < min_slices 40"
    )
    assert job is not None and job.state is JobState.REJECTED
    assert job.rejected_rule == "2 slices < min_slices 40"
    with pytest.raises(IllegalTransition):
        store.retry(job_id)


def test_series_ready_after_quiet_period(store: JobStore, clock: FakeClock) -> None:
    _, series_id, _ = receive_series(store, 2)
    clock.advance(5)
    assert store.series_ready(10) == []
    clock.advance(5)
    assert [s.series_id for s in store.series_ready(10)] == [series_id]


def test_expected_count_from_c_find_is_kept(store: JobStore) -> None:
    series_uid, series_id, _ = receive_series(store, 1)
    store.set_expected_count(series_id, 7, "C-FIND")
    store.record_instance(received(series_uid, expected=99))
    (pending,) = store.pending_series()
    assert pending.expected_count == 7


def test_claim_is_fifo_and_respects_retry_time(store: JobStore, clock: FakeClock) -> None:
    first, second = queued_job(store), queued_job(store)
    job = store.claim_next_job("w1", 30)
    assert job is not None and job.id == first
    assert job.state is JobState.RUNNING and job.attempts == 1 and job.lease_owner == "w1"
    assert job.lease_expires_at == clock.now + timedelta(seconds=30)
    failed = store.fail(first, "w1", stage="infer", reason="GPU busy", retryable=True)
    assert failed.state is JobState.QUEUED
    assert failed.next_retry_at == clock.now + timedelta(seconds=10)
    job = store.claim_next_job("w1", 30)
    assert job is not None and job.id == second
    assert store.claim_next_job("w1", 30) is None  # first not due yet
    clock.advance(10)
    job = store.claim_next_job("w1", 30)
    assert job is not None and job.id == first and job.attempts == 2


def test_concurrent_claims_take_each_job_once(store: JobStore) -> None:
    jobs = {queued_job(store, 1) for _ in range(12)}
    claimed: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            while (job := store.claim_next_job(name, 60)) is not None:
                with lock:
                    claimed.append(job.id)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(claimed) == sorted(jobs)


def test_retryable_failures_back_off_then_fail(store: JobStore, clock: FakeClock) -> None:
    job_id = queued_job(store)
    delays = []
    for attempt in range(1, 4):
        job = store.claim_next_job("w1", 30)
        assert job is not None and job.attempts == attempt
        record = store.fail(
            job_id, "w1", stage="send", reason="PACS down", retryable=True, timings={"infer": 1.5}
        )
        if record.next_retry_at is not None:
            delays.append((record.next_retry_at - clock.now).total_seconds())
            clock.advance(delays[-1])
    assert delays == [10, 20]
    assert record.state is JobState.FAILED
    assert record.error_stage == "send"
    assert record.error_reason == "PACS down (gave up after 3 attempts)"
    assert record.timings == {"infer": 1.5}


def test_full_run_records_timings_and_outputs(store: JobStore) -> None:
    job_id = queued_job(store)
    store.claim_next_job("w1", 30)
    sending = store.mark_sending(job_id, "w1", {"load": 0.5, "infer": 2.0})
    assert sending.state is JobState.SENDING
    sent = [{"destination": "pacs", "sop_instance_uid": "1.2.3.4", "status": 0}]
    done = store.finish(job_id, "w1", timings={"send": 0.25}, sent=sent)
    assert done.state is JobState.DONE and done.lease_owner is None
    assert done.timings == {"load": 0.5, "infer": 2.0, "send": 0.25}
    assert done.outputs == {"sent": sent}
    json.dumps(done.to_dict())  # the API serialises it as is
    listed = store.list_jobs(state=JobState.DONE)
    assert [j.id for j in listed] == [job_id]
    assert store.count_by_state()[JobState.DONE] == 1


def test_expired_lease_is_reclaimed_and_old_owner_locked_out(
    store: JobStore, clock: FakeClock
) -> None:
    job_id = queued_job(store)
    store.claim_next_job("crashed", 30)
    assert store.reclaim_expired() == []
    clock.advance(20)
    assert store.renew_lease(job_id, "crashed", 30)  # renewed: expires 30 s from now
    clock.advance(31)
    (reclaimed,) = store.reclaim_expired()
    assert reclaimed.id == job_id and reclaimed.state is JobState.QUEUED
    assert reclaimed.error_reason == "lease of crashed expired; re-queued"
    taken = store.claim_next_job("w2", 30)
    assert taken is not None and taken.id == job_id and taken.attempts == 2
    assert not store.renew_lease(job_id, "crashed", 30)
    with pytest.raises(LeaseLost):
        store.mark_sending(job_id, "crashed", {})
    with pytest.raises(LeaseLost):
        store.finish(job_id, "crashed", timings={}, sent=[])


def test_expired_lease_after_last_attempt_fails(store: JobStore, clock: FakeClock) -> None:
    store.retry_policy = RetryPolicy(max_attempts=1)
    job_id = queued_job(store)
    store.claim_next_job("w", 5)
    clock.advance(6)
    (record,) = store.reclaim_expired()
    assert record.id == job_id and record.state is JobState.FAILED
    assert "after 1 attempts" in (record.error_reason or "")


def test_admin_retry(store: JobStore) -> None:
    job_id = queued_job(store)
    store.claim_next_job("w1", 30)
    store.fail(job_id, "w1", stage="load", reason="bad geometry", retryable=False)
    job = store.retry(job_id)
    assert job.state is JobState.QUEUED and job.attempts == 0 and job.error_reason is None
    with pytest.raises(IllegalTransition, match="is QUEUED: only FAILED or DONE"):
        store.retry(job_id)
    store.claim_next_job("w1", 30)
    with pytest.raises(IllegalTransition, match="is RUNNING: only FAILED or DONE"):
        store.retry(job_id)  # a running job is never re-queued by hand (it would run twice)
    with pytest.raises(JobNotFound):
        store.retry(999_999)
    assert store.get_job(999_999) is None


def test_ping_and_list_paging(store: JobStore) -> None:
    store.ping()
    ids = [queued_job(store, 1) for _ in range(3)]
    assert [j.id for j in store.list_jobs(limit=2)] == ids[::-1][:2]
    assert [j.id for j in store.list_jobs(limit=2, offset=2)] == [ids[0]]


def test_list_filters_by_state_time_and_study_and_counts(store: JobStore, clock: FakeClock) -> None:
    t0 = clock.now
    first = queued_job(store, 1)
    clock.advance(3600)
    _, _, second = receive_series(store, 1, study_uid="1.2.9")  # still RECEIVING
    clock.advance(3600)
    third = queued_job(store, 1)
    hour = timedelta(hours=1)

    def ids(**filters: object) -> list[int]:
        listed = [j.id for j in store.list_jobs(**filters)]  # type: ignore[arg-type]
        assert store.count_jobs(**filters) == len(listed)  # type: ignore[arg-type]
        return listed

    assert ids() == [third, second, first]
    assert ids(state=JobState.QUEUED) == [third, first]
    assert ids(since=t0 + hour) == [third, second]  # inclusive lower bound
    assert ids(until=t0 + hour) == [first]  # exclusive upper bound
    assert ids(since=t0 + hour, until=t0 + 2 * hour, state=JobState.RECEIVING) == [second]
    assert ids(study_instance_uid="1.2.9") == [second]
    assert ids(state=JobState.DONE) == []
    # Times in another zone mean the same instant.
    assert ids(since=(t0 + 2 * hour).astimezone(timezone(timedelta(hours=5)))) == [third]
    assert [j.id for j in store.list_jobs(state=JobState.QUEUED, limit=1, offset=1)] == [first]
    assert store.count_jobs(state=JobState.QUEUED) == 2


def test_concurrent_first_instances_make_one_series(store: JobStore) -> None:
    """Several associations deliver the same new series at once: one version, one job."""
    series_uid = generate_uid()
    errors: list[BaseException] = []

    def deliver(n: int) -> None:
        try:
            for _ in range(n):
                store.record_instance(received(series_uid))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(5,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    (job,) = store.list_jobs()
    assert (job.version, job.instance_count, job.state) == (1, 20, JobState.RECEIVING)
