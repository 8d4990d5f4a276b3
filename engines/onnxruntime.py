"""ONNX Runtime backend: the exported visual path on CPU (or CUDA where present).

The graph comes from :func:`engines.export.ensure_onnx` (exported once per checkpoint);
the report is decoded in PyTorch from the graph's ``memory`` output, by the same
:class:`engines.pytorch.ReportGenerator` the reference engine uses.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engines.base import Availability, Engine, EngineOptions, InferenceResult
from engines.export import INPUT_NAME, OUTPUT_NAMES, ExportedModel, check_volume, ensure_onnx
from engines.pytorch import ReportGenerator
from model.bundle import ModelBundle

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def _find_spec(name: str) -> Any:
    """``importlib.util.find_spec`` (a seam for tests): locates a module without importing it."""
    return importlib.util.find_spec(name)


class OnnxRuntimeEngine(Engine):
    """UniCT's visual path in ONNX Runtime, the report in PyTorch.

    Parameters
    ----------
    bundle
        The loaded checkpoint.
    onnx_dir
        Cache of exported models (``onnx_dir/<sha256>/unict_visual.onnx``).
    providers
        Execution providers in order of preference; None picks CUDA when ONNX Runtime
        has it (``onnxruntime-gpu``), else CPU.
    threads
        Intra-op threads of the session and PyTorch threads for decoding; 0 leaves the
        defaults.
    """

    name = "onnxruntime"

    @classmethod
    def from_options(cls, bundle: ModelBundle, options: EngineOptions) -> OnnxRuntimeEngine:
        device = options.device
        providers = (
            None
            if device == "auto"
            else [CPU_PROVIDER]
            if device == "cpu"
            else [CUDA_PROVIDER, CPU_PROVIDER]
        )
        return cls(bundle, options.onnx_cache, providers=providers, threads=options.threads)

    def __init__(
        self,
        bundle: ModelBundle,
        onnx_dir: Path,
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ) -> None:
        self.bundle = bundle
        self.onnx_dir = Path(onnx_dir)
        self.requested_providers = tuple(providers) if providers is not None else None
        self.threads = threads
        self.exported: ExportedModel | None = None
        self._session: Any = None
        self._report: ReportGenerator | None = None
        self._loaded = False

    @classmethod
    def is_available(cls) -> Availability:
        missing = [name for name in ("onnxruntime", "onnx") if _find_spec(name) is None]
        if missing:
            return Availability(False, f"Python package(s) not installed: {', '.join(missing)}")
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if CPU_PROVIDER not in providers and CUDA_PROVIDER not in providers:
            return Availability(
                False,
                f"onnxruntime has neither {CPU_PROVIDER} nor {CUDA_PROVIDER} (has {providers})",
            )
        return Availability(True)

    @property
    def providers(self) -> list[str]:
        """The providers the session uses (resolved at :meth:`load`)."""
        if self._session is None:
            raise RuntimeError("engine not loaded: call load() first")
        return list(self._session.get_providers())

    def _choose_providers(self, available: Sequence[str]) -> list[str]:
        if self.requested_providers is None:
            return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]
        missing = [p for p in self.requested_providers if p not in available]
        if missing:
            raise RuntimeError(f"onnxruntime lacks provider(s) {missing}; it has {list(available)}")
        return list(self.requested_providers)

    def load(self) -> None:
        if self._loaded:
            return
        import onnxruntime

        providers = self._choose_providers(onnxruntime.get_available_providers())
        self.exported = ensure_onnx(self.bundle, self.onnx_dir)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            torch.set_num_threads(self.threads)
        self._session = onnxruntime.InferenceSession(
            str(self.exported.path), options, providers=providers
        )
        on_gpu = CUDA_PROVIDER in self._session.get_providers() and torch.cuda.is_available()
        self._report = ReportGenerator.from_bundle(self.bundle, "cuda" if on_gpu else "cpu")
        logger.info(
            "onnxruntime session on %s from %s", self._session.get_providers(), self.exported.path
        )
        self._loaded = True

    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        self.load()
        assert self._report is not None
        check_volume(image, self.bundle.card.config.preprocess.size)
        x = np.ascontiguousarray(image, dtype=np.float32)[None]
        outputs = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        probs, seg, attention, memory = (np.asarray(o) for o in outputs)
        tokens, text = self._report.generate(torch.from_numpy(memory), probs[0])
        return InferenceResult(
            probabilities=probs[0].astype(np.float32, copy=False),
            segmentation=seg[0].astype(np.float32, copy=False),
            report_tokens=tokens,
            report_text=text,
            fusion_attention=attention[0].astype(np.float32, copy=False),
            engine=self.name,
        )
