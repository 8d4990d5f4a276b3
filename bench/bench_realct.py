"""The shared real chest CT through a whole node: turnaround and what a radiologist sees.

Usage: python -m bench.bench_realct [--runs 5] [--json OUT.json]

Starts a real Orthanc and the node (SQLite, the bundled model, engines in the default
order) on loopback, uploads the LIDC-IDRI-0001 series of ``../shared/realct`` to Orthanc
and has Orthanc C-STORE it to the node, ``--runs`` times, each time as a new study (new
UIDs, same pixels and headers). The node counts the series with a C-FIND of Orthanc
(the series has no Images in Acquisition). For each run it prints the turnaround (series
complete in the job store -> SR found in Orthanc) with its stage breakdown, and for the
first run what a radiologist would judge: findings called Present, SR measurement
groups, each segment's fraction of voxels outside the lungs (5 mm tolerance, the CT's own
lung field), the nodule segment's Dice against the readers' mask, and whether the report
text agrees with the SEG on side and lobe. Skips (exit 0, with the reason) when the real
case is not there; the data is read where it lies and never copied into the project.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.realct import (
    STAGES,
    figures,
    node_with_orthanc,
    readers_mask,
    realct_missing_reason,
    relabel,
    round_trip,
    unpack_lidc,
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="passes of the real case")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    reason = realct_missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="unict-bench-realct-"))
    series = unpack_lidc(work / "lidc")
    rows = []
    first = None
    with node_with_orthanc(work) as (node, orthanc):
        for run in range(args.runs):
            case = relabel(series, work / f"run{run}", f"bench-realct-{run}")
            rt = round_trip(node, orthanc, case)
            rows.append(rt)
            if first is None:
                first = figures(rt, case, readers_mask())
            print(
                f"run {run}: turnaround {rt.turnaround_s:.2f} s  detection {rt.detection_s:.3f} s  "
                + "  ".join(f"{s} {rt.stages[s]:.2f}" for s in STAGES),
                flush=True,
            )
    assert first is not None
    totals = [r.turnaround_s for r in rows]
    steady = totals[1:] or totals
    print(f"\nReal case LIDC-IDRI-0001 (133 x 512 x 512, 2.5 mm), {args.runs} runs")
    print(f"{'':<26}{'first':>8}{'p50 2..n':>10}{'max 2..n':>10}")
    print(f"{'complete -> SR stored':<26}{totals[0]:>8.2f}{statistics.median(steady):>10.2f}{max(steady):>10.2f}")
    for s in STAGES:
        vals = [r.stages[s] for r in rows]
        rest = vals[1:] or vals
        print(f"{'  ' + s:<26}{vals[0]:>8.2f}{statistics.median(rest):>10.2f}{max(rest):>10.2f}")
    print(f"\nSR measurement groups: {first.groups}")
    print("Present: " + ", ".join(f"{k} (p {v:.2f})" for k, v in first.present.items()))
    print(
        "Segment voxels outside the lungs (5 mm tolerance): "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in first.outside_lungs.items())
    )
    print(f"Nodule Dice vs readers' mask: {first.nodule_dice:.3f}")
    print(f"Report sentences agreeing with the SEG: {first.agreement[0]}/{first.agreement[1]}")
    print(f"LAA-950: {first.laa950}%")
    print(f"Report: {first.text}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "turnaround_s": totals,
                    "stages": [r.stages for r in rows],
                    "groups": first.groups,
                    "present": first.present,
                    "outside_lungs": first.outside_lungs,
                    "nodule_dice": first.nodule_dice,
                    "agreement": list(first.agreement),
                    "laa950": first.laa950,
                    "report": first.text,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
