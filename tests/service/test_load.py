"""Load, the short form for CI (issue 6, point 6): DCMTK storescu processes and pynetdicom
clients send 6 studies to one node at once while its workers run the jobs; every instance
lands, every job ends DONE, no association is refused. Then 20 studies split between DIMSE
(DCMTK, pynetdicom) and STOW-RS (dicomweb-client) senders, all at once (issue 17). The long
form is ``python -m bench.bench_load`` (20 studies by default, ``--stow`` for the mix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bench_load import STORESCU, run_load, write_studies
from service.config import WorkersSettings
from service.store import JobState
from tests.service.dicomweb.stow_harness import TOKEN, TOKEN_ENV, stow_settings
from tests.service.node_harness import FINAL_STATES, Destination, node_settings, running_node

pytestmark = [pytest.mark.network, pytest.mark.slow]

STUDIES = 6
SLICES = 12


def test_concurrent_senders_lose_nothing(tmp_path: Path) -> None:
    studies = write_studies(tmp_path / "studies", STUDIES, SLICES, 32)
    pacs = Destination().start()
    settings = node_settings(
        tmp_path / "node",
        pacs,
        quiet_period_s=30,  # every study is complete at release; no quiet period needed
        workers=WorkersSettings(count=2, poll_interval_s=0.05),
    )
    try:
        with running_node(settings) as (node, _):

            def count_jobs() -> tuple[int, int, int]:
                jobs = node.store.list_jobs(limit=1000)
                final = sum(j.state in FINAL_STATES for j in jobs)
                return final, len(jobs), sum(j.state is JobState.DONE for j in jobs)

            sent, receive_s, drain_s = run_load(
                node.dicom_port, studies, count_jobs=count_jobs, timeout_s=240
            )
            jobs = node.store.list_jobs(limit=1000)
            spool = settings.storage.spool_dir
            for study in studies:
                (job,) = [j for j in jobs if j.study_instance_uid == study.study_uid]
                assert job.state is JobState.DONE, (job.error_stage, job.error_reason)
                assert job.instance_count == SLICES and job.version == 1
                recorded = {i.sop_instance_uid for i in node.store.job_instances(job.id)}
                assert recorded == {p.name.removesuffix(".dcm") for p in study.paths}
            assert len(list(spool.rglob("*.dcm"))) == STUDIES * SLICES
            assert node.metrics is not None
    finally:
        pacs.stop()
    assert all(s.ok for s in sent), [s.detail for s in sent if not s.ok]
    if STORESCU.exists():
        assert {s.sender for s in sent} == {"dcmtk", "pynetdicom"}
    assert len({s.sop_instance_uid for s in pacs.stored}) == 2 * STUDIES
    assert pacs.duplicates() == []
    print(
        f"\n{STUDIES} studies, {STUDIES * SLICES} instances from {len(sent)} senders at once: "
        f"received in {receive_s:.1f} s ({STUDIES * SLICES / receive_s:.1f} instances/s), "
        f"last job DONE {drain_s:.1f} s later"
    )


MIXED_STUDIES = 20


def test_dimse_and_stow_senders_at_once_lose_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    studies = write_studies(tmp_path / "studies", MIXED_STUDIES, SLICES, 32)
    pacs = Destination().start()
    settings = stow_settings(
        tmp_path / "node",
        pacs,
        quiet_period_s=60,  # every study is complete when its association/request ends
        workers=WorkersSettings(count=2, poll_interval_s=0.05),
        max_associations=MIXED_STUDIES + 2,
    )
    try:
        with running_node(settings, http=True) as (node, _):

            def count_jobs() -> tuple[int, int, int]:
                jobs = node.store.list_jobs(limit=1000)
                final = sum(j.state in FINAL_STATES for j in jobs)
                return final, len(jobs), sum(j.state is JobState.DONE for j in jobs)

            sent, receive_s, drain_s = run_load(
                node.dicom_port,
                studies,
                count_jobs=count_jobs,
                timeout_s=240,
                stow=(f"http://127.0.0.1:{node.http_port}", TOKEN),
            )
            jobs = node.store.list_jobs(limit=1000)
            for study in studies:
                (job,) = [j for j in jobs if j.study_instance_uid == study.study_uid]
                assert job.state is JobState.DONE, (job.error_stage, job.error_reason)
                assert job.instance_count == SLICES and job.version == 1
                recorded = {i.sop_instance_uid for i in node.store.job_instances(job.id)}
                assert recorded == {p.name.removesuffix(".dcm") for p in study.paths}
            spool = settings.storage.spool_dir
            assert len(list(spool.rglob("*.dcm"))) == MIXED_STUDIES * SLICES
            assert list(spool.rglob("*.part")) == []
    finally:
        pacs.stop()
    assert all(s.ok for s in sent), [s.detail for s in sent if not s.ok]
    senders = {s.sender for s in sent}
    assert senders == ({"dcmtk"} if STORESCU.exists() else set()) | {"pynetdicom", "stow"}
    assert sum(s.sender == "stow" for s in sent) >= MIXED_STUDIES // 3
    assert len({s.sop_instance_uid for s in pacs.stored}) == 2 * MIXED_STUDIES
    assert pacs.duplicates() == []
    print(
        f"\n{MIXED_STUDIES} studies by {sorted(senders)} at once: received in "
        f"{receive_s:.1f} s, last job DONE {drain_s:.1f} s later"
    )
