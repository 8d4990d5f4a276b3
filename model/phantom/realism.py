"""Generator 2: what makes a phantom look like a scanner's chest CT, where a model can tell.

Generator 1 (the original) draws clean analytic anatomy with white noise and a Gaussian
partial-volume blur. Generator 2 keeps its anatomy and findings and adds, each drawn at
random per case (:class:`Realism`, from its own random stream, so generator 1's cases are
unchanged):

* **Reconstruction kernel**: noise with the kernel's spatial correlation (smooth kernels:
  blotchy, low-pass noise; sharp kernels: fine, anti-correlated noise of higher standard
  deviation, and edge overshoot), at a per-case dose.
* **Partial volume** at 0.6-5 mm slices: the volume is rasterised on sub-slices of at most
  1.25 mm and integrated over each slice's thickness (a slab, not a point sample).
* **Lung parenchyma**: density shift and dependent gradient, fine and coarse texture with
  a realistic HU spread.
* **Vessels**: the pulmonary trees grown two generations further, tapering to sub-pixel
  branches that cross slices obliquely (the look-alikes of nodules).
* **Fissures**: the major fissures and the right minor fissure, thin, incomplete, at the
  lobe boundaries the findings use.
* **Mediastinum and hila**: oesophagus (with or without air), superior vena cava,
  mediastinal and hilar lymph nodes (soft tissue next to the lung that is not a finding).
* **Nodules**: some juxtapleural (abutting the chest wall), juxtavascular (touching a
  vessel) or subsolid (ground-glass or part-solid).
* **Body and field of view**: wider pixel and matrix ranges (fields of view 300-550 mm).
* **Vendor calibration**: HU offset and gain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage

from model.phantom.anatomy import (
    LEFT,
    LOBES,
    RIGHT,
    Anatomy,
    Array,
    Segment,
    _finish_segments,
    _grow,
    _Pool,
    lobe_index,
    lung_bbox,
    lung_depth,
    vessel_tree,
)
from model.phantom.findings import Lesion
from model.phantom.grid import Grid, _fit_pixel, _fov_grid
from model.phantom.raster import Blob, Block, block, edge_coverage, smooth_field

if TYPE_CHECKING:
    from model.phantom.case import CaseSpec

Kernel = Literal["smooth", "sharp"]

#: Finest sub-slice (mm) the volume is rasterised on before slab integration.
SUBSLICE_MM = 1.25
#: Generators :func:`model.phantom.generate` knows.
GENERATORS = (1, 2)


@dataclass(frozen=True)
class Realism:
    """The scanner and patient choices of generator 2 (mm, HU)."""

    seed: int
    kernel: Kernel
    noise_corr_mm: float
    noise_factor: float
    sharpen: float
    hu_offset: float
    hu_gain: float
    lung_shift_hu: float
    lung_gradient_hu: float
    texture_sd_hu: float
    texture_mm: float
    fissure_hu: float
    fissure_mm: float
    vessel_generations: int
    oesophagus_radius: float
    oesophagus_air: bool
    svc_radius: float
    mediastinal_nodes: int
    hilar_nodes: int
    juxtapleural: float
    juxtavascular: float
    subsolid: float


def sample_realism(seed: int) -> Realism:
    """Draw the generator-2 choices of case ``seed`` (a stream of its own)."""
    rng = np.random.default_rng([seed, 0x2EA1])
    kernel: Kernel = "sharp" if rng.random() < 0.4 else "smooth"
    sharp = kernel == "sharp"
    return Realism(
        seed=int(rng.integers(0, 2**31 - 1)),
        kernel=kernel,
        noise_corr_mm=float(rng.uniform(0.35, 0.6) if sharp else rng.uniform(0.7, 1.4)),
        noise_factor=float(rng.uniform(1.4, 2.4) if sharp else rng.uniform(0.6, 1.1)),
        sharpen=float(rng.uniform(0.3, 0.9)) if sharp else 0.0,
        hu_offset=float(rng.uniform(-25.0, 25.0)),
        hu_gain=float(rng.uniform(0.97, 1.03)),
        lung_shift_hu=float(rng.uniform(-30.0, 45.0)),
        lung_gradient_hu=float(rng.uniform(0.0, 70.0)),
        texture_sd_hu=float(rng.uniform(12.0, 35.0)),
        texture_mm=float(rng.uniform(2.0, 4.5)),
        fissure_hu=float(rng.uniform(-720.0, -420.0)),
        fissure_mm=float(rng.uniform(0.7, 1.6)),
        vessel_generations=int(rng.integers(6, 8)),
        oesophagus_radius=float(rng.uniform(7.0, 11.0)),
        oesophagus_air=bool(rng.random() < 0.6),
        svc_radius=float(rng.uniform(8.0, 12.0)),
        mediastinal_nodes=int(rng.integers(0, 6)),
        hilar_nodes=int(rng.integers(0, 4)),
        juxtapleural=0.3,
        juxtavascular=0.25,
        subsolid=0.2,
    )


# ------------------------------------------------------------------ nodules


def _closest_on_segment(seg: Segment, p: Array) -> tuple[Array, float]:
    a, b = np.asarray(seg.p0), np.asarray(seg.p1)
    v = b - a
    t = float(np.clip((p - a) @ v / max(float(v @ v), 1e-9), 0.0, 1.0))
    return a + t * v, seg.r0 + t * (seg.r1 - seg.r0)


def _same_place(anat: Anatomy, lesion: Lesion, p: Array, margin: float) -> bool:
    side = lesion.side
    x, y, z = (np.array([float(v)]) for v in p)
    if float(lung_depth(anat, side, x, y, z)[0]) <= margin:
        return False
    return LOBES[int(lobe_index(anat, side, x, y, z)[0])] == lesion.location


def _juxtapleural(anat: Anatomy, lesion: Lesion) -> Lesion:
    """The nodule moved outwards until it abuts the pleura (same lobe), when it can."""
    cx, cy, _, _ = anat.lung_ellipse(lesion.side)
    p = np.asarray(lesion.center_lps, dtype=np.float64)
    direction = np.array([p[0] - cx, p[1] - cy, 0.0])
    if np.linalg.norm(direction) < 1e-6:
        return lesion
    direction /= np.linalg.norm(direction)
    radius = lesion.extent_mm[0]
    best = p
    for step in np.arange(2.0, 150.0, 2.0):
        q = p + direction * step
        x, y, z = (np.array([float(v)]) for v in q)
        depth = float(lung_depth(anat, lesion.side, x, y, z)[0])
        if depth < 0.6 * radius:
            break
        best = q
    if best is p or not _same_place(anat, lesion, best, 0.0):
        return lesion
    return replace(
        lesion, center_lps=(float(best[0]), float(best[1]), float(best[2])), kind="juxtapleural"
    )


def _juxtavascular(anat: Anatomy, lesion: Lesion, vessels: tuple[Segment, ...]) -> Lesion:
    """The nodule moved beside the nearest mid-sized vessel (same lobe), when it can."""
    p = np.asarray(lesion.center_lps, dtype=np.float64)
    candidates = [
        s for s in vessels if 2 <= s.generation <= 5 and s.lobe >= 0 and max(s.r0, s.r1) >= 1.0
    ]
    if not candidates:
        return lesion
    seg = min(candidates, key=lambda s: math.dist(s.midpoint, lesion.center_lps))
    on, r = _closest_on_segment(seg, p)
    away = p - on
    norm = float(np.linalg.norm(away))
    if norm < 1e-6:
        away, norm = np.array([0.0, 0.0, 1.0]), 1.0
    q = on + away / norm * (r + 0.7 * lesion.extent_mm[0])
    if not _same_place(anat, lesion, q, 1.0):
        return lesion
    return replace(lesion, center_lps=(float(q[0]), float(q[1]), float(q[2])), kind="juxtavascular")


def adjust_nodules(
    anat: Anatomy, lesions: tuple[Lesion, ...], realism: Realism
) -> tuple[Lesion, ...]:
    """Make some nodules juxtapleural, juxtavascular or subsolid (deterministic)."""
    rng = np.random.default_rng([realism.seed, 3])
    vessels = vessel_tree(anat)
    out = []
    for lesion in lesions:
        if lesion.label != "nodule":
            out.append(lesion)
            continue
        u = rng.random()
        if u < realism.juxtapleural:
            lesion = _juxtapleural(anat, lesion)
        elif u < realism.juxtapleural + realism.juxtavascular:
            lesion = _juxtavascular(anat, lesion, vessels)
        if rng.random() < realism.subsolid:
            lesion = replace(lesion, kind=(lesion.kind + " subsolid").strip())
        out.append(lesion)
    return tuple(out)


# ------------------------------------------------------------------ grids


def _subslices(slice_spacing: float) -> int:
    return max(1, math.ceil(slice_spacing / SUBSLICE_MM - 1e-6))


def grid_v2(spec: CaseSpec, rng: np.random.Generator, kind: str) -> Grid:
    """The output grid of a generator-2 case: wider fields of view, slices 0.6-5 mm.

    ``kind`` ``"training"``: matrix 160-224, 1.6-2.8 mm pixels (coarse, fast);
    ``"realistic"``: 512 x 512, 0.55-0.98 mm pixels. Thin slices are less likely on the
    training grid (they cost render time).
    """
    anat = spec.anatomy
    x_half, y_lo, y_hi = anat.body_extent_xy()
    needed = max(2.0 * x_half, y_hi - y_lo) + 20.0
    if kind == "training":
        matrix = int(rng.integers(20, 29)) * 8
        pixel = _fit_pixel(needed, matrix, 1.6, 2.8, rng)
        if matrix * pixel < needed:
            matrix = math.ceil(needed / pixel / 8.0) * 8
        spacing = float(
            rng.choice(
                (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 4.0, 5.0),
                p=(0.04, 0.05, 0.08, 0.13, 0.2, 0.15, 0.15, 0.2),
            )
        )
        z_pad = (10.0, 30.0)
    else:
        matrix = 512
        pixel = _fit_pixel(needed, matrix, 0.55, 0.98, rng)
        spacing = float(rng.choice((0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)))
        z_pad = (20.0, 50.0)
    thickness = spacing
    if rng.random() < 0.35:
        thickness = min(5.0, spacing * float(rng.uniform(1.0, 2.0)))
    z_lo = anat.z_base - float(rng.uniform(*z_pad))
    z_hi = anat.z_apex + float(rng.uniform(*z_pad))
    return _fov_grid(spec, rng, matrix, pixel, z_lo, z_hi, spacing, round(thickness, 3))


def fine_grid(grid: Grid) -> tuple[Grid, int]:
    """The sub-slice grid a generator-2 case is rasterised on, and the sub-slices per slice."""
    k = _subslices(grid.slice_spacing)
    fine_spacing = grid.slice_spacing / k
    x, y, z = grid.origin_lps
    # Sub-slices fill [z - s/2, z + s/2] of every slice; rasterise a margin for thick slabs.
    margin = math.ceil(max(0.0, grid.slice_thickness - grid.slice_spacing) / 2.0 / fine_spacing)
    z0 = z - grid.slice_spacing / 2.0 + fine_spacing / 2.0 - margin * fine_spacing
    depth = grid.shape[0] * k + 2 * margin
    fine = Grid(
        shape=(depth, grid.shape[1], grid.shape[2]),
        pixel_spacing=grid.pixel_spacing,
        slice_spacing=fine_spacing,
        slice_thickness=fine_spacing,
        origin_lps=(x, y, z0),
    )
    return fine, k


def slab_weights(grid: Grid, k: int) -> Array:
    """``(taps,)`` weights of the sub-slices integrated into one slice (its thickness)."""
    fine = grid.slice_spacing / k
    margin = math.ceil(max(0.0, grid.slice_thickness - grid.slice_spacing) / 2.0 / fine)
    n = k + 2 * margin
    centres = (np.arange(n) - (n - 1) / 2.0) * fine
    half = grid.slice_thickness / 2.0
    lo = np.clip(centres - fine / 2.0, -half, half)
    hi = np.clip(centres + fine / 2.0, -half, half)
    w = np.maximum(hi - lo, 0.0)
    out: Array = (w / w.sum()).astype(np.float32)
    return out


def integrate_slabs(fine: Array, grid: Grid, k: int) -> Array:
    """Fine ``(D*k + 2m, H, W)`` -> ``(D, H, W)``: each slice the weighted slab of its thickness."""
    w = slab_weights(grid, k)
    n = w.shape[0]
    out = np.zeros(grid.shape, dtype=np.float32)
    for tap in range(n):
        if w[tap] > 0:
            out += np.float32(w[tap]) * fine[tap : tap + grid.shape[0] * k : k][: grid.shape[0]]
    return out


# ------------------------------------------------------------------ painting


@lru_cache(maxsize=32)
def peripheral_vessels(anat: Anatomy, generations: int) -> tuple[Segment, ...]:
    """Branches grown from the tips of :func:`vessel_tree` up to ``generations``."""
    tree = vessel_tree(anat)
    tips = [s for s in tree if s.generation == 5]
    if generations <= 5 or not tips:
        return ()
    rng = np.random.default_rng([anat.seed, 0x7E55])
    pools = (_Pool.of(anat, rng, RIGHT, 1200), _Pool.of(anat, rng, LEFT, 1200))
    raw: list[tuple[Array, Array, float, float, int]] = []
    for tip in tips:
        side = RIGHT if tip.p1[0] < anat.center_x else LEFT
        start, end = np.asarray(tip.p0), np.asarray(tip.p1)
        heading = end - start
        heading = heading / max(float(np.linalg.norm(heading)), 1e-6)
        _grow(rng, pools[side], end, heading, tip.r1, 6, generations, None, raw, 2, 0.75, 60.0)
    return _finish_segments(anat, raw) if raw else ()


def lung_texture(seed: int, blk: Block, realism: Realism) -> Array:
    """Fine and coarse parenchymal texture (HU) over a block."""
    fine = smooth_field(seed ^ 0x51, blk, realism.texture_mm)
    coarse = smooth_field(seed ^ 0x52, blk, realism.texture_mm * 3.0)
    out: Array = (0.75 * fine + 0.55 * coarse) * np.float32(realism.texture_sd_hu)
    return out


def fissure_coverage(anat: Anatomy, side: int, blk: Block, realism: Realism, soft: float) -> Array:
    """Coverage of the fissures of one lung over a block (lobe boundaries of :func:`lobe_index`)."""
    _, cy, _, b = anat.lung_ellipse(side)
    height = anat.lung_height
    t = (blk.z - anat.z_base) / height
    v = np.clip((blk.y - cy) / b, -1.0, 1.0)
    f = t - (0.42 + 0.22 * v)
    dist = np.abs(f) / math.sqrt((1.0 / height) ** 2 + (0.22 / b) ** 2)
    cov = edge_coverage(np.float32(realism.fissure_mm / 2.0) - dist.astype(np.float32), soft)
    if side == RIGHT:
        minor = (f >= 0) & (v < 0.15)
        d_minor = np.abs(t - 0.56) * height
        cov_minor = edge_coverage(
            np.float32(realism.fissure_mm / 2.0) - d_minor.astype(np.float32), soft
        )
        cov = np.maximum(cov, cov_minor * minor)
    # Fissures are often incomplete: gaps where a smooth field is low.
    gaps = smooth_field(realism.seed ^ (0x61 + side), blk, 25.0) > -0.9
    out: Array = cov * gaps
    return out


def _path_tube(points: list[tuple[float, float, float]], radius: float) -> list[Segment]:
    return [
        Segment(points[i], points[i + 1], radius, radius, 0, -1) for i in range(len(points) - 1)
    ]


def oesophagus(anat: Anatomy, realism: Realism) -> list[Segment]:
    """The oesophagus: behind the trachea, left of it, down to the hiatus."""
    tx, ty, tr = anat.trachea
    sx, sy = anat.spine_center
    r = realism.oesophagus_radius
    y_top = min(ty + tr + 0.6 * r, sy - anat.spine_radius - r)
    points = [
        (tx + 0.7 * tr, y_top, anat.z_apex + 100.0),
        (tx + 0.8 * tr, y_top + 2.0, anat.carina_z),
        (sx + 6.0, sy - anat.spine_radius - r - 6.0, anat.z_base + 40.0),
        (sx + 18.0, sy - anat.spine_radius - r - 20.0, anat.z_base - 60.0),
    ]
    return _path_tube(points, r)


def svc(anat: Anatomy, realism: Realism) -> list[Segment]:
    """The superior vena cava, right of the ascending aorta, down to the heart."""
    path = anat.aorta_path()
    ax, ay, _ = path[1]
    _, _, hz, _, _, hc = anat.heart
    x = ax - anat.aorta_radius - realism.svc_radius - 4.0
    return _path_tube(
        [(x, ay + 4.0, anat.z_apex + 60.0), (x + 2.0, ay + 8.0, hz + 0.7 * hc)], realism.svc_radius
    )


def lymph_nodes(anat: Anatomy, realism: Realism) -> list[Blob]:
    """Mediastinal nodes around the trachea and carina, and hilar nodes at the lung roots."""
    rng = np.random.default_rng([realism.seed, 4])
    tx, ty, tr = anat.trachea
    out = []
    for _ in range(realism.mediastinal_nodes):
        centre = (
            tx + float(rng.uniform(-1.5, 1.5)) * (tr + 8.0),
            ty + float(rng.uniform(-1.8, 0.6)) * (tr + 6.0),
            anat.carina_z + float(rng.uniform(-30.0, 40.0)),
        )
        r = float(rng.uniform(3.0, 7.0))
        out.append(Blob.random(rng, centre, (r, r * 0.8, r * 1.2), 0.1))
    for side in (RIGHT, LEFT):
        cx, cy, a, b = anat.lung_ellipse(side)
        sign = -1.0 if side == RIGHT else 1.0
        medial = cx - sign * a
        for _ in range(realism.hilar_nodes):
            centre = (
                medial + sign * float(rng.uniform(4.0, 18.0)),
                cy + float(rng.uniform(-0.3, 0.2)) * b,
                anat.z_base + float(rng.uniform(0.45, 0.62)) * anat.lung_height,
            )
            r = float(rng.uniform(4.0, 8.0))
            out.append(Blob.random(rng, centre, (r, r * 0.85, r * 1.1), 0.15))
    return out


def lung_boxes(anat: Anatomy, grid: Grid) -> list[tuple[int, Block]]:
    """The grid blocks of the two lungs' bounding boxes."""
    out = []
    for side in (RIGHT, LEFT):
        (x0, x1), (y0, y1), (z0, z1) = lung_bbox(anat, side)
        blk = block(grid, (x0, y0, z0), (x1, y1, z1))
        if blk is not None:
            out.append((side, blk))
    return out


# ------------------------------------------------------------------ noise and calibration


def kernel_filter(realism: Realism, pixel_mm: float) -> Callable[[Array], Array]:
    """The in-plane filter turning white noise into the kernel's noise (unit variance)."""
    sigma = realism.noise_corr_mm / pixel_mm

    def apply(slices: Array) -> Array:
        out = np.empty_like(slices)
        for i in range(slices.shape[0]):
            smooth = ndimage.gaussian_filter(slices[i], sigma, mode="wrap")
            if realism.kernel == "sharp":
                # Ramp-like: white noise less a share of its low-pass (fine grain).
                out[i] = slices[i] - 0.8 * ndimage.gaussian_filter(
                    slices[i], max(sigma, 0.8) * 2.0, mode="wrap"
                )
                out[i] = 0.5 * out[i] + 0.5 * smooth
            else:
                out[i] = smooth
        sd = float(out.std())
        out /= np.float32(sd if sd > 0 else 1.0)
        return out

    return apply


def sharpen_slice(plane: Array, realism: Realism, pixel_mm: float) -> None:
    """Edge overshoot of a sharp kernel, in place (unsharp mask)."""
    if realism.sharpen <= 0:
        return
    blurred = ndimage.gaussian_filter(plane, max(0.6, 0.9 / pixel_mm))
    plane += np.float32(realism.sharpen) * (plane - blurred)
