"""service.worker: claim, lease, process (test double), send (test double), record."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from service.config import WorkersSettings
from service.errors import SeriesGeometryError, StageError
from service.selection import InstanceHeader
from service.sender import Output, SendFailure, SendResult
from service.stages import Stage
from service.store import JobState, JobStore, ReceivedInstance, RetryPolicy, run_migrations
from service.worker import ClaimedJob, ProcessOutcome, Workers
from tests.conftest import FakeClock, make_ct_dataset, wait_until

SETTINGS = WorkersSettings(count=1, lease_s=30, poll_interval_s=0.05)


class FakeProcessor:
    """Test double for the UniCT pipeline: returns one tiny dataset per job, or raises."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.jobs: list[ClaimedJob] = []

    def __call__(self, job: ClaimedJob) -> ProcessOutcome:
        self.jobs.append(job)
        if self.error is not None:
            raise self.error
        output = Dataset()
        output.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        output.SOPInstanceUID = generate_uid()
        return ProcessOutcome(outputs=(output,), timings={"load": 0.1, "infer": 0.2})


class FakeSend:
    """Test double for the C-STORE sender: records what it was given."""

    def __init__(self, failure: SendFailure | None = None) -> None:
        self.failure = failure
        self.calls: list[Sequence[Output]] = []

    def __call__(self, outputs: Sequence[Output]) -> list[SendResult]:
        self.calls.append(outputs)
        if self.failure is not None:
            raise self.failure
        return [
            SendResult("pacs", str(o.SOPInstanceUID), str(o.SOPClassUID), True, 0, "stored", 1)  # type: ignore[union-attr]
            for o in outputs
        ]


def queue_job(store: JobStore, n: int = 5, shuffle: bool = True) -> tuple[int, list[Path]]:
    """A QUEUED job of `n` instances recorded out of order; returns it and the sorted paths."""
    study, series = generate_uid(), generate_uid()
    datasets = [make_ct_dataset(study_uid=study, series_uid=series, index=i) for i in range(n)]
    paths = [Path(f"/spool/{i:03d}-{ds.SOPInstanceUID}.dcm") for i, ds in enumerate(datasets)]
    order = list(range(n))
    if shuffle:
        random.Random(7).shuffle(order)
    result = None
    for i in order:
        header = InstanceHeader.from_dataset(datasets[i])
        result = store.record_instance(
            ReceivedInstance(
                study,
                series,
                header.sop_instance_uid,
                header.sop_class_uid,
                paths[i],
                10,
                f"{i:064d}",
                "STORESCU",
                header.to_json(),
            )
        )
    assert result is not None
    job = store.complete_series(result.series_id, instance_count=n)
    assert job is not None
    return job.id, paths


def test_job_runs_to_done_with_timings_and_outputs(sqlite_store: JobStore) -> None:
    job_id, paths = queue_job(sqlite_store)
    processor, send = FakeProcessor(), FakeSend()
    record = Workers(sqlite_store, processor, send, SETTINGS).run_once("w1")
    assert record is not None and record.state is JobState.DONE
    (claimed,) = processor.jobs
    assert claimed.job_id == job_id and claimed.version == 1 and claimed.attempt == 1
    assert list(claimed.instance_paths) == paths  # sorted along the slice normal
    assert {"load", "infer", "process_total", "send"} <= set(record.timings)
    (sent,) = record.outputs["sent"]
    assert sent["ok"] and sent["destination"] == "pacs" and sent["status_hex"] == "0x0000"
    assert len(send.calls) == 1
    assert Workers(sqlite_store, processor, send, SETTINGS).run_once("w1") is None


def test_retryable_stage_error_requeues_with_backoff(
    sqlite_store: JobStore, clock: FakeClock
) -> None:
    queue_job(sqlite_store)
    error = StageError(Stage.INFER, "engine busy", retryable=True)
    workers = Workers(sqlite_store, FakeProcessor(error), FakeSend(), SETTINGS)
    record = workers.run_once("w1")
    assert record is not None and record.state is JobState.QUEUED
    assert (record.error_stage, record.error_reason) == ("infer", "engine busy")
    assert record.next_retry_at is not None and record.next_retry_at > clock.now
    assert workers.run_once("w1") is None  # not due yet
    clock.advance(10)
    assert workers.run_once("w1") is not None


def test_permanent_stage_error_fails(sqlite_store: JobStore) -> None:
    queue_job(sqlite_store)
    processor = FakeProcessor(SeriesGeometryError("slice spacing varies by 40%"))
    record = Workers(sqlite_store, processor, FakeSend(), SETTINGS).run_once("w1")
    assert record is not None and record.state is JobState.FAILED
    assert (record.error_stage, record.error_reason) == ("load", "slice spacing varies by 40%")


def test_processor_crash_is_recorded_not_retried(sqlite_store: JobStore) -> None:
    queue_job(sqlite_store)
    processor = FakeProcessor(ZeroDivisionError("division by zero"))
    record = Workers(sqlite_store, processor, FakeSend(), SETTINGS).run_once("w1")
    assert record is not None and record.state is JobState.FAILED
    assert record.error_stage is None
    assert record.error_reason == "unexpected ZeroDivisionError: division by zero"


def test_send_failure_records_per_instance_results(sqlite_store: JobStore) -> None:
    queue_job(sqlite_store)
    result = SendResult(
        "pacs", "1.2.3", "1.2.840.10008.5.1.4.1.1.88.34", False, None, "no association", 3
    )
    send = FakeSend(SendFailure("1 of 1 instance sends failed", retryable=True, results=[result]))
    record = Workers(sqlite_store, FakeProcessor(), send, SETTINGS).run_once("w1")
    assert record is not None and record.state is JobState.QUEUED
    assert record.error_stage == "send"
    assert record.outputs["sent"][0]["detail"] == "no association"
    assert {"infer", "send"} <= set(record.timings)


def test_expired_lease_is_taken_again(sqlite_store: JobStore, clock: FakeClock) -> None:
    job_id, _ = queue_job(sqlite_store)
    crashed = sqlite_store.claim_next_job("crashed-worker", SETTINGS.lease_s)
    assert crashed is not None and crashed.id == job_id
    workers = Workers(sqlite_store, FakeProcessor(), FakeSend(), SETTINGS)
    assert workers.run_once("w2") is None  # lease still valid
    clock.advance(SETTINGS.lease_s + 1)
    record = workers.run_once("w2")
    assert record is not None and record.id == job_id
    assert record.state is JobState.DONE and record.attempts == 2


def test_lease_is_renewed_while_a_long_job_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'real-clock.db'}"
    run_migrations(url)
    store = JobStore(url, retry=RetryPolicy(max_attempts=1))  # the real clock
    try:
        queue_job(store)
        reclaimed: list[int] = []
        done = threading.Event()

        def slow(job: ClaimedJob) -> ProcessOutcome:
            # Runs for 4 lease lengths while someone keeps trying to reclaim leases.
            for _ in range(8):
                reclaimed.extend(j.id for j in store.reclaim_expired())
                done.wait(0.1)
            return ProcessOutcome(outputs=())

        settings = WorkersSettings(lease_s=0.2, poll_interval_s=0.05)
        record = Workers(store, slow, FakeSend(), settings).run_once("w1")
        assert reclaimed == []
        assert record is not None and record.state is JobState.DONE
    finally:
        store.close()


def test_superseded_job_does_not_send(sqlite_store: JobStore) -> None:
    queue_job(sqlite_store)
    send = FakeSend()

    def processor(job: ClaimedJob) -> ProcessOutcome:
        # A late instance arrives while the job runs.
        ds = make_ct_dataset(
            study_uid=job.study_instance_uid, series_uid=job.series_instance_uid, index=99
        )
        header = InstanceHeader.from_dataset(ds)
        sqlite_store.record_instance(
            ReceivedInstance(
                job.study_instance_uid,
                job.series_instance_uid,
                header.sop_instance_uid,
                header.sop_class_uid,
                Path("/spool/late.dcm"),
                1,
                "f" * 64,
                "STORESCU",
                header.to_json(),
            )
        )
        return FakeProcessor()(job)

    record = Workers(sqlite_store, processor, send, SETTINGS).run_once("w1")
    assert record is not None and record.state is JobState.FAILED
    assert record.superseded_by is not None
    assert "superseded" in (record.error_reason or "")
    assert send.calls == []


def test_worker_threads_pick_up_queued_jobs(sqlite_store: JobStore) -> None:
    processor, send = FakeProcessor(), FakeSend()
    workers = Workers(sqlite_store, processor, send, WorkersSettings(count=2, poll_interval_s=0.02))
    workers.start()
    try:
        assert workers.alive == 2
        ids = [queue_job(sqlite_store, 3)[0] for _ in range(3)]
        workers.wake()
        wait_until(
            lambda: all(sqlite_store.get_job(i).state is JobState.DONE for i in ids),  # type: ignore[union-attr]
            what="3 jobs DONE",
        )
    finally:
        workers.stop()
    assert workers.alive == 0
    assert sorted(j.job_id for j in processor.jobs) == sorted(ids)


def test_run_once_without_jobs(sqlite_store: JobStore) -> None:
    assert Workers(sqlite_store, FakeProcessor(), FakeSend(), SETTINGS).run_once() is None


def test_run_job_runs_a_delivered_job_once(sqlite_store: JobStore) -> None:
    # What a procrastinate delivery calls: a second delivery of the same job does nothing.
    job_id, _ = queue_job(sqlite_store)
    processor, send = FakeProcessor(), FakeSend()
    workers = Workers(sqlite_store, processor, send, SETTINGS, name="w")
    done = workers.run_job(job_id)
    assert done is not None and done.state is JobState.DONE
    assert workers.run_job(job_id) is None
    assert len(processor.jobs) == 1 and len(send.calls) == 1
