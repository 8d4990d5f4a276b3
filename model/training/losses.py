"""UniCT losses: BCE for classification, Dice + BCE for segmentation, token cross-entropy for reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import AblationConfig


@dataclass(frozen=True)
class LossWeights:
    """The lambdas of ``l_cls * BCE + l_seg * (Dice + BCE) + l_rep * CE``; all 1 to start."""

    classification: float = 1.0
    segmentation: float = 1.0
    report: float = 1.0
    seg_pos_weight: float = 1.0
    """Weight of foreground voxels in the segmentation BCE (small findings are rare voxels)."""
    seg_class_weights: tuple[float, ...] = ()
    """Per-abnormality factor on the foreground weight and on the Dice term (label order;
    empty: all 1), for the findings that are small, faint or like normal anatomy."""

    def under(self, ablation: AblationConfig) -> LossWeights:
        """Zero the weight of every task whose supervision the ablation removes."""
        return LossWeights(
            self.classification if ablation.classification_supervision else 0.0,
            self.segmentation if ablation.segmentation_supervision else 0.0,
            self.report if ablation.report_supervision else 0.0,
            self.seg_pos_weight,
            self.seg_class_weights,
        )


def soft_dice_loss(
    logits: Tensor, target: Tensor, eps: float = 1.0, class_weights: Tensor | None = None
) -> Tensor:
    """1 - soft Dice per (case, class), averaged over the pairs where the target is non-empty
    (weighted by ``class_weights`` (L,) when given).

    Empty targets are left to the BCE term (a Dice of an empty mask is undefined).
    """
    prob = torch.sigmoid(logits.float()).flatten(2)
    tgt = target.float().flatten(2)
    inter = (prob * tgt).sum(-1)
    denom = prob.sum(-1) + tgt.sum(-1)
    dice = (2 * inter + eps) / (denom + eps)
    present = tgt.sum(-1) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    if class_weights is None:
        return (1.0 - dice[present]).mean()
    w = class_weights.to(dice.dtype)[None].expand_as(dice)[present]
    return ((1.0 - dice[present]) * w).sum() / w.sum()


def report_loss(logits: Tensor, tokens: Tensor, pad_id: int) -> Tensor:
    """Next-token cross-entropy; ``logits`` (B, L-1, V) predict ``tokens[:, 1:]``."""
    return F.cross_entropy(
        logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=pad_id
    )


def multitask_loss(
    cls_logits: Tensor,
    seg_logits: Tensor,
    rep_logits: Tensor | None,
    present: Tensor,
    masks: Tensor,
    tokens: Tensor,
    pad_id: int,
    weights: LossWeights,
    known: Tensor | None = None,
    has_masks: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum and its parts (for logging).

    ``known`` ``(B, L)`` marks the labels a case's source asserts (CT-RATE leaves some
    unknown): the classification BCE averages over those only. ``has_masks`` ``(B,)``
    marks the cases with segmentation masks (CT-RATE has none): the segmentation terms
    use those only, and are left out of a batch without any. ``None``: all known.
    """
    parts: dict[str, Tensor] = {}
    total = cls_logits.sum() * 0.0
    if weights.classification:
        if known is None:
            parts["cls"] = F.binary_cross_entropy_with_logits(cls_logits.float(), present)
        else:
            per_label = F.binary_cross_entropy_with_logits(
                cls_logits.float(), present, reduction="none"
            )
            parts["cls"] = (per_label * known).sum() / known.sum().clamp(min=1.0)
        total = total + weights.classification * parts["cls"]
    if has_masks is not None and weights.segmentation:
        keep = has_masks > 0.5
        if not bool(keep.all()):
            seg_logits, masks = seg_logits[keep], masks[keep]
    if weights.segmentation and seg_logits.shape[0] > 0:
        class_weights = (
            torch.tensor(weights.seg_class_weights, device=seg_logits.device)
            if weights.seg_class_weights
            else None
        )
        pos_weight = torch.tensor(weights.seg_pos_weight, device=seg_logits.device)
        if class_weights is not None:
            pos_weight = pos_weight * class_weights[:, None, None, None]
        parts["seg_bce"] = F.binary_cross_entropy_with_logits(
            seg_logits.float(), masks, pos_weight=pos_weight
        )
        parts["seg_dice"] = soft_dice_loss(seg_logits, masks, class_weights=class_weights)
        total = total + weights.segmentation * (parts["seg_bce"] + parts["seg_dice"])
    if weights.report and rep_logits is not None and bool((tokens[:, 1:] != pad_id).any()):
        parts["rep"] = report_loss(rep_logits, tokens, pad_id)
        total = total + weights.report * parts["rep"]
    return total, {k: float(v.detach()) for k, v in parts.items()}
