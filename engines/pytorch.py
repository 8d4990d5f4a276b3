"""PyTorch eager backend: the reference every other backend is compared to.

It serves :class:`model.inference.Predictor` (what ``unict-node evaluate`` measures too).
:class:`~model.inference.ReportGenerator`, the one greedy report decoder every backend
runs on the visual memory it computed, is re-exported here for the other backends.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engines.base import Availability, Engine, EngineOptions, InferenceResult
from model.bundle import ModelBundle
from model.inference import Predictor, ReportGenerator, decoded_ids, resolve_device
from model.network import UniCT

__all__ = ["PyTorchEngine", "ReportGenerator", "decoded_ids", "resolve_device"]


class PyTorchEngine(Engine):
    """UniCT in PyTorch eager mode on CPU or CUDA: :class:`model.inference.Predictor`,
    whose parameters these are, behind the engine interface."""

    name = "pytorch"

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: EngineOptions) -> PyTorchEngine:
        return cls(bundle, device=options.device, threads=options.threads)

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        half: bool = False,
        compile: bool = False,
        threads: int = 0,
    ) -> None:
        self.bundle = bundle
        self.predictor = Predictor(
            bundle, device=device, half=half, compile=compile, threads=threads
        )
        self.device = self.predictor.device
        self.half = self.predictor.half
        self.compile = compile
        self.threads = threads
        self._loaded = False

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(True)

    def load(self) -> None:
        self.predictor.load()
        self._loaded = True

    @property
    def model(self) -> UniCT:
        """The loaded network."""
        return self.predictor.model

    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        self.load()
        out = self.predictor.predict(image)
        return InferenceResult(
            probabilities=out.probabilities,
            segmentation=out.segmentation,
            report_tokens=out.report_tokens,
            report_text=out.report_text,
            fusion_attention=out.fusion_attention,
            engine=self.name,
        )
