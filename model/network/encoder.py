"""The CT-Scroll encoder: slice triplets through a 2D ResNet-18, then scrolling attention.

Each run of 3 consecutive slices is a 3-channel 2D image; a 2D ResNet-18 (MONAI's, trained
from scratch) encodes it; global average pooling and a projection give one token per
triplet. We concatenate global max pooling to the average (CT-Scroll uses the average
alone): a 6 mm nodule fills a hundredth of a triplet's map, and the average dilutes it. The scrolling block (global, caudal->cranial banded, cranial->caudal banded
attention) mixes the tokens along the body axis. Slice-level representation: the tokens;
global representation: their mean. The ResNet stage outputs are kept as skips for the
segmentation decoder.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from monai.networks.nets import ResNet
from torch import Tensor, nn

from model.config import UniCTConfig
from model.network.attention import TransformerBlock, sinusoidal_positions


class EncoderOutput(NamedTuple):
    """Encoder results; ``skips`` are per-triplet 2D maps, batch and triplets flattened."""

    slice_tokens: Tensor  # (B, T, d)
    global_token: Tensor  # (B, d)
    skips: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # stem, layer1..layer4: (B*T, C, h, w)


class TripletResNet(nn.Module):
    """A 2D ResNet-18 (MONAI) applied to every slice triplet, returning all stages."""

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.net = ResNet(
            block="basic",
            layers=[2, 2, 2, 2],
            block_inplanes=list(widths),
            spatial_dims=2,
            n_input_channels=3,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
            act=("relu", {"inplace": False}),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        n = self.net
        stem = n.act(n.bn1(n.conv1(x)))
        l1 = n.layer1(n.maxpool(stem))
        l2 = n.layer2(l1)
        l3 = n.layer3(l2)
        l4 = n.layer4(l3)
        return stem, l1, l2, l3, l4


class ScrollingBlock(nn.Module):
    """Three pre-LN attention blocks over triplet tokens: global, caudal->cranial, cranial->caudal."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads, dropout) for _ in range(3)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        idx = torch.arange(t, device=tokens.device)
        offset = idx[None, :] - idx[:, None]  # key index - query index
        upward = (offset <= 0) & (offset >= -self.window)  # token i sees i-w..i
        downward = (offset >= 0) & (offset <= self.window)  # token i sees i..i+w
        x = tokens
        for block, mask in zip(self.blocks, (None, upward, downward), strict=True):
            x, _ = block(x, mask=mask)
        return self.norm(x)  # type: ignore[no-any-return]


class CTScrollEncoder(nn.Module):
    """Volume (B, D, H, W) -> slice tokens, global token and per-triplet skip maps."""

    def __init__(self, cfg: UniCTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = TripletResNet(cfg.resnet_widths)
        self.project = nn.Sequential(
            nn.Linear(2 * cfg.resnet_widths[3], cfg.d_model), nn.ReLU(), nn.Dropout(0.2)
        )
        self.scroll = ScrollingBlock(cfg.d_model, cfg.heads, cfg.scroll_window, cfg.dropout)

    def forward(self, volume: Tensor) -> EncoderOutput:
        b, d, h, w = volume.shape
        t = d // 3
        triplets = volume.reshape(b * t, 3, h, w)
        skips = self.backbone(triplets)
        pooled = torch.cat([skips[-1].mean(dim=(2, 3)), skips[-1].amax(dim=(2, 3))], dim=1)
        tokens = self.project(pooled).reshape(b, t, self.cfg.d_model)
        tokens = tokens + sinusoidal_positions(t, self.cfg.d_model, volume.device)[None]
        tokens = self.scroll(tokens)
        return EncoderOutput(tokens, tokens.mean(dim=1), skips)
