"""service.retention: ended studies leave the spool by policy, never a file of a job that
has not ended (issue 6, point 4)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.config import RetentionSettings, WorkersSettings
from service.retention import RetentionCleaner
from service.selection import InstanceHeader
from service.store import JobState, JobStore, ReceivedInstance, RecordResult
from tests.conftest import FakeClock, make_ct_dataset, wait_until
from tests.service.node_harness import (
    Destination,
    ct_datasets,
    node_settings,
    running_node,
    send,
    settled,
)

HOUR = 3600.0


class Spool:
    """Writes instance files into a spool folder and records them, as the receiver does."""

    def __init__(self, store: JobStore, root: Path) -> None:
        self.store = store
        self.root = root

    def receive(
        self, study: str, n: int = 3, series: str | None = None, start: int = 0
    ) -> tuple[RecordResult, list[Path]]:
        series = series or generate_uid()
        folder = self.root / study / series
        folder.mkdir(parents=True, exist_ok=True)
        paths, result = [], None
        for i in range(start, start + n):
            ds = make_ct_dataset(study_uid=study, series_uid=series, index=i)
            header = InstanceHeader.from_dataset(ds)
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            path.write_bytes(b"x" * 1000)
            paths.append(path)
            result = self.store.record_instance(
                ReceivedInstance(
                    study,
                    series,
                    ds.SOPInstanceUID,
                    ds.SOPClassUID,
                    path,
                    1000,
                    f"{i:064d}",
                    "STORESCU",
                    header.to_json(),
                )
            )
        assert result is not None
        return result, paths


def queue(store: JobStore, result: RecordResult, n: int = 3, rejected: str | None = None) -> None:
    assert store.complete_series(result.series_id, instance_count=n, rejected_rule=rejected)


def run(store: JobStore, end: JobState) -> int:
    """Claim the next queued job and take it to `end` (RUNNING stays running)."""
    job = store.claim_next_job("w1", lease_s=10 * HOUR)
    assert job is not None
    if end is JobState.DONE:
        store.mark_sending(job.id, "w1", {})
        store.finish(job.id, "w1", timings={}, sent=[])
    elif end is JobState.FAILED:
        store.fail(job.id, "w1", stage="load", reason="bad geometry", retryable=False)
    return job.id


def exist(paths: Sequence[Path]) -> list[bool]:
    return [p.exists() for p in paths]


@pytest.fixture
def spool(sqlite_store: JobStore, tmp_path: Path) -> Spool:
    return Spool(sqlite_store, tmp_path / "spool")


def cleaner(store: JobStore, spool: Spool, **settings: float) -> RetentionCleaner:
    options = {"keep_done_hours": 1.0, "keep_failed_hours": 5.0, "emergency_free_mb": 0}
    options.update(settings)
    return RetentionCleaner(store, spool.root, RetentionSettings(**options))  # type: ignore[arg-type]


def test_ended_studies_go_by_age_unended_never(
    sqlite_store: JobStore, spool: Spool, clock: FakeClock
) -> None:
    done_r, done = spool.receive("1.1")
    queue(sqlite_store, done_r)
    run(sqlite_store, JobState.DONE)
    rejected_r, rejected = spool.receive("1.2")
    queue(sqlite_store, rejected_r, rejected="modality MR not in [CT]")
    failed_r, failed = spool.receive("1.3")
    queue(sqlite_store, failed_r)
    run(sqlite_store, JobState.FAILED)
    # One series of study 1.4 ended, the other is still running: the study stays whole.
    mixed_done_r, mixed_done = spool.receive("1.4")
    queue(sqlite_store, mixed_done_r)
    run(sqlite_store, JobState.DONE)
    mixed_running_r, mixed_running = spool.receive("1.4")
    queue(sqlite_store, mixed_running_r)
    run(sqlite_store, JobState.RUNNING)
    _, receiving = spool.receive("1.5")

    retention = cleaner(sqlite_store, spool)
    clock.advance(0.5 * HOUR)
    assert retention.run_once().studies == []
    clock.advance(1.5 * HOUR)
    report = retention.run_once()
    assert sorted(report.studies) == ["1.1", "1.2"] and report.files == 6
    assert report.bytes == 6000 and not report.emergency
    assert exist(done + rejected) == [False] * 6
    assert not (spool.root / "1.1").exists()  # empty folders go too
    assert all(exist(failed + mixed_done + mixed_running + receiving))
    (job,) = sqlite_store.list_jobs(study_instance_uid="1.1")
    assert job.spool_removed_at is not None and job.state is JobState.DONE
    assert "spool_removed_at" not in job.outputs

    clock.advance(4 * HOUR)  # FAILED studies are kept longer, for an admin retry
    assert retention.run_once().studies == ["1.3"]
    clock.advance(100 * HOUR)
    assert retention.run_once().studies == []
    assert all(exist(mixed_done + mixed_running + receiving))


def test_emergency_removes_ended_studies_at_once_but_never_unended(
    sqlite_store: JobStore, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    old_r, old = spool.receive("2.1")
    queue(sqlite_store, old_r)
    run(sqlite_store, JobState.DONE)
    running_r, running = spool.receive("2.2")
    queue(sqlite_store, running_r)
    run(sqlite_store, JobState.RUNNING)
    _, receiving = spool.receive("2.3")
    # More free space wanted than the disk has: the emergency never ends.
    retention = cleaner(sqlite_store, spool, keep_done_hours=1000.0, emergency_free_mb=10**9)
    with caplog.at_level(logging.WARNING):
        report = retention.run_once()
    assert report.emergency and report.studies == ["2.1"]
    assert exist(old) == [False] * 3
    assert all(exist(running + receiving))
    assert "every remaining file belongs to a job that has not ended" in caplog.text


def test_files_of_a_newer_series_version_are_kept(
    sqlite_store: JobStore, spool: Spool, clock: FakeClock
) -> None:
    first_r, first = spool.receive("3.1")
    queue(sqlite_store, first_r)
    run(sqlite_store, JobState.DONE)
    retention = cleaner(sqlite_store, spool)
    clock.advance(2 * HOUR)
    # The cleaner read the study as ended; then a late instance made version 2 (which
    # carries version 1's files) before it removed anything.
    (stale,) = [s for s in sqlite_store.studies_for_retention() if s.ended]
    series = sqlite_store.list_jobs()[0].series_instance_uid
    late_r, late = spool.receive("3.1", n=1, series=series, start=3)
    assert late_r.version == 2
    report = retention.run_once()  # the study is not ended any more
    assert report.studies == []
    retention._remove_study(stale, report)  # the race, forced
    assert all(exist(first + late))


def test_stale_partial_files_are_removed(sqlite_store: JobStore, spool: Spool) -> None:
    folder = spool.root / "4.1" / "4.1.1"
    folder.mkdir(parents=True)
    old, fresh = folder / ".1.2.3.abc.part", folder / ".1.2.4.def.part"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    an_hour_ago = time.time() - 2 * HOUR
    os.utime(old, (an_hour_ago, an_hour_ago))
    report = cleaner(sqlite_store, spool, partial_max_age_s=HOUR).run_once()
    assert report.partials == 1
    assert not old.exists() and fresh.exists()


@pytest.mark.network
def test_node_cleans_a_done_study_while_another_job_runs(tmp_path: Path) -> None:
    pacs = Destination().start()
    settings = node_settings(
        tmp_path,
        pacs,
        retention=RetentionSettings(keep_done_hours=0, interval_s=0.1, emergency_free_mb=0),
        workers=WorkersSettings(count=2, poll_interval_s=0.05),
    )
    try:
        with running_node(settings) as (node, processor):
            spool_dir = settings.storage.spool_dir
            done_study, held_study = generate_uid(), generate_uid()
            held = ct_datasets(12, held_study, images_in_acquisition=12)
            gate = processor.hold(held[0].SeriesInstanceUID)
            try:
                assert set(send(node.dicom_port, held)) == {0}
                assert processor.holding[held[0].SeriesInstanceUID].wait(60)
                assert set(
                    send(node.dicom_port, ct_datasets(12, done_study, images_in_acquisition=12))
                ) == {0}
                (job,) = settled(node, done_study)
                assert job.state is JobState.DONE
                wait_until(lambda: not (spool_dir / done_study).exists(), what="study removed")
                held_files = list((spool_dir / held_study).rglob("*.dcm"))
                assert len(held_files) == 12  # its job is running: untouched
                (running,) = node.store.list_jobs(study_instance_uid=held_study)
                assert running.state is JobState.RUNNING
            finally:
                gate.set()
            (job,) = settled(node, held_study)
            assert job.state is JobState.DONE
            wait_until(lambda: not (spool_dir / held_study).exists(), what="study removed")
            assert node.retention.is_alive
    finally:
        pacs.stop()
