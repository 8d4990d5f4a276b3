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


def test_triplet_sampling_keeps_findings_and_empty_lung() -> None:
    from model.training.train import gather_triplets, sample_triplets

    masks = torch.zeros(2, 10, 24, 8, 8)
    masks[0, 3, 9:12, 2, 2] = 1  # triplet 3 of the first volume
    masks[1, 0, 21, 0, 0] = 1  # triplet 7 of the second
    chosen = sample_triplets(masks, 4, np.random.default_rng(0))
    assert chosen.shape == (2, 4)
    assert 3 in chosen[0].tolist() and 7 in chosen[1].tolist()
    for row in chosen.tolist():
        assert row == sorted(set(row))
    picked = gather_triplets(masks, chosen)
    assert picked.shape == (2, 10, 12, 8, 8)
    assert float(picked.sum()) == float(masks.sum())


def test_initial_biases_start_at_the_prior() -> None:
    from model.training.train import calibrate_initial_biases

    class Cases:
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            present = np.zeros((8, 10), dtype=bool)
            present[:2, 0] = True  # 25% prevalence for the first abnormality
            self.items = [{"present": p} for p in present]
            self.images = [
                torch.from_numpy(rng.normal(-0.3, 0.05, (12, 64, 64)).astype(np.float32))
                for _ in range(8)
            ]

        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": self.images[i]}

    torch.manual_seed(0)
    model = UniCT(tiny_config(), 20)
    cases = Cases()
    calibrate_initial_biases(model, cases)  # type: ignore[arg-type]
    model.eval()
    with torch.no_grad():
        out = model(torch.stack([cases[i]["image"] for i in range(4)]))
    head = model.classifier.net[-1]
    assert isinstance(head, torch.nn.Linear)
    assert float(head.bias[0].detach()) == pytest.approx(np.log(0.25 / 0.75), abs=1e-5)
    probs = torch.sigmoid(out.cls_logits)
    # Not the 0.0015 of an uncalibrated evidence offset: close to the prior.
    assert float(probs[:, 0].mean()) == pytest.approx(0.25, abs=0.1)


def test_class_weights_steer_the_segmentation_loss() -> None:
    logits = torch.full((1, 2, 2, 4, 4), -5.0)
    target = torch.zeros(1, 2, 2, 4, 4)
    target[0, :, 0, 0, 0] = 1
    logits[0, 0, 0, 0, 0] = 5.0  # class 0 found, class 1 missed
    plain = float(soft_dice_loss(logits, target))
    heavy_missed = float(soft_dice_loss(logits, target, class_weights=torch.tensor([1.0, 3.0])))
    assert heavy_missed > plain
    assert float(soft_dice_loss(logits, target, class_weights=torch.ones(2))) == pytest.approx(
        plain
    )


def test_class_weights_argument_names_the_label_order() -> None:
    import argparse

    from model.training.train import parse_class_weights

    assert parse_class_weights("1,1,1,1,4,4,1,4,4,1")[4] == 4.0
    with pytest.raises(argparse.ArgumentTypeError, match="label order"):
        parse_class_weights("1,2")


def test_mask_thresholds_are_tuned_for_dice_per_class() -> None:
    """The voxel threshold with the best mean Dice on validation, per class; 0.5 for a
    class never present."""
    from types import SimpleNamespace

    from model.training.train import tune_mask_thresholds

    truth = torch.zeros(10, 6, 16, 16)
    truth[2, 1:5, 4:12, 4:12] = 1
    shell = torch.zeros_like(truth[2])
    shell[0:6, 2:14, 2:14] = 1
    # Class 2: 0.65 inside the finding, 0.35 in a shell around it: cuts 0.4-0.6 are
    # exact, 0.2-0.3 take the shell too, 0.7-0.8 take nothing.
    prob = torch.full((10, 6, 16, 16), 0.01)
    prob[2] = torch.where(truth[2] > 0, 0.65, torch.where(shell > 0, 0.35, 0.01))

    class Fixed(torch.nn.Module):
        cfg = SimpleNamespace(num_labels=10)

        def forward(self, image: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(seg_logits=torch.logit(prob)[None])

    present = truth.flatten(1).amax(1)
    cases = [{"image": torch.zeros(6, 16, 16), "masks": truth, "present": present}]
    thresholds = tune_mask_thresholds(Fixed(), cases)  # type: ignore[arg-type]
    assert thresholds[2] == 0.4  # the first of the exact cuts
    assert all(t == 0.5 for i, t in enumerate(thresholds) if i != 2)
