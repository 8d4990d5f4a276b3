"""``unict-node build-engine``: export to ONNX and build a TensorRT plan, offline.

The integrator registers the command with :func:`add_build_engine_arguments` and
:func:`run_build_engine`. The build is written against TensorRT 10's Python API:

- ``trt.Builder`` / ``create_network(0)`` (explicit batch is the only mode in TensorRT 10;
  the network is *weakly* typed so that precision is chosen by builder flags on the FP32
  graph, with normalisation layers pinned to FP32 in FP16/INT8 builds);
- ``trt.OnnxParser`` on the cached export of :func:`engines.export.ensure_onnx`;
- ``IBuilderConfig`` with FP16, FP32 (TF32 off) or INT8 (``IInt8EntropyCalibrator2`` fed
  with preprocessed phantom volumes, FP16 as fallback), one optimisation profile over
  batch and slice count, a timing cache file per TensorRT version and GPU, and an
  ``IProgressMonitor`` for a progress display (a heartbeat where the installed TensorRT
  has none);
- ``build_serialized_network`` to a plan named and described by its
  :class:`~engines.tensorrt.PlanKey` (see :mod:`engines.tensorrt`).

``--export-only`` runs the ONNX export alone and works on any machine.
``--triton-repo DIR`` also writes the plan (or, with ``--export-only``, the ONNX graph)
as a Triton model repository entry (:mod:`engines.triton_repository`).

INT8 calibration volumes come from :func:`engines.samples.sample_volume`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import torch

from engines.export import INPUT_NAME, OPSET, ensure_onnx, graph_summary
from engines.samples import sample_volume
from engines.tensorrt import (
    PRECISIONS,
    PlanError,
    PlanKey,
    PlanMetadata,
    expected_plan_key,
    find_plan,
    gpu_identity,
    import_tensorrt,
    make_trt_logger,
    tensorrt_availability,
)
from engines.triton_repository import write_onnx_entry, write_plan_entry
from model.bundle import ModelBundle, load_bundle
from model.config import UniCTConfig

logger = logging.getLogger(__name__)

DEFAULT_PLAN_DIR = Path("var/plans")
GIB = 1 << 30

Shape = tuple[int, int, int, int]


# --------------------------------------------------------------------------- progress


class ProgressDisplay:
    """Text display of TensorRT's build phases, one indented line per event.

    The methods mirror ``trt.IProgressMonitor`` (``phase_start``, ``step_complete``,
    ``phase_finish``), which delegates to them; step lines are rate-limited per phase.
    TensorRT may call from several threads, hence the lock.

    Parameters
    ----------
    stream
        Where to write (default ``sys.stderr``).
    interval
        Least seconds between two step lines of the same phase.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[int, int, float]] = {}  # name -> (depth, steps, last print)
        self.started = time.perf_counter()

    def _write(self, depth: int, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        self.stream.write(f"[{elapsed:7.1f} s] {'  ' * depth}{text}\n")
        self.stream.flush()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            depth = self._phases[parent_phase][0] + 1 if parent_phase in self._phases else 0
            self._phases[phase_name] = (depth, num_steps, time.perf_counter())
            self._write(depth, f"{phase_name} ({num_steps} steps)")

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            depth, steps, last = self._phases.get(phase_name, (0, 0, 0.0))
            now = time.perf_counter()
            if now - last >= self.interval or step + 1 == steps:
                self._phases[phase_name] = (depth, steps, now)
                self._write(depth + 1, f"{phase_name}: {step + 1}/{steps}")
        return True  # False would cancel the build

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            depth, _, _ = self._phases.pop(phase_name, (0, 0, 0.0))
            self._write(depth, f"{phase_name} done")


def make_progress_monitor(trt: Any, display: ProgressDisplay) -> Any | None:
    """A ``trt.IProgressMonitor`` forwarding to ``display``; None if TensorRT has none."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            display.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return display.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            display.phase_finish(phase_name)

    return _Monitor()


@contextmanager
def heartbeat(stream: TextIO, every: float = 15.0) -> Iterator[None]:
    """Print the elapsed time every ``every`` seconds while the block runs (no monitor)."""
    done = threading.Event()
    started = time.perf_counter()

    def beat() -> None:
        while not done.wait(every):
            stream.write(f"building TensorRT plan... {time.perf_counter() - started:.0f} s\n")
            stream.flush()

    thread = threading.Thread(target=beat, name="trt-build-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildOptions:
    """How to build a plan.

    Attributes
    ----------
    precision
        ``"fp16"`` (default), ``"fp32"`` or ``"int8"``.
    min_batch, opt_batch, max_batch
        Optimisation profile of the batch axis.
    min_slices, opt_slices, max_slices
        Optimisation profile of the slice axis (multiples of 3); None takes the model
        card's slice count, which is what preprocessing always produces.
    workspace_gb
        Builder workspace limit.
    timing_cache
        Timing cache file; None puts one per TensorRT version and GPU in the plan folder.
    calibration_volumes
        Phantom volumes fed to the INT8 calibrator.
    force
        Rebuild even if a matching plan exists.
    """

    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    min_slices: int | None = None
    opt_slices: int | None = None
    max_slices: int | None = None
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    calibration_volumes: int = 8
    force: bool = False

    def profile(self, config: UniCTConfig) -> tuple[Shape, Shape, Shape]:
        """``(min, opt, max)`` shapes of the ``volume`` input.

        Raises
        ------
        ValueError
            If a slice count is not a multiple of 3 or the ranges are not ordered.
        """
        d, h, w = config.preprocess.size
        slices = (self.min_slices or d, self.opt_slices or d, self.max_slices or d)
        batches = (self.min_batch, self.opt_batch, self.max_batch)
        if any(s < 3 or s % 3 for s in slices):
            raise ValueError(
                f"slice counts {slices} must be positive multiples of 3 (slice triplets)"
            )
        if not (slices[0] <= slices[1] <= slices[2]) or not (
            1 <= batches[0] <= batches[1] <= batches[2]
        ):
            raise ValueError(
                f"profile must satisfy min <= opt <= max: batch {batches}, slices {slices}"
            )
        lo, opt, hi = ((b, s, h, w) for b, s in zip(batches, slices, strict=True))
        return lo, opt, hi


@dataclass(frozen=True)
class BuildResult:
    """A plan on disk and how it came to be."""

    path: Path
    metadata: PlanMetadata
    reused: bool


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _make_calibrator(
    trt: Any, volumes: Sequence[npt.NDArray[np.float32]], cache: Path, device: torch.device
) -> Any:
    """An ``IInt8EntropyCalibrator2`` over preprocessed volumes (batch 1), cached in ``cache``."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._batch: torch.Tensor | None = None  # kept alive while TensorRT reads it

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(volumes):
                return None
            self._batch = torch.from_numpy(np.ascontiguousarray(volumes[self._next]))[None].to(
                device
            )
            self._next += 1
            logger.info("INT8 calibration volume %d/%d", self._next, len(volumes))
            return [int(self._batch.data_ptr())] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            _write_atomically(cache, bytes(data))

    return _Calibrator()


def _pin_normalization_fp32(trt: Any, network: Any) -> int:
    """Keep LayerNorm in FP32 in a reduced-precision build (its variance overflows FP16)."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    return pinned


def timing_cache_path(plan_dir: Path, key: PlanKey) -> Path:
    """Default timing cache: one per TensorRT version and GPU (timings are only valid there)."""
    return Path(plan_dir) / f"timing-{key.platform_stem}.cache"


def build_plan(
    bundle: ModelBundle,
    plan_dir: Path,
    *,
    onnx_dir: Path | None = None,
    options: BuildOptions | None = None,
    device: str = "cuda",
    progress: TextIO | None = None,
) -> BuildResult:
    """Export ``bundle`` (once) and build its TensorRT plan into ``plan_dir``.

    Parameters
    ----------
    bundle
        The checkpoint.
    plan_dir
        Where plans, sidecars and the timing cache are kept (created if needed).
    onnx_dir
        Cache of ONNX exports; default ``plan_dir / "onnx"``.
    options
        Precision, profile, workspace...; default :class:`BuildOptions`.
    device
        The CUDA device to build for.
    progress
        Stream for the progress display; None for ``sys.stderr``.

    Returns
    -------
    BuildResult
        The plan and its metadata; ``reused`` when a matching plan was already there.

    Raises
    ------
    PlanError
        If TensorRT is missing, the ONNX graph does not parse, or the build fails.
    """
    options = options or BuildOptions()
    if options.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {options.precision!r}; choose one of {PRECISIONS}")
    available = tensorrt_availability()
    if not available:
        raise PlanError(available.reason)
    trt = import_tensorrt()
    plan_dir = Path(plan_dir)
    plan_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.device(device)
    cfg = bundle.card.config
    lo, opt, hi = options.profile(cfg)
    key = expected_plan_key(
        bundle, options.precision, tensorrt_version=trt.__version__, gpu=gpu_identity(cuda)
    )
    path = key.plan_path(plan_dir)
    if path.is_file() and not options.force:
        found, metadata = find_plan(plan_dir, key)
        logger.info("plan %s is up to date (use --force to rebuild)", found.name)
        return BuildResult(found, metadata, reused=True)

    exported = ensure_onnx(bundle, Path(onnx_dir) if onnx_dir else plan_dir / "onnx")
    started = time.perf_counter()
    trt_logger = make_trt_logger(trt)
    builder = trt.Builder(trt_logger)
    # Weakly typed on purpose: STRONGLY_TYPED would forbid the FP16/INT8 builder flags.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(exported.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PlanError(f"TensorRT could not parse {exported.path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * GIB))
    if options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 means FP32: the parity reference
    else:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in late 10.x
            logger.warning("%s has no fast FP16; the plan may be slow", key.gpu_name)
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_normalization_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        logger.info("%d normalisation layers kept in FP32", pinned)

    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)

    calibrator = None
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibration_shape = (1, *cfg.preprocess.size)
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(
            INPUT_NAME, calibration_shape, calibration_shape, calibration_shape
        )
        config.set_calibration_profile(calibration_profile)
        volumes = [sample_volume(cfg, seed=1000 + i) for i in range(options.calibration_volumes)]
        calibrator = _make_calibrator(trt, volumes, plan_dir / f"{key.stem}.calib", cuda)
        config.int8_calibrator = calibrator

    cache_file = options.timing_cache or timing_cache_path(plan_dir, key)
    timing_cache = config.create_timing_cache(
        cache_file.read_bytes() if cache_file.is_file() else b""
    )
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    stream = progress if progress is not None else sys.stderr
    monitor = make_progress_monitor(trt, ProgressDisplay(stream))
    if monitor is not None:
        config.progress_monitor = monitor
        serialized = builder.build_serialized_network(network, config)
    else:
        with heartbeat(stream):
            serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PlanError("TensorRT failed to build the plan (see the TensorRT log above)")
    data = memoryview(serialized)
    seconds = time.perf_counter() - started
    _write_atomically(path, data)
    _write_atomically(cache_file, memoryview(config.get_timing_cache().serialize()))
    metadata = PlanMetadata(
        key=key,
        plan_sha256=hashlib.sha256(data).hexdigest(),
        opset=OPSET,
        profile={"min": list(lo), "opt": list(opt), "max": list(hi)},
        build_seconds=round(seconds, 1),
        built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    metadata.save(path)
    del calibrator
    logger.info("built %s (%.1f MB) in %.0f s", path.name, len(data) / 1e6, seconds)
    return BuildResult(path, metadata, reused=False)


# --------------------------------------------------------------------------- CLI


def add_build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``build-engine`` options to ``parser``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (default: the bundled small model)",
    )
    parser.add_argument(
        "--plan-dir",
        type=Path,
        default=DEFAULT_PLAN_DIR,
        help=f"where plans are kept (default {DEFAULT_PLAN_DIR})",
    )
    parser.add_argument(
        "--onnx-dir", type=Path, default=None, help="cache of ONNX exports (default PLAN_DIR/onnx)"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp16", help="plan precision (default fp16)"
    )
    parser.add_argument("--device", default="cuda", help="CUDA device to build for (default cuda)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=1)
    parser.add_argument("--max-batch", type=int, default=1)
    parser.add_argument(
        "--min-slices",
        type=int,
        default=None,
        help="profile minimum slice count (multiple of 3; default: the card's)",
    )
    parser.add_argument(
        "--opt-slices",
        type=int,
        default=None,
        help="slice count the kernels are tuned for (default: the card's)",
    )
    parser.add_argument(
        "--max-slices",
        type=int,
        default=None,
        help="profile maximum slice count (default: the card's)",
    )
    parser.add_argument(
        "--workspace-gb", type=float, default=4.0, help="builder workspace limit (default 4 GiB)"
    )
    parser.add_argument(
        "--timing-cache",
        type=Path,
        default=None,
        help="timing cache file (default: one per TensorRT+GPU in PLAN_DIR)",
    )
    parser.add_argument(
        "--calibration-volumes",
        type=int,
        default=8,
        help="phantom volumes for INT8 calibration (default 8)",
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if a matching plan exists"
    )
    parser.add_argument(
        "--export-only",
        action="store_true",
        help="only export the ONNX graph (no TensorRT or GPU needed)",
    )
    parser.add_argument(
        "--list",
        action="store_true",
        help="list the inference backends and whether each can run here",
    )
    parser.add_argument(
        "--triton-repo",
        type=Path,
        default=None,
        help="also write a Triton model repository entry into this folder: the plan "
        "(tensorrt_plan), or with --export-only the ONNX graph (onnxruntime_onnx)",
    )
    parser.add_argument(
        "--triton-model",
        default=None,
        help="model name in the Triton repository (default: the card's name, e.g. unict-small)",
    )
    parser.add_argument(
        "--triton-instances",
        type=int,
        default=1,
        help="Triton model instances per GPU (default 1)",
    )


def run_build_engine(args: argparse.Namespace) -> int:
    """Run ``build-engine``; returns the process exit code.

    0: plan built (or up to date), graph exported, or listing printed; 1: the build
    failed; 2: TensorRT cannot run here (the reason is printed).
    """
    if args.list:
        from engines.registry import availability_report

        for name, available in availability_report():
            print(f"{name:12s} {'available' if available else 'unavailable: ' + available.reason}")
        return 0
    bundle = load_bundle(args.checkpoint)
    onnx_dir = args.onnx_dir or args.plan_dir / "onnx"
    if args.export_only:
        exported = ensure_onnx(bundle, onnx_dir)
        summary = graph_summary(exported.path)
        print(f"ONNX graph: {exported.path} (opset {summary['opset']})")
        for kind in ("inputs", "outputs"):
            for name, shape in summary[kind].items():
                print(f"  {kind[:-1]:6s} {name:17s} {shape}")
        if args.triton_repo is not None:
            entry = write_onnx_entry(
                args.triton_repo,
                bundle,
                exported,
                name=args.triton_model,
                max_batch_size=args.max_batch,
                instance_count=args.triton_instances,
            )
            print(f"Triton model: {entry.directory} ({entry.config.platform})")
        return 0
    available = tensorrt_availability()
    if not available:
        print(f"build-engine: TensorRT cannot run here: {available.reason}", file=sys.stderr)
        print(
            "build-engine: --export-only exports the ONNX graph without TensorRT", file=sys.stderr
        )
        return 2
    options = BuildOptions(
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        min_slices=args.min_slices,
        opt_slices=args.opt_slices,
        max_slices=args.max_slices,
        workspace_gb=args.workspace_gb,
        timing_cache=args.timing_cache,
        calibration_volumes=args.calibration_volumes,
        force=args.force,
    )
    try:
        result = build_plan(
            bundle, args.plan_dir, onnx_dir=onnx_dir, options=options, device=args.device
        )
    except (PlanError, ValueError) as exc:
        print(f"build-engine: {exc}", file=sys.stderr)
        return 1
    meta = result.metadata
    state = "up to date" if result.reused else f"built in {meta.build_seconds:.0f} s"
    print(f"{result.path} ({state})")
    print(
        f"  model     {meta.key.model_name} {meta.key.model_version} (sha256 {meta.key.checkpoint_sha256[:12]})"
    )
    print(
        f"  TensorRT  {meta.key.tensorrt_version} on {meta.key.gpu_name} (sm {meta.key.compute_capability})"
    )
    print(
        f"  precision {meta.key.precision}; profile {meta.profile['min']} .. {meta.profile['max']}"
    )
    if args.triton_repo is not None:
        entry = write_plan_entry(
            args.triton_repo,
            bundle,
            result.path,
            meta,
            name=args.triton_model,
            instance_count=args.triton_instances,
        )
        print(f"Triton model: {entry.directory} ({entry.config.platform})")
    return 0
