"""TensorRT: plan identity checks (no TensorRT needed), the build command, and on a GPU
the build, parity within FP16 tolerance and the refusal of foreign plans."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import engines.build as build_module
from engines.base import Availability, InferenceResult
from engines.build import (
    BuildOptions,
    BuildResult,
    ProgressDisplay,
    add_build_engine_arguments,
    build_plan,
    run_build_engine,
    timing_cache_path,
)
from engines.export import ExportedModel, checkpoint_sha256
from engines.tensorrt import (
    PlanKey,
    PlanMetadata,
    PlanMismatchError,
    PlanNotFoundError,
    TensorRTEngine,
    check_plan_metadata,
    find_plan,
    plan_mismatches,
    sidecar_path,
)
from model.bundle import ModelBundle

KEY = PlanKey(
    model_name="unict-small",
    model_version="1.0.0",
    checkpoint_sha256="ab" * 32,
    tensorrt_version="10.3.0",
    gpu_name="NVIDIA A100-SXM4-80GB",
    compute_capability="8.0",
    precision="fp16",
)

needs_tensorrt = pytest.mark.skipif(
    not TensorRTEngine.is_available(), reason=TensorRTEngine.is_available().reason
)


def write_plan(
    plan_dir: Path, built_for: PlanKey, *, name_from: PlanKey | None = None, data: bytes = b"plan"
) -> Path:
    """A fake plan file named after ``name_from`` with a sidecar saying ``built_for``."""
    plan_dir.mkdir(parents=True, exist_ok=True)
    path = (name_from or built_for).plan_path(plan_dir)
    path.write_bytes(data)
    PlanMetadata(
        key=built_for,
        plan_sha256=hashlib.sha256(data).hexdigest(),
        opset=18,
        profile={"min": [1, 72, 128, 128], "opt": [1, 72, 128, 128], "max": [1, 72, 128, 128]},
        build_seconds=12.0,
        built_at="2025-01-01T00:00:00+00:00",
    ).save(path)
    return path


# --------------------------------------------------------------------------- identity


def test_plan_name_carries_model_tensorrt_gpu_and_precision() -> None:
    name = KEY.plan_path(Path("plans")).name
    assert name == "unict-small-1.0.0-abababababab-fp16-trt10.3.0-nvidia-a100-sxm4-80gb-sm80.plan"
    assert sidecar_path(KEY.plan_path(Path("plans"))).name == name.replace(".plan", ".json")


def test_sidecar_round_trips_through_json(tmp_path: Path) -> None:
    path = write_plan(tmp_path, KEY)
    text = sidecar_path(path).read_text()
    assert json.loads(text)["key"]["tensorrt_version"] == "10.3.0"
    assert PlanMetadata.from_json(text).key == KEY
    with pytest.raises(ValueError, match="not a UniCT plan sidecar"):
        PlanMetadata.from_json('{"key": {"model_name": "x"}}')


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("model_version", "1.1.0", "built for model unict-small 1.0.0, this is unict-small 1.1.0"),
        (
            "checkpoint_sha256",
            "cd" * 32,
            "built from checkpoint sha256 abababababab, this checkpoint is cdcdcdcdcdcd",
        ),
        ("tensorrt_version", "10.5.0", "built with TensorRT 10.3.0, this is TensorRT 10.5.0"),
        (
            "gpu_name",
            "NVIDIA H100 80GB HBM3",
            "built for GPU NVIDIA A100-SXM4-80GB (compute capability 8.0)",
        ),
        ("compute_capability", "9.0", "this GPU is NVIDIA A100-SXM4-80GB (compute capability 9.0)"),
        ("precision", "fp32", "built in fp16, fp32 was asked for"),
    ],
)
def test_each_identity_field_is_checked(
    field: str, value: str, reason: str, tmp_path: Path
) -> None:
    expected = dataclasses.replace(KEY, **{field: value})
    assert any(reason in r for r in plan_mismatches(expected, KEY))
    metadata = PlanMetadata.from_json(sidecar_path(write_plan(tmp_path, KEY)).read_text())
    with pytest.raises(PlanMismatchError, match="refusing TensorRT plan"):
        check_plan_metadata(expected, metadata)
    check_plan_metadata(KEY, metadata)  # its own key passes


def test_find_plan_returns_the_matching_plan(tmp_path: Path) -> None:
    path = write_plan(tmp_path, KEY)
    write_plan(tmp_path, dataclasses.replace(KEY, tensorrt_version="10.0.1"))
    found, metadata = find_plan(tmp_path, KEY)
    assert found == path
    assert metadata.key == KEY


def test_plan_for_another_tensorrt_or_gpu_is_refused_with_the_reason(tmp_path: Path) -> None:
    write_plan(tmp_path, KEY)
    with pytest.raises(
        PlanMismatchError, match=re.escape("built with TensorRT 10.3.0, this is TensorRT 10.5.0")
    ):
        find_plan(tmp_path, dataclasses.replace(KEY, tensorrt_version="10.5.0"))
    h100 = dataclasses.replace(KEY, gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(
        PlanMismatchError,
        match=re.escape("this GPU is NVIDIA H100 80GB HBM3 (compute capability 9.0)"),
    ):
        find_plan(tmp_path, h100)
    with pytest.raises(PlanMismatchError, match=re.escape("this is unict-small 2.0.0")):
        find_plan(tmp_path, dataclasses.replace(KEY, model_version="2.0.0"))


def test_a_renamed_plan_is_judged_by_its_sidecar(tmp_path: Path) -> None:
    here = dataclasses.replace(KEY, tensorrt_version="10.5.0")
    write_plan(tmp_path, built_for=KEY, name_from=here)
    with pytest.raises(PlanMismatchError, match=re.escape("built with TensorRT 10.3.0")):
        find_plan(tmp_path, here)


def test_a_plan_without_sidecar_is_refused(tmp_path: Path) -> None:
    path = write_plan(tmp_path, KEY)
    sidecar_path(path).unlink()
    with pytest.raises(PlanMismatchError, match="no sidecar"):
        find_plan(tmp_path, KEY)


def test_no_plan_at_all_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(PlanNotFoundError, match="unict-node build-engine"):
        find_plan(tmp_path / "empty", KEY)


def test_timing_cache_is_per_tensorrt_and_gpu(tmp_path: Path) -> None:
    assert (
        timing_cache_path(tmp_path, KEY).name == "timing-trt10.3.0-nvidia-a100-sxm4-80gb-sm80.cache"
    )
    assert timing_cache_path(tmp_path, KEY) == timing_cache_path(
        tmp_path, dataclasses.replace(KEY, precision="int8")
    )


def test_module_import_does_not_import_tensorrt() -> None:
    code = "import sys, engines.tensorrt, engines.build, engines.registry; print('tensorrt' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- build options and CLI


def test_profile_defaults_to_the_cards_geometry(bundle: ModelBundle) -> None:
    d, h, w = bundle.card.config.preprocess.size
    assert BuildOptions().profile(bundle.card.config) == ((1, d, h, w),) * 3
    lo, opt, hi = BuildOptions(max_batch=2, min_slices=48).profile(bundle.card.config)
    assert (lo, opt, hi) == ((1, 48, h, w), (1, d, h, w), (2, d, h, w))
    with pytest.raises(ValueError, match="multiples of 3"):
        BuildOptions(min_slices=50).profile(bundle.card.config)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BuildOptions(opt_batch=4, max_batch=2).profile(bundle.card.config)


def test_progress_display_prints_phases_and_steps() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, interval=0.0)
    display.phase_start("Building engine", None, 2)
    display.phase_start("Tactic selection", "Building engine", 3)
    assert display.step_complete("Tactic selection", 0) is True
    display.phase_finish("Tactic selection")
    display.phase_finish("Building engine")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] Building engine (2 steps)")
    assert lines[1].endswith("]   Tactic selection (3 steps)")
    assert lines[2].endswith("]     Tactic selection: 1/3")
    assert lines[-1].endswith("] Building engine done")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build-engine")
    add_build_engine_arguments(parser)
    return parser.parse_args(argv)


def test_build_engine_without_tensorrt_says_why(
    bundle: ModelBundle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        build_module,
        "tensorrt_availability",
        lambda: Availability(False, "no CUDA device is visible"),
    )
    code = run_build_engine(
        parse(["--checkpoint", str(bundle.directory), "--plan-dir", str(tmp_path)])
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "TensorRT cannot run here: no CUDA device is visible" in err
    assert "--export-only" in err


@pytest.mark.usefixtures("exported")
def test_build_engine_export_only_uses_the_cache(
    bundle: ModelBundle, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--checkpoint",
        str(bundle.directory),
        "--plan-dir",
        str(tmp_path),
        "--onnx-dir",
        str(onnx_dir),
        "--export-only",
    ]
    assert run_build_engine(parse(argv)) == 0
    out = capsys.readouterr().out
    assert f"{checkpoint_sha256(bundle)}/unict_visual.onnx (opset 18)" in out
    assert "volume" in out and "seg_probs" in out


def test_build_engine_lists_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_build_engine(parse(["--list"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["tensorrt", "onnxruntime", "pytorch", "triton"]


# --------------------------------------------------------------------------- on a GPU with TensorRT


@pytest.fixture(scope="module")
def fp16_plan(
    bundle: ModelBundle,
    exported: ExportedModel,
    onnx_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BuildResult]:
    plan_dir = tmp_path_factory.mktemp("plans")
    yield build_plan(
        bundle,
        plan_dir,
        onnx_dir=onnx_dir,
        options=BuildOptions(precision="fp16", min_slices=48),
        progress=io.StringIO(),
    )
    shutil.rmtree(plan_dir, ignore_errors=True)


@pytest.mark.gpu
@pytest.mark.slow
@needs_tensorrt
def test_tensorrt_fp16_matches_pytorch(
    fp16_plan: BuildResult,
    bundle: ModelBundle,
    volume: npt.NDArray[np.float32],
    reference: InferenceResult,
) -> None:
    assert not fp16_plan.reused
    assert fp16_plan.metadata.key.checkpoint_sha256 == checkpoint_sha256(bundle)
    engine = TensorRTEngine(bundle, fp16_plan.path.parent, precision="fp16")
    result = engine.infer(volume)
    assert result.engine == "tensorrt"
    probs = float(np.abs(result.probabilities - reference.probabilities).max())
    masks = float(((result.segmentation > 0.5) == (reference.segmentation > 0.5)).mean())
    print(
        f"TensorRT FP16 vs PyTorch: probabilities max abs diff {probs:.2e}, mask agreement {masks:.5f}"
    )
    assert probs <= 1e-2
    assert masks >= 0.99
    assert engine.infer(volume[:48]).segmentation.shape[1] == 48  # the profile's slice range


@pytest.mark.gpu
@pytest.mark.slow
@needs_tensorrt
def test_tensorrt_rebuild_is_skipped_when_the_plan_is_current(
    fp16_plan: BuildResult, bundle: ModelBundle, onnx_dir: Path
) -> None:
    again = build_plan(
        bundle,
        fp16_plan.path.parent,
        onnx_dir=onnx_dir,
        options=BuildOptions(precision="fp16", min_slices=48),
    )
    assert again.reused and again.path == fp16_plan.path


@pytest.mark.gpu
@pytest.mark.slow
@needs_tensorrt
def test_tensorrt_refuses_a_plan_built_elsewhere(
    fp16_plan: BuildResult, bundle: ModelBundle, tmp_path: Path
) -> None:
    engine = TensorRTEngine(bundle, tmp_path, precision="fp16")
    here = engine.expected_key()
    copy = here.plan_path(tmp_path)
    shutil.copy(fp16_plan.path, copy)
    metadata = dataclasses.replace(
        fp16_plan.metadata, key=dataclasses.replace(here, tensorrt_version="9.9.9")
    )
    metadata.save(copy)
    with pytest.raises(
        PlanMismatchError,
        match=re.escape(f"built with TensorRT 9.9.9, this is TensorRT {here.tensorrt_version}"),
    ):
        engine.load()
    dataclasses.replace(fp16_plan.metadata, key=here, plan_sha256="0" * 64).save(copy)
    with pytest.raises(PlanMismatchError, match="does not match the SHA-256"):
        TensorRTEngine(bundle, tmp_path, precision="fp16").load()
