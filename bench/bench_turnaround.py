"""Turnaround of the node: last CT instance acknowledged -> SR stored in Orthanc.

Usage: python -m bench.bench_turnaround [--studies 10] [--slices 300] [--quiet-period 10]

Starts a real Orthanc (loopback) and the node (SQLite, bundled model, engines in the
default order), renders realistic 512x512 phantoms of ``--slices`` slices, sends each with
DCMTK ``storescu`` (TCP_NODELAY=1) to the node, and times from storescu's exit (every
instance acknowledged) until the SR is found in Orthanc. Series are provably complete
(Images in Acquisition is in the data and the association is released), so the quiet
period does not apply; ``--quiet-period`` is the fallback a fixed-delay router would wait,
printed for comparison next to the measured series-complete detection delay (from the job
store: the series' last instance recorded -> series closed and its job queued). Prints
per-study rows and p50/p95 with the stage breakdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import yaml
from sqlalchemy import select

from bench.bench_model import realistic_volume
from model.phantom.dicom_series import write_ct_series
from service.config import load_settings
from service.node import Node
from service.processor import UniCTProcessor
from service.store.models import Series
from tests.conftest import free_port
from tests.orthanc import orthanc_server

STAGES = ("load", "preprocess", "infer", "postprocess", "encode", "send")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--quiet-period", type=float, default=10.0, help="fallback quiet period (s), for comparison"
    )
    parser.add_argument("--seed", type=int, default=9100)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="unict-bench-"))
    node_port = free_port()
    with orthanc_server(
        work / "orthanc",
        http_port=free_port(),
        dicom_port=free_port(),
        modalities={"unict": ("UNICT", "127.0.0.1", node_port)},
    ) as orthanc:
        config = {
            "dicom": {
                "ae_title": "UNICT",
                "port": node_port,
                "bind_address": "127.0.0.1",
                "allowed_callers": ["STORESCU", "ORTHANC"],
            },
            "assembly": {"quiet_period_s": args.quiet_period, "poll_interval_s": 0.1},
            "destinations": [
                {
                    "name": "orthanc",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ],
            "storage": {
                "spool_dir": str(work / "spool"),
                "min_free_mb": 100,
                "results_dir": str(work / "results"),
            },
            "database": {"url": f"sqlite:///{work / 'unict.db'}"},
            "http": {"host": "127.0.0.1", "port": free_port()},
            "model": {"plan_dir": str(work / "plans")},
            "workers": {"count": 1, "poll_interval_s": 0.05},
        }
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        settings = load_settings(work / "config.yaml")
        processor = UniCTProcessor(settings)
        processor.load()
        rows = []
        with Node(settings, processor, processor.status) as node:
            for i in range(args.studies):
                hu, affine = realistic_volume(args.slices, args.seed + i)
                folder = work / f"study{i}"
                paths = write_ct_series(
                    hu, affine, folder, patient_name="Bench^Phantom", patient_id=f"BENCH{i}"
                )
                series_uid = str(
                    pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
                )
                subprocess.run(
                    [
                        "/usr/bin/storescu",
                        "-aet",
                        "STORESCU",
                        "-aec",
                        "UNICT",
                        "+sd",
                        "127.0.0.1",
                        str(node_port),
                        str(folder),
                    ],
                    check=True,
                    env={**os.environ, "TCP_NODELAY": "1"},
                    capture_output=True,
                )
                t0 = time.perf_counter()
                job = None
                while job is None:
                    job = next(
                        (
                            j
                            for j in node.store.list_jobs(limit=20)
                            if j.series_instance_uid == series_uid
                            and j.state.value in ("DONE", "FAILED")
                        ),
                        None,
                    )
                    time.sleep(0.02)
                if job.state.value != "DONE":
                    raise SystemExit(f"job failed: {job.error_stage}: {job.error_reason}")
                sr_uid = job.outputs["result"]["sr_sop_instance_uid"]
                while not orthanc.client.lookup(sr_uid, filter="Instance"):
                    time.sleep(0.02)
                total = time.perf_counter() - t0
                stages = {s: float(job.timings.get(s, 0.0)) for s in STAGES}
                with node.store.engine.connect() as conn:
                    last, closed = conn.execute(
                        select(Series.last_received_at, Series.completed_at).where(
                            Series.id == job.series_id
                        )
                    ).one()
                assert closed is not None  # the job left RECEIVING: its series was closed
                detection = (closed - last).total_seconds()
                rows.append((total, stages, detection))
                print(
                    f"study {i}: {total:.2f} s  detection {detection:.3f}  "
                    + "  ".join(f"{s} {v:.2f}" for s, v in stages.items()),
                    flush=True,
                )
        totals = [r[0] for r in rows]
        print(
            f"\nTurnaround, {args.studies} studies of {args.slices}x512x512, engine {processor.status()[1]}"
        )
        print(f"{'':<22}{'p50 s':>8}{'p95 s':>8}")
        print(
            f"{'last instance -> SR':<22}{statistics.median(totals):>8.2f}{_pct(totals, 0.95):>8.2f}"
        )
        for s in STAGES:
            vals = [r[1][s] for r in rows]
            print(f"{'  ' + s:<22}{statistics.median(vals):>8.2f}{_pct(vals, 0.95):>8.2f}")
        detections = [r[2] for r in rows]
        print(
            f"{'  series complete':<22}{statistics.median(detections):>8.3f}"
            f"{_pct(detections, 0.95):>8.3f}   (last instance recorded -> job queued)"
        )
        other = [r[0] - sum(r[1].values()) - r[2] for r in rows]
        print(f"{'  queue+db+other':<22}{statistics.median(other):>8.2f}{_pct(other, 0.95):>8.2f}")
        print(
            f"{'fixed quiet period':<22}{args.quiet_period:>8.2f}   (what a quiet-period-only router "
            f"waits instead of the {statistics.median(detections):.3f} s above)"
        )


if __name__ == "__main__":
    main()
