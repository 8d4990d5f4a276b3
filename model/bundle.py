"""A trained model on disk: weights, model card and tokenizer in one directory.

The node ships one such directory (``model/checkpoints/small``), written by
``unict-node train``; :func:`load_bundle` reads it and checks the weights' hash against
the card.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from model.card import ModelCard
from model.network import UniCT
from model.tokenizer import Tokenizer

DEFAULT_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "small"
CARD_FILE = "model_card.json"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelBundle:
    """A loaded checkpoint directory."""

    directory: Path
    card: ModelCard
    tokenizer: Tokenizer
    state_dict: dict[str, torch.Tensor]

    def build(self, device: str | torch.device = "cpu") -> UniCT:
        """A UniCT network with these weights, in eval mode, float32, on ``device``."""
        model = UniCT(self.card.config, len(self.tokenizer))
        model.load_state_dict({k: v.float() for k, v in self.state_dict.items()})
        return model.to(device).eval()


def load_bundle(directory: Path | None = None, *, verify: bool = True) -> ModelBundle:
    """Read a checkpoint directory (default: the bundled ``small`` model).

    Raises
    ------
    FileNotFoundError
        If the card, weights or tokenizer are missing.
    ValueError
        If the weights do not match the card's SHA-256.
    """
    directory = (directory or DEFAULT_CHECKPOINT_DIR).resolve()
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise FileNotFoundError(f"no model card at {card_path}; train one with `unict-node train`")
    card = ModelCard.load(card_path)
    weights = directory / card.checkpoint_file
    if verify and card.checkpoint_sha256 and sha256_of(weights) != card.checkpoint_sha256:
        raise ValueError(f"{weights} does not match the SHA-256 in {card_path}")
    payload = torch.load(weights, map_location="cpu", weights_only=True)
    tokenizer = Tokenizer.load(directory / card.tokenizer_file)
    return ModelBundle(directory, card, tokenizer, payload["model"])
