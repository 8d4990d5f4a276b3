"""Analytic chest anatomy in patient millimetres (LPS): body wall, lungs, lobes, mediastinum.

Every shape is a closed-form function of position, so it can be rasterised on any grid
(:mod:`model.phantom.render`) and queried at single points when findings are placed
(:mod:`model.phantom.findings`). Coordinates: +x patient left, +y posterior, +z superior;
the right lung therefore lies at smaller x than the left one.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

RIGHT, LEFT = 0, 1
#: Lobe names, indexed by the lobe codes :func:`lobe_index` returns.
LOBES: tuple[str, ...] = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "left lower lobe",
)
UPPER_LOBES = (0, 3)
LOWER_LOBES = (2, 4)


@dataclass(frozen=True)
class Anatomy:
    """Every anatomical choice of a case (mm, HU).

    Parameters
    ----------
    seed
        Seed of the fine structure (bronchial and vascular trees, lung texture).
    center_x, center_y
        LPS position of the body axis.
    body_a, body_b
        Outer semi-axes of the elliptical body section (left-right, antero-posterior).
    fat_mm, muscle_mm, posterior_mm
        Subcutaneous fat and chest-wall muscle thickness; extra posterior (paraspinal) muscle.
    fat_hu, muscle_hu, lung_hu
        Tissue densities; ``lung_gradient_hu`` is the extra density of dependent lung.
    z_base, lung_height
        Lowest lung point (posterior costophrenic recess) and lung height (apex = base + height).
    mediastinum_mm
        Half-width of the gap between the lungs.
    dome_right_mm, dome_left_mm
        Height of the diaphragmatic domes above the lung base.
    heart_scale, heart_shift_mm
        Heart size factor and extra leftward shift.
    aorta_radius
        Aortic radius.
    contrast
        Whether the blood pool is opacified; ``blood_hu`` is its density.
    spine_radius, vertebra_mm
        Vertebral body radius and height (disc to disc).
    rib_spacing, rib_drop
        Vertical distance between ribs and how much each rib descends from back to front.
    table, table_gap
        Whether the scanner table is present, and its distance below the body.
    """

    seed: int
    center_x: float
    center_y: float
    body_a: float
    body_b: float
    fat_mm: float
    muscle_mm: float
    posterior_mm: float
    fat_hu: float
    muscle_hu: float
    lung_hu: float
    lung_gradient_hu: float
    z_base: float
    lung_height: float
    mediastinum_mm: float
    dome_right_mm: float
    dome_left_mm: float
    heart_scale: float
    heart_shift_mm: float
    aorta_radius: float
    contrast: bool
    blood_hu: float
    spine_radius: float
    vertebra_mm: float
    rib_spacing: float
    rib_drop: float
    table: bool
    table_gap: float

    # ----------------------------------------------------------------- derived sizes
    @property
    def z_apex(self) -> float:
        """Highest lung point."""
        return self.z_base + self.lung_height

    @property
    def cavity(self) -> tuple[float, float, float, float]:
        """Thoracic cavity ellipse ``(cx, cy, a, b)`` inside the chest wall."""
        wall = 2.0 + self.fat_mm + self.muscle_mm
        return (
            self.center_x,
            self.center_y - self.posterior_mm,
            self.body_a - wall,
            self.body_b - wall - self.posterior_mm,
        )

    def lung_ellipse(self, side: int) -> tuple[float, float, float, float]:
        """Lung section at its widest ``(cx, cy, a, b)``; ``side`` is :data:`RIGHT` or :data:`LEFT`."""
        ccx, ccy, ca, cb = self.cavity
        a = 0.58 * (ca - self.mediastinum_mm)
        sign = -1.0 if side == RIGHT else 1.0
        return (ccx + sign * (self.mediastinum_mm + a), ccy + 0.06 * cb, a, 0.95 * cb)

    @property
    def heart(self) -> tuple[float, float, float, float, float, float]:
        """Heart ellipsoid ``(cx, cy, cz, a, b, c)``."""
        _, ccy, ca, cb = self.cavity
        s = self.heart_scale
        return (
            self.center_x + 0.17 * ca + self.heart_shift_mm,
            ccy - 0.3 * cb,
            self.z_base + 0.16 * self.lung_height,
            0.4 * ca * s,
            0.5 * cb * s,
            55.0 * s,
        )

    @property
    def spine_center(self) -> tuple[float, float]:
        """``(x, y)`` of the vertebral body axis."""
        _, ccy, _, cb = self.cavity
        return (self.center_x, ccy + cb - 0.35 * self.spine_radius)

    @property
    def trachea(self) -> tuple[float, float, float]:
        """``(x, y, radius)`` of the trachea."""
        _, sy = self.spine_center
        radius = 8.0 + 0.02 * (self.body_a - 140.0)
        return (self.center_x, sy - self.spine_radius - 14.0 - radius, radius)

    @property
    def carina_z(self) -> float:
        """z of the carina."""
        return self.z_base + 0.66 * self.lung_height

    def aorta_path(self) -> list[tuple[float, float, float]]:
        """Aortic centreline, root to the lowest descending point."""
        return list(_aorta_path(self))

    def body_extent_xy(self) -> tuple[float, float, float]:
        """Half width of the body (x) and its ``(y_lo, y_hi)`` range including the table."""
        y_hi = self.center_y + self.body_b + (self.table_gap + 14.0 if self.table else 0.0)
        return (self.body_a, self.center_y - self.body_b, y_hi)


@lru_cache(maxsize=256)
def _aorta_path(anat: Anatomy) -> tuple[tuple[float, float, float], ...]:
    hx, hy, hz, _, hb, hc = anat.heart
    _tx, ty, _ = anat.trachea
    sx, sy = anat.spine_center
    r = anat.aorta_radius
    z_arch = anat.z_base + 0.8 * anat.lung_height
    asc = (anat.center_x + 4.0, ty - 28.0 - r, z_arch - 5.0)
    desc = (sx + anat.spine_radius * 0.55 + r, sy - anat.spine_radius * 0.6, z_arch - 5.0)
    points = [(hx - 15.0, hy + 0.3 * hb, hz + 0.6 * hc), asc]
    for s in np.linspace(0.0, 1.0, 7)[1:]:
        x = asc[0] + (desc[0] - asc[0]) * s + 14.0 * math.sin(math.pi * s)
        y = asc[1] + (desc[1] - asc[1]) * s
        z = z_arch - 5.0 + 22.0 * math.sin(math.pi * s)
        points.append((float(x), float(y), float(z)))
    points.append((desc[0], desc[1], anat.z_base - 200.0))
    return tuple(points)


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw the anatomy of one case."""
    body_a = float(rng.uniform(140.0, 195.0))
    body_b = float(np.clip(body_a * rng.uniform(0.62, 0.78), 95.0, 145.0))
    contrast = bool(rng.random() < 0.5)
    return Anatomy(
        seed=int(rng.integers(0, 2**31 - 1)),
        center_x=float(rng.uniform(-15.0, 15.0)),
        center_y=float(rng.uniform(-15.0, 15.0)),
        body_a=body_a,
        body_b=body_b,
        fat_mm=float(rng.uniform(6.0, 0.12 * body_a)),
        muscle_mm=float(rng.uniform(8.0, 16.0)),
        posterior_mm=float(rng.uniform(10.0, 18.0)),
        fat_hu=float(rng.uniform(-115.0, -85.0)),
        muscle_hu=float(rng.uniform(30.0, 55.0)),
        lung_hu=float(rng.uniform(-880.0, -820.0)),
        lung_gradient_hu=float(rng.uniform(10.0, 60.0)),
        z_base=float(rng.uniform(-180.0, -120.0)),
        lung_height=float(rng.uniform(180.0, 280.0)),
        mediastinum_mm=float(rng.uniform(14.0, 26.0)),
        dome_right_mm=float(rng.uniform(35.0, 60.0)),
        dome_left_mm=float(rng.uniform(25.0, 45.0)),
        heart_scale=float(rng.uniform(0.85, 1.1)),
        heart_shift_mm=float(rng.uniform(-5.0, 15.0)),
        aorta_radius=float(rng.uniform(11.0, 16.0)),
        contrast=contrast,
        blood_hu=float(rng.uniform(150.0, 300.0)) if contrast else float(rng.uniform(35.0, 50.0)),
        spine_radius=float(rng.uniform(15.0, 21.0)),
        vertebra_mm=float(rng.uniform(24.0, 30.0)),
        rib_spacing=float(rng.uniform(22.0, 28.0)),
        rib_drop=float(rng.uniform(30.0, 55.0)),
        table=bool(rng.random() < 0.7),
        table_gap=float(rng.uniform(0.0, 8.0)),
    )


# --------------------------------------------------------------------- analytic shapes
def ellipse_depth(dx: Array, dy: Array, a: Array | float, b: Array | float) -> Array:
    """Approximate distance (mm) inside an ellipse of semi-axes ``a, b``; negative outside.

    First-order accurate near the boundary, bounded by ``min(a, b)`` inside.
    """
    u = dx / a
    v = dy / b
    g = u * u + v * v
    k = (u * u / (a * a) + v * v / (b * b)) / np.maximum(g, 1e-6)
    k = np.where(g > 1e-6, k, 1.0 / (np.asarray(a) * np.asarray(b)))
    out: Array = (1.0 - np.sqrt(g)) / np.sqrt(k)
    return out


@dataclass(frozen=True)
class Fluid:
    """A dependent pleural fluid layer: posterior thickness ``thickness_mm`` up to
    ``z_full`` above the lung base, tapering to none at ``z_full + z_taper``."""

    side: int
    thickness_mm: float
    z_full: float
    z_taper: float

    def thickness_at(self, anat: Anatomy, z: Array) -> Array:
        """Posterior fluid thickness (mm) at height ``z``."""
        h = (z - anat.z_base - self.z_full) / self.z_taper
        out: Array = self.thickness_mm * np.clip(1.0 - h, 0.0, 1.0)
        return out


def lung_section(anat: Anatomy, side: int, z: Array) -> tuple[Array, Array]:
    """Semi-axes ``(a(z), b(z))`` of the lung section at height ``z`` (zero outside)."""
    _, _, a, b = anat.lung_ellipse(side)
    t = (z - anat.z_base) / anat.lung_height
    p = np.sqrt(np.clip((1.0 - t) / 0.32, 0.0, 1.0)) * (1.0 - 0.08 * np.clip(t, 0.0, 1.0))
    p = np.where((t >= 0.0) & (t <= 1.0), p, 0.0)
    return np.maximum(a * p, 1e-3), np.maximum(b * p, 1e-3)


def dome_height(anat: Anatomy, side: int, x: Array, y: Array) -> Array:
    """z of the diaphragm under the lung of ``side`` at ``(x, y)``."""
    cx, cy, a, b = anat.lung_ellipse(side)
    g = np.clip(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2, 0.0, 1.0)
    dome = anat.dome_right_mm if side == RIGHT else anat.dome_left_mm
    out: Array = anat.z_base + dome * (1.0 - g)
    return out


def diaphragm_z(anat: Anatomy, x: Array, y: Array) -> Array:
    """z of the diaphragm (the top of the abdomen) anywhere in the section."""
    right = dome_height(anat, RIGHT, x, y)
    left = dome_height(anat, LEFT, x, y)
    out: Array = np.where(x < anat.center_x, right, left)
    return out


def heart_depth_outside(anat: Anatomy, x: Array, y: Array, z: Array) -> Array:
    """Approximate distance (mm) outside the heart; negative inside."""
    hx, hy, hz, ha, hb, hc = anat.heart
    rho = np.sqrt(((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2)
    out: Array = (rho - 1.0) * min(ha, hb, hc)
    return out


def _static_depth(anat: Anatomy, x: Array, y: Array) -> Array:
    """The z-independent limits of the lungs: chest wall, spine, descending aorta."""
    ccx, ccy, ca, cb = anat.cavity
    d = ellipse_depth(x - ccx, y - ccy, ca, cb) - 2.0
    sx, sy = anat.spine_center
    d = np.minimum(d, np.sqrt((x - sx) ** 2 + (y - sy) ** 2) - anat.spine_radius - 8.0)
    path = anat.aorta_path()
    ax, ay, _ = path[-1]
    d_out: Array = np.minimum(d, np.sqrt((x - ax) ** 2 + (y - ay) ** 2) - anat.aorta_radius - 3.0)
    return d_out


def lung_depth(
    anat: Anatomy, side: int, x: Array, y: Array, z: Array, fluid: Fluid | None = None
) -> Array:
    """Approximate depth (mm) inside the aerated lung of ``side``; <= 0 outside.

    ``x, y, z`` broadcast against each other (pass ``(1,1,W), (1,H,1), (D,1,1)`` for a grid
    block, or three ``(N,)`` arrays for points). With ``fluid``, the lung is displaced
    anteriorly by the dependent effusion; without, this is the lung's pleural cavity.
    """
    cx, cy, _, _ = anat.lung_ellipse(side)
    a, b = lung_section(anat, side, z)
    if fluid is not None:
        delta = np.minimum(0.5 * fluid.thickness_at(anat, z), 0.6 * b)
        cy_z = cy - delta
        b = b - delta
    else:
        cy_z = np.asarray(cy)
    d = ellipse_depth(x - cx, y - cy_z, a, b)
    d = np.minimum(d, _static_depth(anat, x, y))
    d = np.minimum(d, anat.z_apex - z)
    d = np.minimum(d, z - dome_height(anat, side, x, y))
    d_out: Array = np.minimum(d, heart_depth_outside(anat, x, y, z) - 4.0)
    return d_out


def lung_inside(
    anat: Anatomy,
    side: int,
    x: Array,
    y: Array,
    z: Array,
    fluids: tuple[Fluid | None, ...] = (None,),
) -> list[Array]:
    """Boolean masks ``lung_depth(...) > 0`` for each fluid state, on a grid block.

    A fast path for rasterising: ``x (1,1,W)``, ``y (1,H,1)``, ``z (D,1,1)``. The
    z-independent limits are evaluated once in 2D and shared by all fluid states.
    """
    cx, cy, _, _ = anat.lung_ellipse(side)
    a, b = lung_section(anat, side, z)
    common = (
        (_static_depth(anat, x, y) > 0.0) & (z < anat.z_apex) & (z > dome_height(anat, side, x, y))
    )
    hx, hy, hz, ha, hb, hc = anat.heart
    limit = (1.0 + 4.0 / min(ha, hb, hc)) ** 2
    heart_out = (((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2).astype(
        np.float32
    ) > limit
    dx2 = ((x - cx) ** 2).astype(np.float32)
    out: list[Array] = []
    for fluid in fluids:
        bb = b
        cy_z = np.asarray(cy)
        if fluid is not None:
            delta = np.minimum(0.5 * fluid.thickness_at(anat, z), 0.6 * b)
            cy_z = cy - delta
            bb = b - delta
        inv_a2 = (1.0 / (a * a)).astype(np.float32)
        inv_b2 = (1.0 / (bb * bb)).astype(np.float32)
        g = dx2 * inv_a2 + ((y - cy_z) ** 2).astype(np.float32) * inv_b2
        out.append((g < 1.0) & common & heart_out)
    return out


def lung_bbox(
    anat: Anatomy, side: int
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """``((x_lo, x_hi), (y_lo, y_hi), (z_lo, z_hi))`` enclosing the lung of ``side``."""
    cx, cy, a, b = anat.lung_ellipse(side)
    return ((cx - a, cx + a), (cy - b, cy + b), (anat.z_base, anat.z_apex))


def lobe_index(anat: Anatomy, side: int, x: Array, y: Array, z: Array) -> Array:
    """Lobe code (index into :data:`LOBES`) of points of the lung ``side``."""
    _, cy, _, b = anat.lung_ellipse(side)
    t = (z - anat.z_base) / anat.lung_height
    v = np.clip((y - cy) / b, -1.0, 1.0)
    lower = t < 0.42 + 0.22 * v + 0.0 * x
    if side == RIGHT:
        middle = (~lower) & (t < 0.56) & (v < 0.15)
        out: Array = np.where(lower, 2, np.where(middle, 1, 0))
        return out
    out = np.where(lower, 4, 3)
    return out


def sample_lung_points(
    anat: Anatomy,
    rng: np.random.Generator,
    side: int,
    n: int,
    *,
    min_depth: float = 3.0,
    lobes: tuple[int, ...] | None = None,
    fluids: tuple[Fluid, ...] = (),
    batch: int = 256,
    tries: int = 20,
) -> Array:
    """Up to ``n`` uniform random points ``(N, 3)`` inside the aerated lung of ``side``."""
    (x0, x1), (y0, y1), (z0, z1) = lung_bbox(anat, side)
    fluid = next((f for f in fluids if f.side == side), None)
    found: list[Array] = []
    count = 0
    for _ in range(tries):
        p = rng.uniform((x0, y0, z0), (x1, y1, z1), size=(batch, 3))
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        ok = lung_depth(anat, side, x, y, z, fluid) > min_depth
        if lobes is not None:
            ok &= np.isin(lobe_index(anat, side, x, y, z), lobes)
        p = p[ok]
        p = p[aorta_distance(anat, p) > 4.0]
        found.append(p)
        count += p.shape[0]
        if count >= n:
            break
    out: Array = np.concatenate(found, axis=0)[:n]
    return out


def aorta_distance(anat: Anatomy, points: Array) -> Array:
    """Distance (mm) from points ``(N, 3)`` to the aortic wall (negative inside)."""
    path = np.asarray(anat.aorta_path(), dtype=np.float64)
    best = np.full(points.shape[0], np.inf)
    for p0, p1 in itertools.pairwise(path):
        v = p1 - p0
        w = points - p0
        t = np.clip((w @ v) / float(v @ v), 0.0, 1.0)
        d = np.linalg.norm(w - t[:, None] * v[None, :], axis=1)
        best = np.minimum(best, d)
    out: Array = best - anat.aorta_radius
    return out


# --------------------------------------------------------------------- branching trees
@dataclass(frozen=True)
class Segment:
    """One tube of a branching tree: centreline ``p0 -> p1``, radius ``r0 -> r1``.

    ``generation`` counts from the root (trachea 0, main bronchi 1, lobar 2, segmental 3);
    ``lobe`` is the lobe code of the segment's midpoint, or -1 outside the lungs.
    """

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    r0: float
    r1: float
    generation: int
    lobe: int

    @property
    def midpoint(self) -> tuple[float, float, float]:
        """Centre of the segment."""
        return (
            0.5 * (self.p0[0] + self.p1[0]),
            0.5 * (self.p0[1] + self.p1[1]),
            0.5 * (self.p0[2] + self.p1[2]),
        )

    @property
    def length(self) -> float:
        """Length of the centreline (mm)."""
        return math.dist(self.p0, self.p1)


def _lobes_of_points(anat: Anatomy, pts: Array) -> Array:
    """Lobe code of each point ``(N, 3)``, or -1 outside the lungs."""
    out: Array = np.full(pts.shape[0], -1, dtype=np.int64)
    for side in (RIGHT, LEFT):
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        inside = lung_depth(anat, side, x, y, z) > 0.0
        out = np.where(inside, lobe_index(anat, side, x, y, z), out)
    return out


def _finish_segments(
    anat: Anatomy, raw: list[tuple[Array, Array, float, float, int]]
) -> tuple[Segment, ...]:
    mids = np.array([0.5 * (p0 + p1) for p0, p1, _, _, _ in raw])
    lobes = _lobes_of_points(anat, mids)
    return tuple(
        Segment(
            (float(p0[0]), float(p0[1]), float(p0[2])),
            (float(p1[0]), float(p1[1]), float(p1[2])),
            float(r0),
            float(r1),
            gen,
            int(lobe),
        )
        for (p0, p1, r0, r1, gen), lobe in zip(raw, lobes, strict=True)
    )


@dataclass(frozen=True)
class _Pool:
    """Random points of one lung (targets of the growing branches) and their lobes."""

    points: Array
    lobes: Array

    def subset(self, lobes: tuple[int, ...] | None) -> Array:
        """The points in ``lobes`` (all points for ``None``)."""
        if lobes is None:
            return self.points
        if len(lobes) == 1:
            out: Array = self.points[self.lobes == lobes[0]]
            return out
        out = self.points[np.isin(self.lobes, lobes)]
        return out

    @staticmethod
    def of(anat: Anatomy, rng: np.random.Generator, side: int, n: int = 1500) -> _Pool:
        pts = sample_lung_points(anat, rng, side, n, min_depth=4.0, batch=2048, tries=10)
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        return _Pool(pts, lobe_index(anat, side, x, y, z))


_Raw = list[tuple[Array, Array, float, float, int]]


def _grow(
    rng: np.random.Generator,
    pool: _Pool,
    start: Array,
    heading: Array,
    radius: float,
    gen: int,
    max_gen: int,
    lobes: tuple[int, ...] | None,
    out: _Raw,
    children: int = 2,
    taper: float = 0.75,
    max_angle_deg: float = 65.0,
) -> None:
    """Grow ``children`` branches from ``start`` towards random targets in the lung."""
    if gen > max_gen:
        return
    pts = pool.subset(lobes)
    if pts.shape[0] == 0:
        return
    pts = pts[rng.integers(0, pts.shape[0], size=min(96, pts.shape[0]))]
    vec = pts - start[None, :]
    dist = np.linalg.norm(vec, axis=1)
    cos = (vec @ heading) / np.maximum(dist, 1e-6)
    ok = (cos > math.cos(math.radians(max_angle_deg))) & (dist > 12.0)
    cand, cdist = pts[ok], dist[ok]
    chosen: list[Array] = []
    cos_spread = math.cos(math.radians(25.0))
    for idx in range(cand.shape[0]):
        d = (cand[idx] - start) / cdist[idx]
        if all(float(d @ e) < cos_spread for e in chosen):
            chosen.append(d)
            length = float(cdist[idx]) * float(rng.uniform(0.35, 0.55))
            length = min(length, 70.0 * 0.72**gen + 15.0)
            end = start + d * length
            r1 = radius * taper
            out.append((start, end, radius, r1, gen))
            _grow(rng, pool, end, d, r1, gen + 1, max_gen, lobes, out, 2, taper, max_angle_deg)
        if len(chosen) >= children:
            break


def _unit(v: tuple[float, float, float]) -> Array:
    a = np.asarray(v, dtype=np.float64)
    out: Array = a / np.linalg.norm(a)
    return out


@lru_cache(maxsize=64)
def airway_tree(anat: Anatomy) -> tuple[Segment, ...]:
    """Trachea, main, lobar, segmental and subsegmental bronchi (deterministic in ``anat``)."""
    rng = np.random.default_rng([anat.seed, 1])
    tx, ty, tr = anat.trachea
    zc = anat.carina_z
    carina = np.array([tx, ty, zc])
    segs: _Raw = [(np.array([tx, ty, anat.z_apex + 120.0]), carina, tr, tr, 0)]
    pools = (_Pool.of(anat, rng, RIGHT), _Pool.of(anat, rng, LEFT))
    # Right: main bronchus, upper lobe, intermedius, middle and lower lobes.
    r_main_end = carina + _unit((-0.45, 0.1, -0.85)) * 22.0
    segs.append((carina, r_main_end, 0.72 * tr, 0.68 * tr, 1))
    rul_end = r_main_end + _unit((-0.75, 0.1, 0.65)) * 16.0
    segs.append((r_main_end, rul_end, 0.5 * tr, 0.48 * tr, 2))
    bi_end = r_main_end + _unit((-0.2, 0.15, -0.97)) * 24.0
    segs.append((r_main_end, bi_end, 0.6 * tr, 0.58 * tr, 2))
    rml_end = bi_end + _unit((-0.35, -0.8, -0.45)) * 16.0
    segs.append((bi_end, rml_end, 0.42 * tr, 0.4 * tr, 2))
    rll_end = bi_end + _unit((-0.2, 0.35, -0.9)) * 16.0
    segs.append((bi_end, rll_end, 0.5 * tr, 0.48 * tr, 2))
    # Left: main bronchus, upper and lower lobes.
    l_main_end = carina + _unit((0.75, 0.15, -0.65)) * 45.0
    segs.append((carina, l_main_end, 0.66 * tr, 0.62 * tr, 1))
    lul_end = l_main_end + _unit((0.55, -0.35, 0.75)) * 16.0
    segs.append((l_main_end, lul_end, 0.5 * tr, 0.48 * tr, 2))
    lll_end = l_main_end + _unit((0.3, 0.35, -0.9)) * 18.0
    segs.append((l_main_end, lll_end, 0.5 * tr, 0.48 * tr, 2))
    lobar = (
        (RIGHT, rul_end, (-0.6, 0.0, 0.8), 0, 3),
        (RIGHT, rml_end, (-0.4, -0.85, -0.3), 1, 2),
        (RIGHT, rll_end, (-0.15, 0.4, -0.9), 2, 3),
        (LEFT, lul_end, (0.5, -0.3, 0.8), 3, 4),
        (LEFT, lll_end, (0.2, 0.4, -0.9), 4, 3),
    )
    for side, end, heading, lobe, n in lobar:
        _grow(rng, pools[side], end, _unit(heading), 0.3 * tr, 3, 5, (lobe,), segs, n, 0.72, 80.0)
    return _finish_segments(anat, segs)


@lru_cache(maxsize=64)
def vessel_tree(anat: Anatomy) -> tuple[Segment, ...]:
    """Pulmonary arteries and veins from the hila (deterministic in ``anat``)."""
    rng = np.random.default_rng([anat.seed, 2])
    _tx, ty, _ = anat.trachea
    hx, hy, hz, ha, hb, hc = anat.heart
    trunk = np.array([anat.center_x + 12.0, ty - 22.0, anat.carina_z - 12.0])
    root_in = np.array([hx - 0.2 * ha, hy - 0.2 * hb, hz + 0.7 * hc])
    atrium = np.array([hx - 0.1 * ha, hy + 0.7 * hb, hz + 0.45 * hc])
    segs: _Raw = [(root_in, trunk, 13.0, 12.0, 0)]
    for side in (RIGHT, LEFT):
        pool = _Pool.of(anat, rng, side)
        cx, cy, a, b = anat.lung_ellipse(side)
        sign = -1.0 if side == RIGHT else 1.0
        medial = cx - sign * a
        hilum = np.array(
            [medial + sign * 14.0, cy - 0.15 * b, anat.z_base + 0.58 * anat.lung_height]
        )
        vein_hilum = np.array(
            [medial + sign * 12.0, cy - 0.05 * b, anat.z_base + 0.42 * anat.lung_height]
        )
        segs.append((trunk, hilum, 9.0, 8.0, 0))
        segs.append((atrium, vein_hilum, 8.0, 7.0, 0))
        for start, n in ((hilum, 3), (vein_hilum, 2)):
            heading = _unit((sign, 0.0, 0.0))
            _grow(rng, pool, start, heading, 6.0, 1, 5, None, segs, n, 0.72, 85.0)
    return _finish_segments(anat, segs)
