"""Which backends exist, which can run here, and the first usable one in a configured order.

Like pydicom's pixel-data plugins, each backend answers ``is_available()`` with the reason
when not; :func:`availability_report` lists those answers (for ``/readyz`` and the CLI)
and :func:`select_engine` walks the configured order, logging at WARNING why each backend
before the chosen one was skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from engines.base import Availability, Engine
from engines.onnxruntime import CPU_PROVIDER, CUDA_PROVIDER, OnnxRuntimeEngine
from engines.pytorch import PyTorchEngine
from engines.tensorrt import TensorRTEngine
from engines.triton import TritonEngine
from model.bundle import ModelBundle

logger = logging.getLogger(__name__)

#: Backend name -> class, in the default order of preference. Triton comes last: it is a
#: deployment choice (a shared inference server), named explicitly where it is wanted.
BACKENDS: dict[str, type[Engine]] = {
    "tensorrt": TensorRTEngine,
    "onnxruntime": OnnxRuntimeEngine,
    "pytorch": PyTorchEngine,
    "triton": TritonEngine,
}
DEVICES = ("auto", "cpu", "cuda")


class NoEngineAvailableError(RuntimeError):
    """None of the configured backends can run here; the message says why for each."""


def backend_class(name: str) -> type[Engine]:
    """The class of backend ``name``.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown inference engine {name!r}; known engines: {', '.join(BACKENDS)}"
        ) from None


def availability_report(order: Sequence[str] = tuple(BACKENDS)) -> list[tuple[str, Availability]]:
    """``(name, Availability)`` of each backend in ``order``, without loading anything.

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    classes = [(name, backend_class(name)) for name in order]
    return [(name, cls.is_available()) for name, cls in classes]


def create_engine(
    name: str,
    bundle: ModelBundle,
    *,
    plan_dir: Path,
    onnx_dir: Path | None = None,
    device: str = "auto",
    threads: int = 0,
    precision: str = "fp16",
) -> Engine:
    """Construct (not load) backend ``name`` with the node's settings.

    Parameters
    ----------
    name
        ``"tensorrt"``, ``"onnxruntime"``, ``"pytorch"`` or ``"triton"`` (the server is
        ``UNICT_TRITON_URL``: see :mod:`engines.triton`).
    bundle
        The checkpoint.
    plan_dir
        TensorRT plans (built by ``unict-node build-engine``).
    onnx_dir
        Cache of ONNX exports; default ``plan_dir / "onnx"``.
    device
        ``"auto"`` (GPU when present), ``"cpu"`` or ``"cuda"``; for Triton, where the
        report is decoded.
    threads
        CPU threads for the CPU backends; 0 leaves their default.
    precision
        Precision of the TensorRT plan to load.

    Raises
    ------
    ValueError
        For an unknown backend or device, or TensorRT asked to run on the CPU.
    """
    backend_class(name)
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES} or cuda:N")
    if name == "tensorrt":
        if device == "cpu":
            raise ValueError("TensorRT needs a CUDA device, and device is 'cpu'")
        return TensorRTEngine(
            bundle, plan_dir, device="cuda" if device == "auto" else device, precision=precision
        )
    if name == "onnxruntime":
        providers = (
            None
            if device == "auto"
            else [CPU_PROVIDER]
            if device == "cpu"
            else [CUDA_PROVIDER, CPU_PROVIDER]
        )
        return OnnxRuntimeEngine(
            bundle, onnx_dir or Path(plan_dir) / "onnx", providers=providers, threads=threads
        )
    if name == "triton":
        return TritonEngine(bundle, device=device)
    return PyTorchEngine(bundle, device=device, threads=threads)


def select_engine(
    order: Sequence[str],
    bundle: ModelBundle,
    *,
    plan_dir: Path,
    onnx_dir: Path | None = None,
    device: str = "auto",
    threads: int = 0,
    precision: str = "fp16",
) -> Engine:
    """The first backend of ``order`` that is available here and loads, loaded.

    Each backend skipped on the way is logged at WARNING with the reason: its
    :class:`~engines.base.Availability` reason, or the error its ``load()`` raised.
    Parameters are those of :func:`create_engine`.

    Raises
    ------
    ValueError
        If ``order`` is empty or names an unknown backend (checked before anything runs).
    NoEngineAvailableError
        If no backend of ``order`` can run; the message has every reason.
    """
    if not order:
        raise ValueError(f"no inference engine configured; known engines: {', '.join(BACKENDS)}")
    for name in order:
        backend_class(name)
    skipped: list[str] = []
    for name in order:
        available = backend_class(name).is_available()
        if not available:
            reason = available.reason or "not available"
        else:
            try:
                engine = create_engine(
                    name,
                    bundle,
                    plan_dir=plan_dir,
                    onnx_dir=onnx_dir,
                    device=device,
                    threads=threads,
                    precision=precision,
                )
                engine.load()
            # Any failure to load falls through to the next backend; it is logged with its
            # reason here and kept for the final error, never swallowed.
            except Exception as exc:
                reason = f"failed to load: {type(exc).__name__}: {exc}"
            else:
                if skipped:
                    logger.info("using inference engine %s (after skipping %d)", name, len(skipped))
                else:
                    logger.info("using inference engine %s", name)
                return engine
        logger.warning("inference engine %s skipped: %s", name, reason)
        skipped.append(f"{name}: {reason}")
    raise NoEngineAvailableError("no inference engine can run here; " + "; ".join(skipped))
