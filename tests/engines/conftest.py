"""Fixtures of the engine tests: one checkpoint, one volume, one ONNX export per session.

The checkpoint is the shipped ``model/checkpoints/small`` when it exists, else a seeded
random initialisation of the small configuration written to a temporary folder
(:func:`engines.samples.write_random_bundle`): every backend must agree on either.
Threads stay at 2: the suite shares its machine with training runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch

from engines.base import InferenceResult
from engines.export import ExportedModel, ensure_onnx
from engines.onnxruntime import OnnxRuntimeEngine
from engines.pytorch import PyTorchEngine
from engines.samples import sample_volume, write_random_bundle
from model.bundle import CARD_FILE, DEFAULT_CHECKPOINT_DIR, ModelBundle, load_bundle

THREADS = 2
#: Phantom case of the parity tests (one with several inserted abnormalities).
VOLUME_SEED = 3


@pytest.fixture(scope="session", autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """The shipped small checkpoint, or a seeded random one when none is shipped yet."""
    if (DEFAULT_CHECKPOINT_DIR / CARD_FILE).is_file():
        return load_bundle(DEFAULT_CHECKPOINT_DIR)
    return write_random_bundle(tmp_path_factory.mktemp("bundle"), "small", seed=0)


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's ONNX export cache."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def exported(bundle: ModelBundle, onnx_dir: Path) -> ExportedModel:
    """The visual path of :func:`bundle`, exported once."""
    return ensure_onnx(bundle, onnx_dir)


@pytest.fixture(scope="session")
def volume(bundle: ModelBundle) -> npt.NDArray[np.float32]:
    """A preprocessed phantom on the model grid."""
    return sample_volume(bundle.card.config, seed=VOLUME_SEED)


@pytest.fixture(scope="session")
def reference(bundle: ModelBundle, volume: npt.NDArray[np.float32]) -> InferenceResult:
    """The PyTorch engine's result on :func:`volume`: what every backend is compared to."""
    return PyTorchEngine(bundle, device="cpu", threads=THREADS).infer(volume)


@pytest.fixture(scope="session")
def ort_engine(bundle: ModelBundle, exported: ExportedModel, onnx_dir: Path) -> OnnxRuntimeEngine:
    """A loaded ONNX Runtime engine on the CPU, on the session's export."""
    engine = OnnxRuntimeEngine(
        bundle, onnx_dir, providers=["CPUExecutionProvider"], threads=THREADS
    )
    engine.load()
    return engine
