"""Training: losses, metrics, threshold tuning and a short overfit run whose loss falls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.config import SMALL, UniCTConfig
from model.network import UniCT
from model.tokenizer import Tokenizer
from model.training.losses import LossWeights, multitask_loss, soft_dice_loss
from model.training.metrics import auroc, average_precision, corpus_bleu, dice, f1_score, rouge_l
from model.training.train import tune_thresholds


def tiny_config() -> UniCTConfig:
    pre = dataclasses.replace(SMALL.preprocess, size=(12, 64, 64))
    return dataclasses.replace(
        SMALL, preprocess=pre, resnet_widths=(8, 16, 32, 64), d_model=64, heads=4
    )


def toy_batch(tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Two volumes: one with a bright cube (finding 8 present), one empty."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 12, 64, 64, generator=g) * 0.05 - 0.3
    masks = torch.zeros(2, 10, 12, 64, 64)
    masks[0, 8, 3:9, 20:36, 24:40] = 1
    image[0][masks[0, 8] > 0] = 0.4
    present = masks.flatten(2).amax(-1)
    reports = ["A solid nodule in the right lower lobe.", "No abnormalities detected."]
    tokens = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(reports):
        ids = tokenizer.encode(r)
        tokens[i, : len(ids)] = torch.tensor(ids)
    return {"image": image, "masks": masks, "present": present, "tokens": tokens}


def test_short_overfit_run_loss_falls() -> None:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(
        ["A solid nodule in the right lower lobe.", "No abnormalities detected."]
    )
    batch = toy_batch(tokenizer)
    model = UniCT(tiny_config(), len(tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(batch["image"], full_resolution_seg=False)
        masks = torch.nn.functional.avg_pool3d(batch["masks"], kernel_size=(1, 2, 2))
        rep = model.report_logits(batch["tokens"][:, :-1], out.memory)
        loss, parts = multitask_loss(
            out.cls_logits,
            out.seg_logits,
            rep,
            batch["present"],
            masks,
            batch["tokens"],
            tokenizer.pad_id,
            LossWeights(),
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        losses.append(float(loss.detach()))
    assert set(parts) == {"cls", "seg_bce", "seg_dice", "rep"}
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_loss_weights_follow_ablation() -> None:
    cfg = SMALL.with_ablation(segmentation_supervision=False, report_supervision=False)
    w = LossWeights().under(cfg.ablation)
    assert (w.classification, w.segmentation, w.report) == (1.0, 0.0, 0.0)


def test_soft_dice_ignores_empty_targets() -> None:
    logits = torch.full((1, 2, 4, 4, 4), 10.0)
    target = torch.zeros(1, 2, 4, 4, 4)
    target[0, 0] = 1
    assert float(soft_dice_loss(logits, target)) < 1e-3


def test_metrics_on_known_values() -> None:
    assert f1_score([1, 0, 1, 0], [1, 0, 0, 0]) == pytest.approx(2 / 3)
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx((1 + 2 / 3) / 2)
    assert dice(np.ones(4), np.array([1, 1, 0, 0])) == pytest.approx(2 * 2 / 6)
    ref = ["the", "cat", "sat", "on", "the", "mat"]
    assert corpus_bleu([ref], [ref]) == pytest.approx(1.0)
    assert corpus_bleu([ref], [["a"]]) == 0.0
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert 0 < rouge_l(ref, ["the", "cat", "on", "a", "mat"]) < 1


def test_threshold_tuning_separates_classes() -> None:
    probs = np.array([[0.9, 0.2], [0.7, 0.1], [0.3, 0.15], [0.1, 0.05]])
    present = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=bool)
    thr = tune_thresholds(probs, present)
    assert 0.3 < thr[0] <= 0.7
    assert thr[1] == 0.5
