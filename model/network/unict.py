"""UniCT: encoder -> task adapters -> multi-task fusion -> modulated dense path and task heads."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import UniCTConfig
from model.network.encoder import CTScrollEncoder
from model.network.fusion import MultiTaskFusion, TaskAdapters
from model.network.heads import ClassificationHead, ReportDecoder, SegmentationDecoder

#: Position of the findings token in :attr:`UniCTOutput.memory` (after the report and
#: classification tokens): the report generator replaces it with the thresholded findings.
FINDINGS_SLOT = 2


class UniCTOutput(NamedTuple):
    """One forward pass.

    Attributes
    ----------
    cls_logits
        ``(B, L)`` abnormality logits.
    seg_logits
        ``(B, L, D, H, W)`` segmentation logits on the model grid.
    fusion_attention
        ``(B, 3, 3)`` task-by-task attention averaged over heads (cls, seg, report).
    memory
        ``(B, 3 + T, d)`` what the report decoder attends to: the fused report and
        classification tokens, a token of the predicted findings, the slice tokens.
    """

    cls_logits: Tensor
    seg_logits: Tensor
    fusion_attention: Tensor
    memory: Tensor


class UniCT(nn.Module):
    """The unified multi-task model for 3D chest CT.

    Parameters
    ----------
    cfg
        Sizes and ablation switches (:mod:`model.config`).
    vocab_size
        Size of the report tokenizer's vocabulary.
    """

    def __init__(self, cfg: UniCTConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.encoder = CTScrollEncoder(cfg)
        self.adapters = TaskAdapters(cfg.d_model, cfg.heads)
        self.fusion = MultiTaskFusion(
            cfg.d_model, cfg.heads, cfg.fusion_layers, cfg.dropout, cfg.ablation.fusion
        )
        self.classifier = ClassificationHead(cfg.d_model, cfg.cls_hidden, cfg.num_labels)
        self.segmenter = SegmentationDecoder(
            cfg.resnet_widths, cfg.d_model, cfg.num_labels, cfg.ablation.modulation
        )
        self.reporter = ReportDecoder(
            vocab_size, cfg.d_model, cfg.heads, cfg.decoder_layers, cfg.dropout
        )
        # Segmentation evidence for classification: a per-class affine of the mean of the
        # top-k segmentation logits, added to the head's logit (scale 1 at start: a finding
        # the decoder segments is a finding the classifier reports).
        self.seg_evidence_scale = nn.Parameter(torch.ones(cfg.num_labels))
        self.seg_evidence_bias = nn.Parameter(torch.zeros(cfg.num_labels))
        # The predicted findings as one more memory token of the report decoder.
        self.findings_token = nn.Linear(cfg.num_labels, cfg.d_model)

    @staticmethod
    def segmentation_evidence(seg_logits: Tensor, full_resolution: bool, k: int = 16) -> Tensor:
        """``(B, L)``: mean of the ``k`` largest half-resolution segmentation logits per class."""
        x = F.avg_pool3d(seg_logits, kernel_size=(1, 2, 2)) if full_resolution else seg_logits
        flat = x.flatten(2)
        return flat.topk(min(k, flat.shape[-1]), dim=-1).values.mean(dim=-1)

    def forward(
        self,
        volume: Tensor,
        full_resolution_seg: bool = True,
        with_segmentation: bool = True,
        findings: Tensor | None = None,
        seg_triplets: Tensor | None = None,
    ) -> UniCTOutput:
        """Run the visual path on ``(B, D, H, W)`` (or ``(B, 1, D, H, W)``) preprocessed volumes.

        With ``full_resolution_seg=False`` the segmentation logits stay at half the in-plane
        resolution (what training uses; targets are pooled to match). With
        ``with_segmentation=False`` the dense path is skipped and ``seg_logits`` is empty
        (training without segmentation supervision). ``findings`` ``(B, L)`` replaces the
        predicted probabilities that condition the report (training feeds the truth for part
        of the batches, so the decoder learns to state what the findings token says).
        """
        if volume.dim() == 5:
            volume = volume[:, 0]
        enc = self.encoder(volume)
        tasks = self.adapters(enc.slice_tokens, enc.global_token)
        fused, attention = self.fusion(tasks)
        t_cls, t_seg, t_rep = fused[:, 0], fused[:, 1], fused[:, 2]
        cls_logits = self.classifier(t_cls)
        if with_segmentation:
            out_size = (volume.shape[2], volume.shape[3]) if full_resolution_seg else None
            seg_logits = self.segmenter(enc.skips, enc.slice_tokens, t_seg, out_size, seg_triplets)
            if self.cfg.ablation.segmentation_supervision:
                # Without segmentation supervision the decoder's output means nothing, so the
                # classifier does not read it (the classification-only ablation).
                evidence = self.segmentation_evidence(seg_logits, full_resolution_seg)
                cls_logits = (
                    cls_logits + self.seg_evidence_scale * evidence + self.seg_evidence_bias
                )
        else:
            seg_logits = volume.new_zeros((volume.shape[0], self.cfg.num_labels, 0, 0, 0))
        # The report states the classifier's findings; it does not train the classifier
        # through this token (its gradient reaches the encoder through the other tokens).
        if findings is None:
            findings = torch.sigmoid(cls_logits).detach()
        findings_token = self.findings_token(findings.to(cls_logits.dtype))
        memory = torch.cat(
            [t_rep[:, None], t_cls[:, None], findings_token[:, None], enc.slice_tokens], dim=1
        )
        return UniCTOutput(cls_logits, seg_logits, attention, memory)

    def report_logits(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """Teacher-forced report logits (B, L, V)."""
        return self.reporter(tokens, memory)  # type: ignore[no-any-return]

    def generate_report(
        self, memory: Tensor, bos: int, eos: int, max_len: int | None = None
    ) -> Tensor:
        """Greedy report tokens for each memory in the batch."""
        return self.reporter.greedy(memory, bos, eos, max_len or self.cfg.max_report_tokens)
