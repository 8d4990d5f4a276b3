"""Task adapters, the multi-task fusion module, and segmentation-conditioned modulation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.network.attention import MultiHeadAttention, TransformerBlock

TASKS = ("classification", "segmentation", "report")


class TaskAdapter(nn.Module):
    """One task's latent from the slice tokens: attention pooling with a learned query, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = MultiHeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.LayerNorm(dim))

    def forward(self, slice_tokens: Tensor, global_token: Tensor) -> Tensor:
        pooled, _ = self.pool(
            self.query.expand(slice_tokens.shape[0], -1, -1), context=slice_tokens
        )
        return self.mlp(torch.cat([pooled[:, 0], global_token], dim=-1))  # type: ignore[no-any-return]


class TaskAdapters(nn.Module):
    """Adapters for classification, segmentation and report: (B, 3, d) task tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList([TaskAdapter(dim, heads) for _ in TASKS])

    def forward(self, slice_tokens: Tensor, global_token: Tensor) -> Tensor:
        return torch.stack([a(slice_tokens, global_token) for a in self.adapters], dim=1)


class MultiTaskFusion(nn.Module):
    """Transformer layers over the three task tokens, so that tasks exchange information.

    Returns the fused tokens and the task-by-task attention averaged over heads and layers
    (rows attend to columns, order classification, segmentation, report): the matrix the
    UniCT paper plots. When disabled (ablation), tokens pass unchanged and the matrix is
    the identity.
    """

    def __init__(
        self, dim: int, heads: int, layers: int, dropout: float, enabled: bool = True
    ) -> None:
        super().__init__()
        self.enabled = enabled
        self.task_embedding = nn.Parameter(torch.zeros(1, len(TASKS), dim))
        self.layers = nn.ModuleList([TransformerBlock(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, task_tokens: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = task_tokens.shape
        if not self.enabled:
            eye = torch.eye(n, device=task_tokens.device, dtype=task_tokens.dtype)
            return task_tokens, eye[None].expand(b, n, n)
        x = task_tokens + self.task_embedding
        maps = []
        for layer in self.layers:
            x, attn = layer(x)
            maps.append(attn)
        return self.norm(x), torch.stack(maps, dim=0).mean(dim=0)


class FiLM(nn.Module):
    """Segmentation-conditioned feature modulation: ``F' = (1 + gamma) * F + beta``.

    ``gamma, beta = Linear(t_seg)``, initialised to zero so training starts from the
    identity. Disabled (ablation) it is the identity.
    """

    def __init__(self, dim: int, channels: int, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.to_params = nn.Linear(dim, 2 * channels)
        nn.init.zeros_(self.to_params.weight)
        nn.init.zeros_(self.to_params.bias)

    def forward(self, features: Tensor, seg_token: Tensor, triplets: int) -> Tensor:
        """``features`` (B*T, C, h, w); ``seg_token`` (B, d)."""
        if not self.enabled:
            return features
        gamma, beta = self.to_params(seg_token).repeat_interleave(triplets, dim=0).chunk(2, dim=-1)
        out: Tensor = features * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return out
