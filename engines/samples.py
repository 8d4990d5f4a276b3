"""Sample inputs for the engines: a realistic preprocessed volume, and a random checkpoint.

- :func:`sample_volume`: a synthetic chest-CT phantom through the node's preprocessing
  (INT8 calibration in :mod:`engines.build`, parity tests, benchmarks);
- :func:`write_random_bundle`: a checkpoint folder of a seeded random initialisation, for
  engine tests and for measuring a configuration no one has trained yet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from model.bundle import CARD_FILE, ModelBundle, load_bundle, sha256_of
from model.card import ModelCard, default_labels
from model.config import UniCTConfig, get_config
from model.network import UniCT
from model.phantom import generate
from model.tokenizer import Tokenizer
from model.transforms import preprocess

__all__ = ["sample_volume", "write_random_bundle"]


def sample_volume(config: UniCTConfig, seed: int = 0) -> npt.NDArray[np.float32]:
    """A preprocessed ``(D, H, W)`` volume on ``config``'s model grid.

    A synthetic chest-CT phantom (:func:`model.phantom.generate`, with its inserted
    abnormalities) goes through :func:`model.transforms.preprocess`, the chain the node
    runs, so intensities and geometry are those the engines see in production.
    """
    phantom = generate(seed)
    return preprocess(phantom.hu, phantom.affine_lps, config.preprocess).image


_REPORT_SENTENCES = (
    "No focal consolidation. No pleural effusion. The heart size is normal.",
    "A 12 mm nodule in the right upper lobe. Small left pleural effusion.",
    "Emphysema in both upper lobes; bronchiectasis in the lower lobes.",
    "Atelectasis at the left base. Coronary artery calcification. Hiatal hernia.",
    "Lymphadenopathy in the mediastinum. Pericardial effusion is absent.",
)


def write_random_bundle(
    directory: Path,
    config: UniCTConfig | str = "small",
    *,
    seed: int = 0,
    version: str = "0.0.0+random",
) -> ModelBundle:
    """Write a checkpoint folder of a seeded random initialisation and load it.

    For engine tests and benchmarks only: the outputs mean nothing clinically, but every
    backend must still agree on them.

    Parameters
    ----------
    directory
        Created if needed; receives ``model_card.json``, ``tokenizer.json`` and ``unict.pt``.
    config
        A configuration or its name (``"small"``, ``"full"``).
    seed
        ``torch.manual_seed`` before the initialisation.
    version
        The card's version.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.train(_REPORT_SENTENCES)
    torch.manual_seed(seed)
    model = UniCT(cfg, len(tokenizer))
    card = ModelCard(
        name=f"unict-{cfg.name}-random",
        version=version,
        config=cfg,
        labels=default_labels(),
        training_data=f"none: random initialisation (torch.manual_seed({seed}))",
        intended_use="testing and benchmarking the inference engines only",
    )
    weights = directory / card.checkpoint_file
    torch.save({"model": model.state_dict()}, weights)
    tokenizer.save(directory / card.tokenizer_file)
    dataclasses.replace(card, checkpoint_sha256=sha256_of(weights)).save(directory / CARD_FILE)
    return load_bundle(directory)
