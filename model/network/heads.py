"""Task heads: classification, per-triplet U-Net segmentation decoder, report decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from model.network.attention import TransformerBlock, sinusoidal_positions
from model.network.fusion import FiLM

#: Initial bias of the segmentation logits, about log(0.0015): a finding fills 1e-4 to 1e-3
#: of a volume, and Adam moves a bias by about the learning rate per step, so starting at 0
#: costs thousands of steps spent only on pushing the background down.
FOREGROUND_PRIOR_LOGIT = -6.5


class ClassificationHead(nn.Module):
    """Linear - ReLU - Dropout(0.5) - Linear: one logit per abnormality."""

    def __init__(self, dim: int, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, num_labels)
        )

    def forward(self, token: Tensor) -> Tensor:
        return self.net(token)  # type: ignore[no-any-return]


def _conv(cin: int, cout: int) -> Convolution:
    return Convolution(
        spatial_dims=2, in_channels=cin, out_channels=cout, kernel_size=3, norm="batch", act="relu"
    )


class UpStage(nn.Module):
    """Upsample x2, concatenate the skip, two 3x3 convolutions, then FiLM modulation."""

    def __init__(self, cin: int, cskip: int, cout: int, dim: int, modulation: bool) -> None:
        super().__init__()
        self.convs = nn.Sequential(_conv(cin + cskip, cout), _conv(cout, cout))
        self.film = FiLM(dim, cout, modulation)

    def forward(self, x: Tensor, skip: Tensor, seg_token: Tensor, triplets: int) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = self.convs(torch.cat([x, skip], dim=1))
        out: Tensor = self.film(x, seg_token, triplets)
        return out


class TripletContext(nn.Module):
    """3D context for a per-triplet skip map: a convolution across neighbouring triplets.

    The ResNet sees one triplet (3 slices) at a time, so a nodule and the cross-section of
    a vessel running through the slab look alike in 2D; whether the structure goes on in
    the triplets above and below tells them apart. ``(B*T, C, h, w)`` maps are viewed as
    ``(B, C, T, h, w)``, convolved (``kernel`` over triplets, height, width), ReLU, a 1x1x1
    projection initialised to zero, and added back: a new context starts as the identity,
    so it can be added to a trained model without changing its output.
    """

    def __init__(self, channels: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        padding = (kernel[0] // 2, kernel[1] // 2, kernel[2] // 2)
        self.mix = nn.Conv3d(channels, channels, kernel, padding=padding)
        self.project = nn.Conv3d(channels, channels, 1)
        nn.init.zeros_(self.project.weight)
        assert self.project.bias is not None
        nn.init.zeros_(self.project.bias)

    def forward(self, x: Tensor, triplets: int) -> Tensor:
        bt, c, h, w = x.shape
        v = x.reshape(bt // triplets, triplets, c, h, w).transpose(1, 2)
        y = self.project(F.relu(self.mix(v)))
        out: Tensor = x + y.transpose(1, 2).reshape(bt, c, h, w)
        return out


class SegmentationDecoder(nn.Module):
    """A 2D U-Net decoder per triplet on the ResNet stages, conditioned on the fused seg token.

    The bottleneck gets the triplet's scrolled slice token (3D context along the body axis)
    and FiLM from the segmentation token; every up-stage is modulated too. The two finest
    skips (stem and first ResNet stage) get :class:`TripletContext` from the neighbouring
    triplets, the voxel-level 3D context the small findings need. The output is
    ``3 slices x num_labels`` channels per triplet at half the input resolution, upsampled
    to the input size and reassembled into ``(B, num_labels, D, H, W)`` logits.
    """

    def __init__(
        self, widths: tuple[int, int, int, int], dim: int, num_labels: int, modulation: bool
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths[0], widths[0], widths[1], widths[2]
        c4 = widths[3]
        self.num_labels = num_labels
        self.stem_context = TripletContext(c0, (3, 1, 1))
        self.l1_context = TripletContext(c1, (3, 3, 3))
        self.token_to_map = nn.Linear(dim, c4)
        self.bottleneck_film = FiLM(dim, c4, modulation)
        self.up3 = UpStage(c4, c3, c3, dim, modulation)
        self.up2 = UpStage(c3, c2, c2, dim, modulation)
        self.up1 = UpStage(c2, c1, c1, dim, modulation)
        self.up0 = UpStage(c1, c0, c0, dim, modulation)
        self.out = nn.Conv2d(c0, 3 * num_labels, kernel_size=1)
        # Start from the foreground prior rather than 50% (see FOREGROUND_PRIOR_LOGIT).
        assert self.out.bias is not None
        nn.init.constant_(self.out.bias, FOREGROUND_PRIOR_LOGIT)

    def forward(
        self,
        skips: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
        slice_tokens: Tensor,
        seg_token: Tensor,
        out_size: tuple[int, int] | None,
        triplets: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, L, D, h, w)``: at ``out_size`` in-plane, or at half the input
        resolution (the decoder's native output, cheaper to train on) when ``None``.

        ``triplets`` ``(B, K)`` decodes only those triplets of each volume (training: the
        dense loss on a sample of triplets, as patch-based trainers do); ``D`` is then
        ``3 K`` in that order.
        """
        t_all = slice_tokens.shape[1]
        skips = (
            self.stem_context(skips[0], t_all),
            self.l1_context(skips[1], t_all),
            skips[2],
            skips[3],
            skips[4],
        )
        if triplets is not None:
            b, t, _ = slice_tokens.shape
            flat = (triplets + torch.arange(b, device=triplets.device)[:, None] * t).flatten()
            skips = (
                skips[0][flat],
                skips[1][flat],
                skips[2][flat],
                skips[3][flat],
                skips[4][flat],
            )
            slice_tokens = torch.gather(
                slice_tokens, 1, triplets[:, :, None].expand(-1, -1, slice_tokens.shape[2])
            )
        stem, l1, l2, l3, l4 = skips
        b, t, _ = slice_tokens.shape
        x = l4 + self.token_to_map(slice_tokens).reshape(b * t, -1)[:, :, None, None]
        x = self.bottleneck_film(x, seg_token, t)
        x = self.up3(x, l3, seg_token, t)
        x = self.up2(x, l2, seg_token, t)
        x = self.up1(x, l1, seg_token, t)
        x = self.up0(x, stem, seg_token, t)
        x = self.out(x)
        if out_size is not None:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        # (B*T, 3*L, h, w) -> (B, L, T*3, h, w): the 3 slices of a triplet are consecutive.
        h, w = x.shape[-2], x.shape[-1]
        x = x.reshape(b, t, 3, self.num_labels, h, w).permute(0, 3, 1, 2, 4, 5)
        out: Tensor = x.reshape(b, self.num_labels, t * 3, h, w)
        return out


class ReportDecoder(nn.Module):
    """Autoregressive transformer decoder with cross-attention to the visual memory.

    Memory: the fused report and classification tokens followed by the slice tokens.
    """

    def __init__(self, vocab_size: int, dim: int, heads: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(
            [TransformerBlock(dim, heads, dropout, cross=True) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: Tensor, memory: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, L, V)`` for ``tokens`` (B, L)."""
        n = tokens.shape[1]
        x = (
            self.embed(tokens) * (self.dim**0.5)
            + sinusoidal_positions(n, self.dim, tokens.device)[None]
        )
        causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        for layer in self.layers:
            x, _ = layer(x, mask=causal, memory=memory)
        return self.lm_head(self.norm(x))  # type: ignore[no-any-return]

    @torch.no_grad()
    def greedy(self, memory: Tensor, bos: int, eos: int, max_len: int) -> Tensor:
        """Greedy decoding; returns ``(B, <= max_len)`` ids after BOS, EOS included when reached."""
        b = memory.shape[0]
        seq = torch.full((b, 1), bos, dtype=torch.long, device=memory.device)
        finished = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_len - 1):
            nxt = self.forward(seq, memory)[:, -1].argmax(dim=-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            finished |= nxt == eos
            if bool(finished.all()):
                break
        return seq[:, 1:]
