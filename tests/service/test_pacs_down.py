"""The PACS down or refusing (issue 6, point 2): outputs are retried with backoff up to the
configured limits, then the job is FAILED with the DIMSE status or the network error; once
the PACS is back, a retry delivers each output once.

A whole node on loopback (``node_harness``); the PACS is a real pynetdicom Storage SCP,
absent (port closed) or scripted to answer failure statuses.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.config import SenderSettings, WorkersSettings
from service.store import JobState
from tests.conftest import collect_garbage, ignores_pynetdicom_socket_leak
from tests.service.node_harness import (
    Destination,
    ct_datasets,
    node_settings,
    running_node,
    send,
    sent_uids,
    settled,
)

pytestmark = pytest.mark.network

N = 12
SENDER = SenderSettings(max_attempts=2, backoff_s=0.1, max_backoff_s=0.2, timeout_s=10)
WORKERS = WorkersSettings(count=1, poll_interval_s=0.05, max_attempts=3, retry_backoff_s=0.2)


@pytest.fixture
def pacs() -> Iterator[Destination]:
    destination = Destination()  # not started: the PACS is down until a test starts it
    yield destination
    destination.stop()


def send_study(port: int) -> str:
    study = generate_uid()
    assert send(port, ct_datasets(N, study, images_in_acquisition=N)) == [0] * N
    return study


@ignores_pynetdicom_socket_leak
def test_pacs_down_fails_with_the_network_error_then_a_retry_delivers_once(
    tmp_path: Path, pacs: Destination
) -> None:
    settings = node_settings(tmp_path, pacs, sender=SENDER, workers=WORKERS)
    with running_node(settings) as (node, _):
        started = time.monotonic()
        study = send_study(node.dicom_port)
        (job,) = settled(node, study)
        elapsed = time.monotonic() - started
        assert job.state is JobState.FAILED
        assert job.error_stage == "send"
        assert job.attempts == WORKERS.max_attempts
        assert job.error_reason is not None
        assert "no association (connection refused, timed out or aborted)" in job.error_reason
        assert f"gave up after {WORKERS.max_attempts} attempts" in job.error_reason
        sent = job.outputs["sent"]
        assert sent and all(not s["ok"] and s["status"] is None for s in sent)
        assert all(s["attempts"] == SENDER.max_attempts for s in sent)
        # Job retries waited 0.2 s then 0.4 s (doubling), each send 0.1 s between tries.
        assert elapsed >= 0.2 + 0.4 + 3 * 0.1

        pacs.start()  # the PACS is back
        node.store.retry(job.id)
        node.workers.wake()
        (done,) = settled(node, study)
        assert done.state is JobState.DONE and done.attempts == 1
        assert {s.sop_instance_uid for s in pacs.of_study(study)} == sent_uids(done)
        assert len(sent_uids(done)) == 2 and pacs.duplicates() == []
    collect_garbage()


def test_out_of_resources_is_retried_then_fails_with_the_status(
    tmp_path: Path, pacs: Destination
) -> None:
    pacs.statuses = [0xA700] * 100
    pacs.start()
    settings = node_settings(tmp_path, pacs, sender=SENDER, workers=WORKERS)
    with running_node(settings) as (node, _):
        study = send_study(node.dicom_port)
        (job,) = settled(node, study)
        assert job.state is JobState.FAILED and job.error_stage == "send"
        assert job.attempts == WORKERS.max_attempts
        assert "status 0xA700" in (job.error_reason or "")
        # SEG and SR, each tried max_attempts times per run, over every run.
        assert len(pacs.statuses) == 100 - 2 * SENDER.max_attempts * WORKERS.max_attempts
        assert pacs.of_study(study) == []

        pacs.statuses.clear()
        node.store.retry(job.id)
        node.workers.wake()
        (done,) = settled(node, study)
        assert done.state is JobState.DONE
        assert {s.sop_instance_uid for s in pacs.of_study(study)} == sent_uids(done)
        assert pacs.duplicates() == []


def test_permanent_refusal_fails_at_once_with_the_status(tmp_path: Path, pacs: Destination) -> None:
    pacs.statuses = [0xC000, 0xC000]  # cannot understand: trying again will not help
    pacs.start()
    settings = node_settings(tmp_path, pacs, sender=SENDER, workers=WORKERS)
    with running_node(settings) as (node, _):
        study = send_study(node.dicom_port)
        (job,) = settled(node, study)
        assert job.state is JobState.FAILED and job.attempts == 1
        assert "status 0xC000" in (job.error_reason or "")
        assert "gave up" not in (job.error_reason or "")
        assert [s["status_hex"] for s in job.outputs["sent"]] == ["0xC000", "0xC000"]


def test_pacs_back_between_job_retries_keeps_one_copy(tmp_path: Path, pacs: Destination) -> None:
    # The SEG is stored, the SR refused on both tries of the first run; the second run
    # sends both again and the PACS keeps one SEG: the re-run reuses the UIDs.
    pacs.statuses = [0x0000, 0xA700, 0xA700]
    pacs.start()
    settings = node_settings(tmp_path, pacs, sender=SENDER, workers=WORKERS)
    with running_node(settings) as (node, _):
        study = send_study(node.dicom_port)
        (job,) = settled(node, study)
        assert job.state is JobState.DONE and job.attempts == 2
        stored = pacs.of_study(study)
        assert {s.sop_instance_uid for s in stored} == sent_uids(job)
        assert len(sent_uids(job)) == 2
        assert len(stored) == 3  # the SEG twice, under the same SOP Instance UID
        assert len(pacs.duplicates()) == 1
