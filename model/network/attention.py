"""Attention blocks shared by the scrolling encoder, the fusion module and the report decoder.

Attention is written out (no fused kernels) so that the head-averaged attention matrix is
available and the graph exports to ONNX with dynamic token counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> Tensor:
    """``(length, dim)`` sinusoidal position codes, computed for any length (no learned table)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    angles = pos * freq[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention returning the output and the head-averaged attention weights."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Attend from ``x`` (B, N, C) to ``context`` (B, M, C) (self-attention when None).

        ``mask`` is a boolean (N, M) or (B, N, M) tensor, True where attention is allowed.
        Returns the output (B, N, C) and the attention averaged over heads (B, N, M).
        """
        context = x if context is None else context
        b, n, c = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (self.head_dim**-0.5)
        if mask is not None:
            allowed = mask if mask.dim() == 3 else mask[None]
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = scores.softmax(dim=-1)
        out = (self.dropout(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.out(out), attn.mean(dim=1)


class GeGLU(nn.Module):
    """The GeGLU feed-forward of CT-Scroll: ``W2 (GELU(W x) * V x)``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        out: Tensor = self.out(self.dropout(F.gelu(gate) * a))
        return out


class TransformerBlock(nn.Module):
    """Pre-LayerNorm residual block: self-attention, optional cross-attention, GeGLU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.cross: MultiHeadAttention | None = (
            MultiHeadAttention(dim, heads, dropout) if cross else None
        )
        self.norm_cross = nn.LayerNorm(dim) if cross else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = GeGLU(dim, 2 * dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, memory: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Returns the new tokens and the head-averaged self-attention."""
        h, attn = self.attn(self.norm1(x), mask=mask)
        x = x + self.dropout(h)
        if self.cross is not None and self.norm_cross is not None and memory is not None:
            h, _ = self.cross(self.norm_cross(x), context=memory)
            x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        return x, attn
