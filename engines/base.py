"""The engine interface every backend implements, and what inference returns."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from model.prediction import Prediction

if TYPE_CHECKING:
    from model.bundle import ModelBundle

DEVICES = ("auto", "cpu", "cuda")
"""Devices an engine may be asked for (``cuda:N`` too)."""


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, exactly what is missing."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class InferenceResult(Prediction):
    """What one UniCT pass gives for one volume (:class:`~model.inference.Prediction`: the
    probabilities, the segmentation on the model grid, the report and the fusion module's
    task-by-task attention), and which backend gave it.

    Attributes
    ----------
    engine
        Name of the backend that produced it.
    """

    engine: str


@dataclass(frozen=True)
class EngineOptions:
    """The node's inference settings; each backend takes what it needs.

    Attributes
    ----------
    plan_dir
        TensorRT plans (built by ``unict-node build-engine``).
    onnx_dir
        Cache of ONNX exports; default ``plan_dir / "onnx"``.
    device
        ``"auto"`` (GPU when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; for Triton,
        where the report is decoded.
    threads
        CPU threads for the CPU backends; 0 leaves their default.
    precision
        Precision of the TensorRT plan to load.
    """

    plan_dir: Path
    onnx_dir: Path | None = None
    device: str = "auto"
    threads: int = 0
    precision: str = "fp16"

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"unknown device {self.device!r}; choose one of {DEVICES} or cuda:N")

    @property
    def onnx_cache(self) -> Path:
        """Where ONNX exports are kept."""
        return self.onnx_dir or Path(self.plan_dir) / "onnx"


class Engine(abc.ABC):
    """An inference backend for UniCT.

    Subclasses set :attr:`name`, answer :meth:`is_available` without side effects, and
    run the whole model in :meth:`infer` on one preprocessed volume.
    """

    name: str = "abstract"

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> Availability:
        """Whether this backend can run on this machine, with the reason when not."""

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: EngineOptions) -> Engine:
        """Construct (not load) this backend for `bundle` with the node's settings.

        Raises
        ------
        ValueError
            The options do not suit this backend (e.g. TensorRT on the CPU).
        """
        raise NotImplementedError(f"{cls.__name__} is not built from the node's settings")

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights / build or deserialise the engine. Idempotent."""

    @abc.abstractmethod
    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        """Run UniCT on a ``(D, H, W)`` preprocessed volume (see :mod:`model.transforms`)."""

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has succeeded."""
        return getattr(self, "_loaded", False)
