"""The ``unict-node`` command line.

Subcommands: ``train`` and ``evaluate`` (the model lifecycle), and the node's own
commands, registered as they exist.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

Handler = Callable[[argparse.Namespace], int]


def _cmd_train(args: argparse.Namespace) -> int:
    from model.training.train import train

    result = train(args)
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "steps": result.steps,
                "seconds": round(result.seconds, 1),
                "final_loss": round(result.final_loss, 4),
                "thresholds": result.thresholds,
                "bundle": str(result.bundle_dir) if result.bundle_dir else None,
            },
            indent=2,
        )
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.dicom is not None:
        from service.evaluate_series import cmd_evaluate_series

        return cmd_evaluate_series(args)
    from model.training.evaluate import evaluate

    metrics = evaluate(args)
    summary = {
        k: metrics[k] for k in ("cases", "seconds", "classification", "segmentation", "report")
    }
    print(json.dumps(summary, indent=2))
    print(f"full metrics written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from engines.build import add_build_engine_arguments, run_build_engine
    from model.phantom.cli import add_generate_arguments, run_generate
    from model.training.evaluate import add_evaluate_arguments
    from model.training.train import add_train_arguments
    from service.commands import (
        add_config_argument,
        add_jobs_arguments,
        add_worker_arguments,
        cmd_check_config,
        cmd_db_upgrade,
        cmd_jobs,
        cmd_serve,
        cmd_worker,
    )
    from service.demo import add_demo_arguments, cmd_demo
    from service.evaluate_series import add_series_arguments

    parser = argparse.ArgumentParser(
        prog="unict-node", description="UniCT Node: chest CT AI on the DICOM network."
    )
    parser.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train", help="train UniCT on generated phantoms and export a checkpoint bundle"
    )
    add_train_arguments(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint on phantoms, a real dataset (--data) or one real DICOM "
        "series (--dicom) and write metrics JSON",
        description="Evaluate a checkpoint (--checkpoint) on --cases phantoms generated from --seed "
        "(a seed never used in training), or on the test part of a real dataset's fold (--data "
        "KIND:DIR --fold K), writing per-class and macro F1/AUROC/AP, Dice, BLEU-4, ROUGE-L, "
        "clinical-efficacy F1 and the fusion attention matrix to --out. With --dicom DIR: one "
        "real series through the node's own analysis, each finding's probability and "
        "decision, and with --mask the Dice and the detection of each marked lesion.",
    )
    add_evaluate_arguments(p)
    add_series_arguments(p)
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser(
        "generate",
        help="write synthetic chest-CT phantoms as DICOM series or in ReXGroundingCT/CT-RATE layouts",
    )
    add_generate_arguments(p)
    p.set_defaults(handler=run_generate)

    p = sub.add_parser(
        "build-engine",
        help="export UniCT to ONNX and build a TensorRT plan for this GPU (FP16 by default)",
    )
    add_build_engine_arguments(p)
    p.set_defaults(handler=run_build_engine)

    p = sub.add_parser(
        "serve", help="run the node: DICOM listener, workers, HTTP health and jobs API"
    )
    add_config_argument(p)
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser(
        "worker",
        help="run jobs from the procrastinate queue (queue.backend: procrastinate), with "
        "HTTP health, metrics and jobs API; scale these apart from the receivers",
    )
    add_worker_arguments(p)
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser(
        "check-config", help="validate config.yaml, the model bundle and the engines"
    )
    add_config_argument(p)
    p.set_defaults(handler=cmd_check_config)

    p = sub.add_parser("db-upgrade", help="apply the database migrations (Alembic) to database.url")
    add_config_argument(p)
    p.set_defaults(handler=cmd_db_upgrade)

    p = sub.add_parser("jobs", help="list, show or retry jobs (for admins without a browser)")
    add_jobs_arguments(p)
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser(
        "demo", help="send a synthetic chest CT to a running node and print what came back"
    )
    add_demo_arguments(p)
    p.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unict-node``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    # pynetdicom logs every DIMSE message at INFO: keep it to warnings on the console.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
