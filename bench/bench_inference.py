"""Latency of UniCT's inference engines on one preprocessed phantom volume.

Each engine runs the whole ``Engine.infer`` (visual path + greedy report decoding +
results on the host) on the same volume: warm-up calls first, then ``--repeats`` timed
calls; the table gives the median and 95th percentile, the speed-up over PyTorch FP32 on
the same device, and the agreement with it (largest probability difference, share of
equal mask voxels). An engine that cannot run here is listed with the reason.

CPU (default)::

    python bench/bench_inference.py                      # small: PyTorch vs ONNX Runtime

GPU machine::

    python bench/bench_inference.py --config full --device cuda

runs PyTorch FP32, FP16 and ``torch.compile``, ONNX Runtime CUDA and TensorRT FP16 (with
its build time). Without a shipped checkpoint for the configuration, a seeded random
initialisation is used: latency does not depend on the weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engines.base import Engine, InferenceResult  # noqa: E402
from engines.build import BuildOptions, build_plan  # noqa: E402
from engines.onnxruntime import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeEngine  # noqa: E402
from engines.pytorch import PyTorchEngine, ReportGenerator  # noqa: E402
from engines.samples import sample_volume, write_random_bundle  # noqa: E402
from engines.tensorrt import TensorRTEngine  # noqa: E402
from model.bundle import CARD_FILE, DEFAULT_CHECKPOINT_DIR, ModelBundle, load_bundle  # noqa: E402


class Skip(Exception):
    """This engine cannot run here; the message says why."""


@dataclass
class Row:
    """One engine's measurements."""

    engine: str
    status: str = "ok"
    prepare_s: float | None = None
    first_s: float | None = None
    times: tuple[float, ...] = ()
    result: InferenceResult | None = None

    @property
    def median(self) -> float:
        return float(np.median(self.times))

    @property
    def p95(self) -> float:
        return float(np.percentile(self.times, 95))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        choices=("small", "full"),
        default="small",
        help="UniCT configuration (default small)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (default: shipped small, else random init)",
    )
    parser.add_argument(
        "--repeats", type=int, default=10, help="timed calls per engine (default 10)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--seed", type=int, default=3, help="phantom case (default 3)")
    parser.add_argument(
        "--plan-dir",
        type=Path,
        default=None,
        help="TensorRT plans and ONNX cache (default: a temporary folder)",
    )
    return parser.parse_args(argv)


def load_or_random(args: argparse.Namespace, scratch: Path) -> tuple[ModelBundle, str]:
    if args.checkpoint is not None:
        return load_bundle(args.checkpoint), str(args.checkpoint)
    if args.config == "small" and (DEFAULT_CHECKPOINT_DIR / CARD_FILE).is_file():
        return load_bundle(DEFAULT_CHECKPOINT_DIR), "shipped model/checkpoints/small"
    return write_random_bundle(
        scratch / "bundle", args.config, seed=0
    ), f"random initialisation of {args.config} (seed 0)"


def measure(
    name: str, make: Callable[[], Engine], volume: npt.NDArray[np.float32], args: argparse.Namespace
) -> Row:
    row = Row(name)
    try:
        started = time.perf_counter()
        engine = make()
        engine.load()
        row.prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        row.result = engine.infer(volume)
        row.first_s = time.perf_counter() - started
        for _ in range(max(0, args.warmup - 1)):
            engine.infer(volume)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.infer(volume)
            times.append(time.perf_counter() - started)
        row.times = tuple(times)
    except Skip as exc:
        row.status = f"skipped: {exc}"
    except Exception as exc:  # a benchmark reports a failing engine and goes on
        row.status = f"failed: {type(exc).__name__}: {exc}"
    print(
        f"  {name}: {row.status}" + (f", median {row.median:.3f} s" if row.times else ""),
        file=sys.stderr,
        flush=True,
    )
    return row


def rows_for(
    args: argparse.Namespace, bundle: ModelBundle, plan_dir: Path, build_seconds: dict[str, float]
) -> list[tuple[str, Callable[[], Engine]]]:
    onnx_dir = plan_dir / "onnx"
    cuda_ok = torch.cuda.is_available()

    def need_cuda() -> None:
        if not cuda_ok:
            raise Skip("no CUDA device (torch.cuda.is_available() is False)")

    def pytorch(half: bool = False, compile: bool = False) -> Callable[[], Engine]:
        def make() -> Engine:
            if args.device == "cuda":
                need_cuda()
            return PyTorchEngine(
                bundle, device=args.device, half=half, compile=compile, threads=args.threads
            )

        return make

    def ort() -> Engine:
        available = OnnxRuntimeEngine.is_available()
        if not available:
            raise Skip(available.reason)
        if args.device == "cuda":
            import onnxruntime

            if CUDA_PROVIDER not in onnxruntime.get_available_providers():
                raise Skip(f"onnxruntime has no {CUDA_PROVIDER} (install onnxruntime-gpu)")
            return OnnxRuntimeEngine(
                bundle, onnx_dir, providers=[CUDA_PROVIDER, CPU_PROVIDER], threads=args.threads
            )
        return OnnxRuntimeEngine(bundle, onnx_dir, providers=[CPU_PROVIDER], threads=args.threads)

    def tensorrt() -> Engine:
        available = TensorRTEngine.is_available()
        if not available:
            raise Skip(available.reason)
        result = build_plan(
            bundle, plan_dir, onnx_dir=onnx_dir, options=BuildOptions(precision="fp16")
        )
        build_seconds["tensorrt fp16"] = result.metadata.build_seconds
        return TensorRTEngine(bundle, plan_dir, precision="fp16")

    if args.device == "cpu":
        return [("pytorch fp32", pytorch()), ("onnxruntime cpu", ort)]
    return [
        ("pytorch fp32", pytorch()),
        ("pytorch fp16", pytorch(half=True)),
        ("pytorch compile", pytorch(compile=True)),
        ("onnxruntime cuda", ort),
        ("tensorrt fp16", tensorrt),
    ]


def decoding_seconds(
    bundle: ModelBundle, volume: npt.NDArray[np.float32], device: str, repeats: int
) -> tuple[float, int]:
    """Median time of greedy report decoding alone, from this volume's visual memory."""
    model = bundle.build(device)
    with torch.inference_mode():
        memory = model(torch.from_numpy(volume)[None].to(device)).memory
    report = ReportGenerator(model.reporter, bundle.tokenizer, bundle.card.config.max_report_tokens)
    times = []
    for _ in range(max(3, repeats // 2)):
        started = time.perf_counter()
        tokens, _ = report.generate(memory)
        times.append(time.perf_counter() - started)
    return float(np.median(times)), len(tokens)


def table(rows: list[Row], build_seconds: dict[str, float]) -> str:
    ref = rows[0]
    header = (
        "engine",
        "median s",
        "p95 s",
        "speed-up",
        "first s",
        "prepare s",
        "build s",
        "max |dp|",
        "mask agree",
        "status",
    )
    lines = []
    for row in rows:
        if not row.times:
            lines.append((row.engine, "-", "-", "-", "-", "-", "-", "-", "-", row.status))
            continue
        speedup = f"{ref.median / row.median:.2f}x" if ref.times else "-"
        dp = agree = "-"
        if row.result is not None and ref.result is not None:
            dp = f"{np.abs(row.result.probabilities - ref.result.probabilities).max():.1e}"
            agree = f"{((row.result.segmentation > 0.5) == (ref.result.segmentation > 0.5)).mean() * 100:.3f}%"
        build = f"{build_seconds[row.engine]:.0f}" if row.engine in build_seconds else "-"
        lines.append(
            (
                row.engine,
                f"{row.median:.3f}",
                f"{row.p95:.3f}",
                speedup,
                f"{row.first_s:.3f}",
                f"{row.prepare_s:.2f}",
                build,
                dp,
                agree,
                row.status,
            )
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]

    def fmt(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="unict-bench-") as tmp:
        scratch = Path(tmp)
        bundle, source = load_or_random(args, scratch)
        plan_dir = args.plan_dir or scratch / "plans"
        volume = sample_volume(bundle.card.config, seed=args.seed)
        print(
            f"benchmarking {args.config} ({source}) on {args.device}, volume {volume.shape}",
            file=sys.stderr,
        )
        build_seconds: dict[str, float] = {}
        rows = [
            measure(name, make, volume, args)
            for name, make in rows_for(args, bundle, plan_dir, build_seconds)
        ]
        on_gpu = args.device == "cuda" and torch.cuda.is_available()
        decoding = decoding_seconds(bundle, volume, "cuda" if on_gpu else "cpu", args.repeats)
    device = torch.cuda.get_device_name() if on_gpu else f"CPU, {args.threads} threads"
    print(
        f"UniCT {args.config}, volume {tuple(volume.shape)}, {args.repeats} timed calls after {args.warmup} warm-up; {device}"
    )
    print(f"weights: {source}; torch {torch.__version__}")
    print(table(rows, build_seconds))
    print(
        "prepare s: construct + ONNX export or TensorRT build when not cached + load; first s: first infer call"
    )
    print(
        f"report decoding alone (PyTorch greedy, {decoding[1]} tokens; included above): median {decoding[0]:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
