"""Which backends exist, which can run here, and the first usable one in a configured order.

Like pydicom's pixel-data plugins, each backend answers ``is_available()`` with the reason
when not; :func:`availability_report` lists those answers (for ``/readyz`` and the CLI)
and :func:`select_engine` walks the configured order, logging at WARNING why each backend
before the chosen one was skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engines.base import Availability, Engine, EngineOptions
from engines.onnxruntime import OnnxRuntimeEngine
from engines.pytorch import PyTorchEngine
from engines.tensorrt import TensorRTEngine
from engines.triton import TritonEngine
from model.bundle import ModelBundle

logger = logging.getLogger(__name__)

#: The registry: backend name -> class (each builds itself from
#: :class:`~engines.base.EngineOptions`), in the default order of preference. Triton comes last: it is a
#: deployment choice (a shared inference server), named explicitly where it is wanted.
BACKENDS: dict[str, type[Engine]] = {
    "tensorrt": TensorRTEngine,
    "onnxruntime": OnnxRuntimeEngine,
    "pytorch": PyTorchEngine,
    "triton": TritonEngine,
}


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


def create_engine(name: str, bundle: ModelBundle, options: EngineOptions) -> Engine:
    """Construct (not load) backend ``name`` with the node's settings.

    Parameters
    ----------
    name
        ``"tensorrt"``, ``"onnxruntime"``, ``"pytorch"`` or ``"triton"`` (the server is
        ``UNICT_TRITON_URL``: see :mod:`engines.triton`).
    bundle
        The checkpoint.
    options
        Plan and ONNX folders, device, CPU threads, TensorRT precision.

    Raises
    ------
    ValueError
        For an unknown backend, or options that do not suit it (TensorRT on the CPU).
    """
    return backend_class(name).from_options(bundle, options)


def select_engine(order: Sequence[str], bundle: ModelBundle, options: EngineOptions) -> Engine:
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
                engine = create_engine(name, bundle, options)
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
