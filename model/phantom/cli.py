"""``unict-node generate``: write phantoms as DICOM cases or in a public dataset's layout.

::

    unict-node generate --format dicom --out DIR --seed 0 --cases 3 --grid realistic \\
        [--patient-name "Doe^Jane" --patient-id P1]
    unict-node generate --format ctrate --out DIR --seed 100 --cases 20 [--split valid]
    unict-node generate --format rexgroundingct --out DIR --seed 0 --cases 5

Case ``i`` is the phantom of seed ``seed + i`` (deterministic). The layouts are those of
:mod:`model.phantom.layouts`; in the NIfTI layouts the phantom of seed ``s`` is patient
``s + 1`` (``train_{s+1}_a_1.nii.gz``), so disjoint seed ranges can share one folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from model.phantom.case import Phantom
from model.phantom.generate import generate
from model.phantom.layouts import write_ctrate, write_dicom_cases, write_rexgroundingct

FORMATS = ("dicom", "rexgroundingct", "ctrate")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser``."""
    parser.add_argument(
        "--format", choices=FORMATS, default="dicom", help="output layout (default: dicom)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (default: 0)")
    parser.add_argument("--cases", type=int, default=1, help="number of cases (default: 1)")
    parser.add_argument(
        "--grid",
        choices=("training", "realistic"),
        default="training",
        help="training: coarse and fast; realistic: 512 x 512, thin slices (default: training)",
    )
    parser.add_argument(
        "--generator",
        type=int,
        choices=(1, 2),
        default=1,
        help="phantom generator: 1 (original) or 2 (scanner realism: kernels, partial volume, "
        "vessels, fissures, mediastinum) (default: 1)",
    )
    parser.add_argument(
        "--p-normal",
        type=float,
        default=0.15,
        help="probability of a case without findings (default: 0.15)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "valid"),
        default="train",
        help="CT-RATE split of the NIfTI layouts (ReXGroundingCT: train or val) (default: train)",
    )
    parser.add_argument("--patient-name", default=None, help="DICOM Patient's Name for every case")
    parser.add_argument("--patient-id", default=None, help="DICOM Patient ID for every case")


def _phantoms(args: argparse.Namespace) -> Iterator[Phantom]:
    for i in range(args.cases):
        yield generate(
            args.seed + i,
            args.grid,
            p_normal=args.p_normal,
            generator=getattr(args, "generator", 1),
        )


def run_generate(args: argparse.Namespace) -> int:
    """Generate ``args.cases`` phantoms and write them; prints a JSON summary.

    Returns
    -------
    int
        0 on success, 2 on invalid arguments.
    """
    if args.cases < 1:
        print("generate: --cases must be at least 1", file=sys.stderr)
        return 2
    if args.format != "dicom" and args.seed < 0:
        print(
            "generate: --seed must be >= 0 for the NIfTI layouts (patient = seed + 1)",
            file=sys.stderr,
        )
        return 2
    if not 0.0 <= args.p_normal <= 1.0:
        print("generate: --p-normal must be in [0, 1]", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"format": args.format, "out": str(out), "grid": args.grid}
    if args.format == "dicom":
        dirs = write_dicom_cases(
            _phantoms(args), out, patient_name=args.patient_name, patient_id=args.patient_id
        )
        summary["cases"] = [str(d) for d in dirs]
    elif args.format == "ctrate":
        paths = write_ctrate(_phantoms(args), out, split=args.split, first_patient=args.seed + 1)
        summary["cases"] = [str(p) for p in paths]
    else:
        entries = write_rexgroundingct(
            _phantoms(args), out, split=args.split, first_patient=args.seed + 1
        )
        summary["cases"] = [
            {"name": e["name"], "categories": sorted(set(e["categories"].values()))}
            for e in entries
        ]
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``generate`` on its own (``python -m model.phantom.cli``)."""
    parser = argparse.ArgumentParser(
        prog="unict-node generate", description=__doc__.split("\n\n")[0]
    )
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
