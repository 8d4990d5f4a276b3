"""ONNX export of the visual path: checker, opset, names, dynamic axes, cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
import pytest
import torch

import engines.export as export_module
from engines.export import (
    DYNAMIC_AXES,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAMES,
    ExportedModel,
    VisualPath,
    cached_export,
    checkpoint_sha256,
    ensure_onnx,
    graph_summary,
)
from engines.onnxruntime import OnnxRuntimeEngine
from engines.samples import write_random_bundle
from model.bundle import ModelBundle
from tests.engines.conftest import THREADS


def test_opset_is_one_onnxruntime_and_tensorrt_10_share() -> None:
    assert OPSET == 18


def test_graph_passes_checker_with_names_and_dynamic_axes(
    exported: ExportedModel, bundle: ModelBundle
) -> None:
    onnx.checker.check_model(str(exported.path), full_check=True)
    cfg = bundle.card.config
    _, h, w = cfg.preprocess.size
    summary = graph_summary(exported.path)
    assert summary["opset"] == OPSET
    assert summary["inputs"] == {INPUT_NAME: ["batch", "slices", h, w]}
    assert list(summary["outputs"]) == list(OUTPUT_NAMES)
    assert summary["outputs"] == {
        "cls_probs": ["batch", cfg.num_labels],
        "seg_probs": ["batch", cfg.num_labels, "slices", h, w],
        "fusion_attention": ["batch", 3, 3],
        "memory": ["batch", "memory_tokens", cfg.d_model],
    }
    for name, axes in DYNAMIC_AXES.items():
        shape = summary["inputs"].get(name) or summary["outputs"][name]
        assert all(isinstance(shape[axis], str) for axis in axes), name
    assert summary["metadata"]["checkpoint_sha256"] == checkpoint_sha256(bundle)
    assert summary["metadata"]["model_version"] == bundle.card.version


@pytest.mark.parametrize(("batch", "slices"), [(1, 72), (2, 48)])
def test_graph_runs_at_other_batch_and_slice_counts(
    exported: ExportedModel,
    bundle: ModelBundle,
    volume: npt.NDArray[np.float32],
    batch: int,
    slices: int,
) -> None:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = onnxruntime.InferenceSession(
        str(exported.path), options, providers=["CPUExecutionProvider"]
    )
    x = np.stack([volume[:slices], volume[-slices:]][:batch])
    probs, seg, attention, memory = session.run(None, {INPUT_NAME: x})
    cfg = bundle.card.config
    assert probs.shape == (batch, cfg.num_labels)
    assert seg.shape == (batch, cfg.num_labels, slices, *cfg.preprocess.size[1:])
    assert attention.shape == (batch, 3, 3)
    assert memory.shape == (batch, 3 + slices // 3, cfg.d_model)
    with torch.no_grad():
        expected = VisualPath(bundle.build("cpu")).eval()(torch.from_numpy(x))
    for got, want in zip((probs, seg, attention, memory), expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_export_is_cached_by_checkpoint_sha256(
    exported: ExportedModel, bundle: ModelBundle, onnx_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert exported.path.parent == onnx_dir / checkpoint_sha256(bundle)
    assert exported.info.checkpoint_sha256 == checkpoint_sha256(bundle)

    def no_second_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again despite a cached export")

    monkeypatch.setattr(export_module, "export_visual_path", no_second_export)
    again = ensure_onnx(bundle, onnx_dir)
    assert again.path == exported.path
    assert again.info == exported.info


def test_other_weights_do_not_reuse_the_export(
    onnx_dir: Path, exported: ExportedModel, tmp_path: Path
) -> None:
    other = write_random_bundle(tmp_path / "other", "small", seed=1)
    assert checkpoint_sha256(other) != exported.info.checkpoint_sha256
    assert cached_export(onnx_dir, other) is None


def test_slice_count_must_be_a_multiple_of_three(
    ort_engine: OnnxRuntimeEngine, volume: npt.NDArray[np.float32]
) -> None:
    with pytest.raises(ValueError, match="multiple of 3"):
        ort_engine.infer(volume[:70])
    with pytest.raises(ValueError, match="in-plane size"):
        ort_engine.infer(volume[:, :64])
