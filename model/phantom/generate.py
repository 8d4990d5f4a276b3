"""One call from a seed to a rendered phantom."""

from __future__ import annotations

from typing import Literal

import numpy as np

from model.phantom.case import Phantom, sample_case
from model.phantom.grid import realistic_grid, training_grid
from model.phantom.realism import grid_v2
from model.phantom.render import render

GridKind = Literal["training", "realistic"]


def generate(
    seed: int,
    kind: GridKind = "training",
    *,
    p_normal: float = 0.15,
    max_findings: int = 5,
    generator: int = 1,
) -> Phantom:
    """Sample the case of ``seed``, choose its grid and render it (deterministic in ``seed``).

    Parameters
    ----------
    seed
        Case seed.
    kind
        ``"training"`` (coarse, fast) or ``"realistic"`` (512 x 512, thin slices).
    p_normal, max_findings, generator
        Passed to :func:`~model.phantom.case.sample_case`; generator 2 also draws its
        grid from :func:`~model.phantom.realism.grid_v2` (0.6-5 mm slices, wider fields
        of view).
    """
    spec = sample_case(seed, p_normal=p_normal, max_findings=max_findings, generator=generator)
    rng = np.random.default_rng([seed, 0x621D, 0 if kind == "training" else 1])
    if kind not in ("training", "realistic"):
        raise ValueError(f"kind must be 'training' or 'realistic', got {kind!r}")
    if generator == 2:
        return render(spec, grid_v2(spec, rng, kind))
    if kind == "training":
        grid = training_grid(spec, rng)
    elif kind == "realistic":
        grid = realistic_grid(spec, rng)
    else:
        raise ValueError(f"kind must be 'training' or 'realistic', got {kind!r}")
    return render(spec, grid)
