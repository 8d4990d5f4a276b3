"""Parity of ONNX Runtime with the PyTorch reference on one preprocessed phantom.

TensorRT parity (FP16 tolerances) is in ``test_tensorrt.py``: it needs a GPU and a plan build.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from engines.base import InferenceResult
from engines.onnxruntime import OnnxRuntimeEngine
from model.bundle import ModelBundle


@pytest.fixture(scope="module")
def ort_result(ort_engine: OnnxRuntimeEngine, volume: np.ndarray) -> InferenceResult:
    return ort_engine.infer(volume)


def parity(result: InferenceResult, reference: InferenceResult) -> dict[str, float]:
    """The figures the parity criteria are about."""
    return {
        "probability_max_abs_diff": float(
            np.abs(result.probabilities - reference.probabilities).max()
        ),
        "segmentation_max_abs_diff": float(
            np.abs(result.segmentation - reference.segmentation).max()
        ),
        "mask_agreement": float(
            ((result.segmentation > 0.5) == (reference.segmentation > 0.5)).mean()
        ),
        "attention_max_abs_diff": float(
            np.abs(result.fusion_attention - reference.fusion_attention).max()
        ),
    }


def test_onnxruntime_matches_pytorch(
    ort_result: InferenceResult,
    reference: InferenceResult,
    record_property: Callable[[str, object], None],
) -> None:
    figures = parity(ort_result, reference)
    for name, value in figures.items():
        record_property(name, value)
    print(
        f"ONNX Runtime vs PyTorch: {figures}, tokens equal: {ort_result.report_tokens == reference.report_tokens}"
    )
    assert ort_result.engine == "onnxruntime"
    assert ort_result.probabilities.shape == reference.probabilities.shape
    assert ort_result.segmentation.shape == reference.segmentation.shape
    assert figures["probability_max_abs_diff"] <= 1e-4
    assert figures["mask_agreement"] >= 0.999
    assert figures["attention_max_abs_diff"] <= 1e-4
    assert ort_result.report_tokens == reference.report_tokens
    assert ort_result.report_text == reference.report_text
    assert ort_result.probabilities.dtype == ort_result.segmentation.dtype == np.float32


def test_reference_report_is_decoded(reference: InferenceResult, bundle: ModelBundle) -> None:
    assert reference.report_tokens, "the decoder produced no token"
    assert bundle.tokenizer.eos_id not in reference.report_tokens
    assert reference.report_text
