"""Backend registry: availability reasons, fallback order, and its log."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import engines.tensorrt as trt_module
from engines.base import Availability, EngineOptions
from engines.onnxruntime import OnnxRuntimeEngine
from engines.pytorch import PyTorchEngine
from engines.registry import (
    BACKENDS,
    NoEngineAvailableError,
    availability_report,
    create_engine,
    select_engine,
)
from engines.tensorrt import TensorRTEngine
from model.bundle import ModelBundle

ORDER = ["tensorrt", "onnxruntime", "pytorch"]


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Act as if the tensorrt package were absent (it is, on CPU machines)."""
    real = trt_module._find_spec
    monkeypatch.setattr(
        trt_module, "_find_spec", lambda name: None if name == "tensorrt" else real(name)
    )


def test_backends_are_known_by_name() -> None:
    assert list(BACKENDS) == [*ORDER, "triton"]
    assert BACKENDS["pytorch"] is PyTorchEngine


@pytest.mark.usefixtures("no_tensorrt")
def test_tensorrt_unavailable_says_the_package_is_missing() -> None:
    available = TensorRTEngine.is_available()
    assert not available
    assert "'tensorrt' is not installed" in available.reason


def test_tensorrt_unavailable_says_there_is_no_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_module, "_find_spec", lambda name: SimpleNamespace(name=name))
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    available = TensorRTEngine.is_available()
    assert not available
    assert "no CUDA device" in available.reason


def test_tensorrt_unavailable_on_this_machine_when_it_lacks_tensorrt_or_cuda() -> None:
    if TensorRTEngine.is_available():
        pytest.skip("TensorRT and a CUDA device are present here")
    reason = TensorRTEngine.is_available().reason
    assert "tensorrt" in reason or "CUDA" in reason


@pytest.mark.usefixtures("no_tensorrt")
def test_availability_report_lists_each_backend_with_its_reason() -> None:
    report = dict(availability_report(ORDER))
    assert list(report) == ORDER
    assert report["tensorrt"] == Availability(False, TensorRTEngine.is_available().reason)
    assert report["onnxruntime"] and report["pytorch"]


def test_unknown_backend_names_the_known_ones(bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known engines: tensorrt, onnxruntime, pytorch, triton"):
        availability_report(["onnxruntime", "openvino"])
    with pytest.raises(ValueError, match="'openvino'"):
        select_engine(["pytorch", "openvino"], bundle, EngineOptions(plan_dir=tmp_path))
    with pytest.raises(ValueError, match="no inference engine configured"):
        select_engine([], bundle, EngineOptions(plan_dir=tmp_path))


def test_tensorrt_is_refused_on_the_cpu(bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        create_engine("tensorrt", bundle, EngineOptions(plan_dir=tmp_path, device="cpu"))


@pytest.mark.usefixtures("no_tensorrt", "exported")
def test_select_falls_back_to_onnxruntime_and_logs_why_tensorrt_was_skipped(
    bundle: ModelBundle, onnx_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engines")
    options = EngineOptions(plan_dir=tmp_path, onnx_dir=onnx_dir, device="cpu", threads=2)
    engine = select_engine(ORDER, bundle, options)
    assert isinstance(engine, OnnxRuntimeEngine)
    assert engine.loaded
    assert engine.providers == ["CPUExecutionProvider"]
    skipped = [
        r for r in caplog.records if r.levelno == logging.WARNING and r.name == "engines.registry"
    ]
    assert len(skipped) == 1
    assert "tensorrt skipped" in skipped[0].getMessage()
    assert "'tensorrt' is not installed" in skipped[0].getMessage()


def test_select_skips_a_backend_whose_load_fails(
    bundle: ModelBundle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_load(self: OnnxRuntimeEngine) -> None:
        raise RuntimeError("graph file unreadable")

    monkeypatch.setattr(OnnxRuntimeEngine, "load", broken_load)
    options = EngineOptions(plan_dir=tmp_path, device="cpu", threads=2)
    engine = select_engine(["onnxruntime", "pytorch"], bundle, options)
    assert isinstance(engine, PyTorchEngine)
    assert "onnxruntime skipped: failed to load: RuntimeError: graph file unreadable" in caplog.text


@pytest.mark.usefixtures("no_tensorrt")
def test_no_backend_available_says_why_for_each(bundle: ModelBundle, tmp_path: Path) -> None:
    with pytest.raises(
        NoEngineAvailableError, match="tensorrt: the Python package 'tensorrt' is not installed"
    ):
        select_engine(["tensorrt"], bundle, EngineOptions(plan_dir=tmp_path))
