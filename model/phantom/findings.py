"""The ten abnormalities as lesion instances: where they go and how big they are.

:func:`sample_lesions` places the lesions of the chosen labels in patient millimetres; the
voxels are drawn later by :mod:`model.phantom.render`. A :class:`Lesion` keeps what the
report needs (label, centre, size, location) plus its label-specific extents and a seed
from which the fine structure (orientation, lobulation, sub-elements) is derived, so a case
is fully described independently of any grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model.labels import LABEL_KEYS
from model.phantom.anatomy import (
    LEFT,
    LOBES,
    LOWER_LOBES,
    RIGHT,
    UPPER_LOBES,
    Anatomy,
    Array,
    Fluid,
    Segment,
    airway_tree,
    lobe_index,
    lung_depth,
    lung_section,
    sample_lung_points,
)

#: The order in which labels are painted (later ones cover earlier ones).
PAINT_ORDER: tuple[str, ...] = (
    "pleural_effusion",
    "emphysema",
    "septal_thickening",
    "ground_glass_opacity",
    "micronodules",
    "linear_opacities",
    "consolidation",
    "bronchial_wall_thickening",
    "bronchiectasis",
    "nodule",
)
PLEURAL_SPACE = ("right pleural space", "left pleural space")


@dataclass(frozen=True)
class Lesion:
    """One inserted finding instance.

    Parameters
    ----------
    label
        A key of :data:`model.labels.LABEL_KEYS`.
    center_lps
        Centre (mm, LPS); inside the aerated lung, or in the pleural fluid for effusions.
    size_mm
        Longest dimension (for effusions: the largest fluid depth).
    location
        Lobe (``"right upper lobe"``...) or pleural space, as written in the report.
    extent_mm
        Label-specific extents: semi-axes for blob-like findings; ``(length, width,
        thickness)`` for linear opacities; ``(depth, z_full, z_taper)`` for effusions;
        ``(envelope radius, wall or lumen radius, wall)`` for airway findings.
    seed
        Seed of the lesion's fine structure.
    kind
        Generator 2's variants of a nodule, space-separated: ``juxtapleural``,
        ``juxtavascular``, ``subsolid`` (empty: a solid nodule where it was drawn).
    """

    label: str
    center_lps: tuple[float, float, float]
    size_mm: float
    location: str
    extent_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seed: int = 0
    kind: str = ""

    @property
    def side(self) -> int:
        """:data:`~model.phantom.anatomy.RIGHT` or :data:`~model.phantom.anatomy.LEFT`."""
        return LEFT if self.location.startswith("left") else RIGHT


def fluid_of(lesion: Lesion) -> Fluid:
    """The pleural fluid layer of a ``pleural_effusion`` lesion."""
    depth, z_full, z_taper = lesion.extent_mm
    return Fluid(lesion.side, depth, z_full, z_taper)


def _p3(p: Array) -> tuple[float, float, float]:
    return (float(p[0]), float(p[1]), float(p[2]))


def _lobe_of(anat: Anatomy, p: Array) -> int:
    side = RIGHT if p[0] < anat.center_x else LEFT
    return int(lobe_index(anat, side, p[None, 0], p[None, 1], p[None, 2])[0])


@dataclass(frozen=True)
class _Context:
    anat: Anatomy
    rng: np.random.Generator
    fluids: tuple[Fluid, ...]

    def seed(self) -> int:
        return int(self.rng.integers(0, 2**31 - 1))

    def point(
        self,
        lobes: tuple[int, ...] | None,
        min_depth: float,
        pick: Callable[[Array], int] | None = None,
    ) -> Array | None:
        """A random point of the aerated lung in ``lobes`` (any lobe as a fallback)."""
        for attempt_lobes, depth in ((lobes, min_depth), (None, min_depth), (None, 2.0)):
            sides = [RIGHT, LEFT]
            if attempt_lobes is not None:
                sides = [s for s in sides if any((lb >= 3) == (s == LEFT) for lb in attempt_lobes)]
            self.rng.shuffle(sides)
            for side in sides:
                pts = sample_lung_points(
                    self.anat,
                    self.rng,
                    side,
                    24,
                    min_depth=depth,
                    lobes=attempt_lobes,
                    fluids=self.fluids,
                )
                if pts.shape[0]:
                    index = pick(pts) if pick is not None else 0
                    out: Array = pts[index]
                    return out
        return None


def _choose_lobes(
    rng: np.random.Generator, preferred: tuple[int, ...], p_preferred: float
) -> tuple[int, ...]:
    if rng.random() < p_preferred:
        return (int(rng.choice(preferred)),)
    return (int(rng.integers(0, len(LOBES))),)


def _count(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(rng.integers(lo, hi + 1))


def _blob_lesions(
    ctx: _Context,
    label: str,
    n: int,
    size_range: tuple[float, float],
    preferred: tuple[int, ...] | None,
    p_preferred: float,
    depth_factor: float,
    flatness: tuple[float, float],
    dependent: bool = False,
    first_size: tuple[float, float] | None = None,
) -> list[Lesion]:
    out: list[Lesion] = []
    rng = ctx.rng
    for i in range(n):
        lo, hi = first_size if (i == 0 and first_size is not None) else size_range
        size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        radius = size / 2.0
        lobes = _choose_lobes(rng, preferred, p_preferred) if preferred is not None else None
        pick = (
            (lambda pts: int(np.argmax(pts[:, 1] + rng.normal(0.0, 10.0, pts.shape[0]))))
            if dependent
            else None
        )
        p = ctx.point(lobes, max(2.0, depth_factor * radius), pick)
        if p is None:
            continue
        semi = (
            radius,
            radius * float(rng.uniform(*flatness)),
            radius * float(rng.uniform(*flatness)),
        )
        out.append(Lesion(label, _p3(p), size, LOBES[_lobe_of(ctx.anat, p)], semi, ctx.seed()))
    return out


def _effusions(ctx: _Context) -> list[Lesion]:
    rng, anat = ctx.rng, ctx.anat
    r = rng.random()
    sides = [RIGHT, LEFT] if r < 0.3 else [RIGHT] if r < 0.65 else [LEFT]
    out: list[Lesion] = []
    for side in sides:
        depth = float(rng.uniform(10.0, 50.0))
        z_full = float(rng.uniform(0.12, 0.3)) * anat.lung_height
        z_taper = float(rng.uniform(0.2, 0.35)) * anat.lung_height
        cx, cy, _, _ = anat.lung_ellipse(side)
        z = anat.z_base + max(0.5 * z_full, 0.5 * max(anat.dome_left_mm, anat.dome_right_mm))
        _, b = lung_section(anat, side, np.asarray(z))
        y = cy + float(b) - 0.4 * min(depth, 1.2 * float(b))
        out.append(
            Lesion(
                "pleural_effusion",
                (cx, y, z),
                depth,
                PLEURAL_SPACE[side],
                (depth, z_full, z_taper),
                ctx.seed(),
            )
        )
    return out


def _septal(ctx: _Context) -> list[Lesion]:
    rng = ctx.rng
    out: list[Lesion] = []
    sides = [RIGHT, LEFT] if rng.random() < 0.5 else [int(rng.integers(0, 2))]
    for side in sides:
        lobe = (
            LOWER_LOBES[side]
            if rng.random() < 0.85
            else int(rng.choice([0, 1] if side == RIGHT else [3]))
        )
        pts = sample_lung_points(
            ctx.anat, rng, side, 64, min_depth=2.0, lobes=(lobe,), fluids=ctx.fluids
        )
        if pts.shape[0] == 0:
            continue
        fluid = next((f for f in ctx.fluids if f.side == side), None)
        d = lung_depth(ctx.anat, side, pts[:, 0], pts[:, 1], pts[:, 2], fluid)
        p = pts[int(np.argmin(d + rng.uniform(0.0, 4.0, d.shape[0])))]
        radius = float(rng.uniform(25.0, 45.0))
        band = float(rng.uniform(10.0, 25.0))
        semi = (radius, radius * float(rng.uniform(0.8, 1.0)), band)
        out.append(
            Lesion(
                "septal_thickening",
                _p3(p),
                2.0 * radius,
                LOBES[_lobe_of(ctx.anat, p)],
                semi,
                ctx.seed(),
            )
        )
    return out


def _linear(ctx: _Context) -> list[Lesion]:
    rng = ctx.rng
    out: list[Lesion] = []
    for _ in range(_count(rng, 1, 3)):
        length = float(rng.uniform(30.0, 80.0))
        width = float(rng.uniform(10.0, 22.0))
        thick = float(rng.uniform(3.0, 6.0))
        lobes = _choose_lobes(rng, (1, 2, 4, 3), 0.75)
        p = ctx.point(lobes, 6.0)
        if p is None:
            continue
        out.append(
            Lesion(
                "linear_opacities",
                _p3(p),
                length,
                LOBES[_lobe_of(ctx.anat, p)],
                (length, width, thick),
                ctx.seed(),
            )
        )
    return out


def _airway_candidates(ctx: _Context, lobes: tuple[int, ...], gen: int) -> list[Segment]:
    segs = [s for s in airway_tree(ctx.anat) if s.generation == gen and s.lobe in lobes]
    ok: list[Segment] = []
    for s in segs:
        m = np.asarray(s.midpoint)
        side = RIGHT if m[0] < ctx.anat.center_x else LEFT
        fluid = next((f for f in ctx.fluids if f.side == side), None)
        if lung_depth(ctx.anat, side, m[None, 0], m[None, 1], m[None, 2], fluid)[0] > 1.0:
            ok.append(s)
    return ok


def _bronchial(ctx: _Context, label: str) -> list[Lesion]:
    rng = ctx.rng
    out: list[Lesion] = []
    if label == "bronchiectasis":
        n, p_pref = _count(rng, 1, 2), 0.8
        preferred: tuple[int, ...] = (*LOWER_LOBES, 1)
    else:
        n, p_pref = _count(rng, 1, 2), 1.0
        preferred = tuple(range(len(LOBES)))
    used: set[int] = set()
    for _ in range(n):
        lobes = _choose_lobes(rng, preferred, p_pref)
        cands = [s for s in _airway_candidates(ctx, lobes, 3) if s.lobe not in used]
        if not cands:
            cands = [
                s
                for s in _airway_candidates(ctx, tuple(range(len(LOBES))), 3)
                if s.lobe not in used
            ]
        if not cands:
            break
        seg = cands[int(rng.integers(len(cands)))]
        used.add(seg.lobe)
        if label == "bronchiectasis":
            lumen = float(rng.uniform(4.0, 7.5))
            wall = float(rng.uniform(1.5, 2.5))
            extent = (0.0, lumen, wall)
            size = 2.0 * (lumen + wall)
        else:
            radius = float(rng.uniform(22.0, 35.0))
            wall = float(rng.uniform(2.0, 4.0))
            extent = (radius, 0.0, wall)
            size = 2.0 * radius
        out.append(Lesion(label, seg.midpoint, size, LOBES[seg.lobe], extent, ctx.seed()))
    return out


def sample_lesions(
    anat: Anatomy, rng: np.random.Generator, labels: tuple[str, ...]
) -> tuple[Lesion, ...]:
    """Place lesions for each label of ``labels`` (keys of ``LABEL_KEYS``).

    A label may end with no lesion in the rare case where no site fits (e.g. no
    segmental bronchus in the aerated lung); callers read presence from the lesions.
    """
    unknown = set(labels) - set(LABEL_KEYS)
    if unknown:
        raise ValueError(f"unknown abnormality keys: {sorted(unknown)}")
    ctx = _Context(anat, rng, ())
    lesions: list[Lesion] = []
    if "pleural_effusion" in labels:
        effusions = _effusions(ctx)
        lesions += effusions
        ctx = _Context(anat, rng, tuple(fluid_of(e) for e in effusions))
    for label in PAINT_ORDER:
        if label not in labels or label == "pleural_effusion":
            continue
        if label == "nodule":
            n = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
            lesions += _blob_lesions(
                ctx, label, n, (6.0, 25.0), None, 0.0, 0.35, (0.75, 1.0), first_size=(10.0, 40.0)
            )
        elif label == "ground_glass_opacity":
            lesions += _blob_lesions(
                ctx, label, _count(rng, 1, 3), (15.0, 60.0), LOWER_LOBES, 0.4, 0.3, (0.6, 1.0)
            )
        elif label == "consolidation":
            lesions += _blob_lesions(
                ctx,
                label,
                _count(rng, 1, 2),
                (30.0, 90.0),
                LOWER_LOBES,
                0.75,
                0.1,
                (0.55, 0.9),
                dependent=True,
            )
        elif label == "emphysema":
            lesions += _blob_lesions(
                ctx, label, _count(rng, 2, 5), (15.0, 50.0), UPPER_LOBES, 0.8, 0.3, (0.6, 1.0)
            )
        elif label == "micronodules":
            lesions += _blob_lesions(
                ctx, label, _count(rng, 1, 2), (30.0, 60.0), None, 0.0, 0.25, (0.7, 1.0)
            )
        elif label == "septal_thickening":
            lesions += _septal(ctx)
        elif label == "linear_opacities":
            lesions += _linear(ctx)
        else:
            lesions += _bronchial(ctx, label)
    return tuple(lesions)
