"""The shipped ``small`` checkpoint: card, weights, tokenizer, and the acceptance evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.pytorch import PyTorchEngine
from model.bundle import DEFAULT_CHECKPOINT_DIR, load_bundle, sha256_of
from model.card import NOT_FOR_CLINICAL_USE
from model.labels import DEFAULT_LABELS
from service.cli import main


def test_card_describes_the_shipped_model() -> None:
    bundle = load_bundle()
    card = bundle.card
    assert card.config.name == "small"
    assert card.clinical_use == NOT_FOR_CLINICAL_USE
    assert "synthetic" in card.training_data.lower()
    assert card.training_command.startswith("unict-node ") and " train " in card.training_command
    assert [lc.abnormality.code for lc in card.labels] == [a.code for a in DEFAULT_LABELS]
    assert all(lc.abnormality.concept.scheme in ("SCT", "DCM") for lc in card.labels)
    assert all(0.0 < t < 1.0 for t in card.thresholds)
    assert all(0.0 < t < 1.0 for t in card.mask_thresholds)
    assert type(card).from_dict(card.to_dict()) == card
    assert card.checkpoint_sha256 == sha256_of(DEFAULT_CHECKPOINT_DIR / card.checkpoint_file)
    raw = json.loads((DEFAULT_CHECKPOINT_DIR / "model_card.json").read_text())
    assert raw["input"]["spacing_mm"] == [4.5, 3.0, 3.0]
    assert raw["input"]["hu_window"] == [-1000.0, 200.0]
    # A few MB in the repository.
    assert (DEFAULT_CHECKPOINT_DIR / card.checkpoint_file).stat().st_size < 8 * 2**20


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    for f in DEFAULT_CHECKPOINT_DIR.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    card = json.loads((tmp_path / "model_card.json").read_text())
    weights = tmp_path / card["checkpoint_file"]
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_bundle(tmp_path)


def test_inference_on_a_generated_case() -> None:
    from model.phantom import generate
    from model.transforms import preprocess

    bundle = load_bundle()
    engine = PyTorchEngine(bundle, device="cpu")
    phantom = generate(31_000_001, "training")
    result = engine.infer(
        preprocess(phantom.hu, phantom.affine_lps, bundle.card.config.preprocess).image
    )
    assert result.probabilities.shape == (10,)
    assert result.segmentation.shape == (10, *bundle.card.config.preprocess.size)
    assert np.allclose(result.fusion_attention.sum(axis=1), 1.0, atol=1e-4)
    assert result.report_text and result.report_text == bundle.tokenizer.decode(
        result.report_tokens
    )


# What the shipped checkpoint (0.3.1) measured on seeds 8,000,000+ (TRAINING.md: macro AUROC
# 0.919, mean Dice 0.510, clinical-efficacy F1 0.830 on 48 cases; the model issue's targets
# are 0.90 / 0.5 / 0.8), less a margin for the smaller sample: these floors catch a
# regression of the shipped model or of the evaluation code.
REGRESSION_FLOORS = {"macro_auroc": 0.88, "dice": 0.45, "ce_f1": 0.75}


@pytest.mark.slow
def test_evaluation_of_the_shipped_checkpoint(tmp_path: Path) -> None:
    """`unict-node evaluate` on 40 unseen cases: every metric present, no regression."""
    out = tmp_path / "eval.json"
    args = ["evaluate", "--seed", "8000000", "--cases", "40", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    metrics = json.loads(out.read_text())
    assert metrics["cases"] == 40
    assert len(metrics["per_class"]) == 10
    assert np.asarray(metrics["fusion_attention"]["mean"]).shape == (3, 3)
    assert metrics["classification"]["macro_auroc"] >= REGRESSION_FLOORS["macro_auroc"]
    assert metrics["segmentation"]["mean_dice_over_present_findings"] >= REGRESSION_FLOORS["dice"]
    assert metrics["report"]["clinical_efficacy_f1_micro"] >= REGRESSION_FLOORS["ce_f1"]
