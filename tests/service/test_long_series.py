"""A 2,000-slice series over one association (issue 6, point 3): received, assembled, loaded,
analysed and its outputs sent, with every instance recorded once.

The costliest test of the issue (about 40 s of CPU here: receiving is per-instance work,
fsync and a database transaction each), so it is its own module.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.store import JobState
from tests.service.node_harness import (
    Destination,
    ct_datasets,
    node_settings,
    running_node,
    send,
    sent_uids,
    settled,
)

pytestmark = [pytest.mark.network, pytest.mark.slow]

SLICES = 2000


def test_two_thousand_slices(tmp_path: Path) -> None:
    study = generate_uid()
    series = ct_datasets(SLICES, study, rows=16, columns=16, images_in_acquisition=SLICES)
    pacs = Destination().start()
    try:
        with running_node(node_settings(tmp_path, pacs, quiet_period_s=30)) as (node, processor):
            started = time.monotonic()
            assert set(send(node.dicom_port, series)) == {0}
            received = time.monotonic() - started
            (job,) = settled(node, study)
            assert job.state is JobState.DONE, (job.error_stage, job.error_reason)
            assert job.instance_count == SLICES and job.version == 1
            (claimed,) = processor.jobs
            assert len(claimed.instance_paths) == SLICES
            assert len(list((tmp_path / "spool").rglob("*.dcm"))) == SLICES
            outputs = sent_uids(job)
            assert {s.sop_instance_uid for s in pacs.of_study(study)} == outputs
            print(
                f"\n{SLICES} slices received in {received:.1f} s "
                f"({SLICES / received:.0f} instances/s); job stages: "
                + ", ".join(f"{k} {v:.2f} s" for k, v in job.timings.items())
            )
    finally:
        pacs.stop()
