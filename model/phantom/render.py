"""Rendering a :class:`~model.phantom.case.CaseSpec` on a :class:`~model.phantom.grid.Grid`.

Painter's order: body wall and abdomen (z-invariant sections), table, spine, ribs and
sternum, heart, lungs, aorta, pulmonary vessels, airways, pleural fluid, then the lung
findings clipped to the aerated lung. Finally partial-volume blur along z (slice
thickness) and Gaussian noise scaled by ``1 / sqrt(voxel volume)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from model.labels import LABEL_KEYS
from model.phantom.anatomy import (
    LEFT,
    LOBES,
    RIGHT,
    Array,
    Fluid,
    Segment,
    airway_tree,
    diaphragm_z,
    ellipse_depth,
    lobe_index,
    lung_bbox,
    lung_depth,
    lung_inside,
    vessel_tree,
)
from model.phantom.case import CaseSpec, Phantom
from model.phantom.findings import PAINT_ORDER, Lesion, fluid_of
from model.phantom.grid import Grid
from model.phantom.raster import (
    Blob,
    Block,
    block,
    edge_coverage,
    smooth_field,
    tube,
    tube_distance,
)
from model.phantom.realism import (
    Realism,
    fine_grid,
    fissure_coverage,
    integrate_slabs,
    kernel_filter,
    lung_boxes,
    lung_texture,
    lymph_nodes,
    oesophagus,
    peripheral_vessels,
    sharpen_slice,
    svc,
)
from model.phantom.reports import compose_report

AIR_HU = -1024.0


@dataclass(frozen=True, eq=False)
class Regions:
    """Anatomical regions of a rendered case (for tests and QA).

    ``body`` is ``(H, W)`` (the body section is z-invariant); ``lungs`` (aerated lung) and
    ``pleura`` (the lungs' pleural cavities, fluid included) are ``(D, H, W)``.
    """

    body: npt.NDArray[np.bool_]
    lungs: npt.NDArray[np.bool_]
    pleura: npt.NDArray[np.bool_]


class _Canvas:
    """The volumes being painted."""

    def __init__(self, spec: CaseSpec, grid: Grid) -> None:
        self.spec = spec
        self.realism: Realism | None = spec.realism
        self.anat = spec.anatomy
        self.grid = grid
        self.hu = np.empty(grid.shape, dtype=np.float32)
        self.lung = np.zeros(grid.shape, dtype=np.bool_)
        self.pleura = np.zeros(grid.shape, dtype=np.bool_)
        self.masks = np.zeros((len(LABEL_KEYS), *grid.shape), dtype=np.uint8)
        self.z = grid.axis_mm(0)
        self.y2 = grid.axis_mm(1)[:, None]
        self.x2 = grid.axis_mm(2)[None, :]
        self.pixel = float(min(grid.pixel_spacing))
        self.soft = max(self.pixel, 0.5)
        self.fluids = tuple(
            fluid_of(les) for les in spec.lesions if les.label == "pleural_effusion"
        )
        self.fluid_masks: list[tuple[int, Block, Array]] = []
        ccx, ccy, ca, cb = self.anat.cavity
        self.cavity2d = ellipse_depth(self.x2 - ccx, self.y2 - ccy, ca, cb) > 0.0

    def blend(self, blk: Block, cov: Array, value: float | Array) -> None:
        view = self.hu[blk.index]
        view += cov * (value - view)

    def fluid_for(self, side: int) -> Fluid | None:
        return next((f for f in self.fluids if f.side == side), None)


# ---------------------------------------------------------------------------- anatomy
def _paint_body(c: _Canvas) -> npt.NDArray[np.bool_]:
    a = c.anat
    x2, y2 = c.x2, c.y2
    outer = ellipse_depth(x2 - a.center_x, y2 - a.center_y, a.body_a, a.body_b)
    ccx, ccy, ca, cb = a.cavity
    cav = ellipse_depth(x2 - ccx, y2 - ccy, ca, cb)
    section = np.full(outer.shape, AIR_HU, dtype=np.float32)
    section[outer > 0] = a.muscle_hu
    section[(outer > 0) & (outer <= 2.0 + a.fat_mm)] = a.fat_hu
    section[(outer > 0) & (outer <= 2.0)] = 25.0
    table = np.zeros(outer.shape, dtype=np.bool_)
    if a.table:
        top = a.center_y + a.body_b + a.table_gap
        dy = y2 - top
        wide = np.abs(x2 - a.center_x) < a.body_a + 50.0
        shell = wide & (((dy >= 0) & (dy < 3.0)) | ((dy >= 11.0) & (dy < 14.0)))
        foam = wide & (dy >= 3.0) & (dy < 11.0)
        section = np.where(shell, np.float32(250.0), np.where(foam, np.float32(-850.0), section))
        table = shell | foam
    above = np.where(cav > 0, np.float32(a.fat_hu + 25.0), section).astype(np.float32)
    abdomen = np.where(x2 < a.center_x, np.float32(58.0), np.float32(45.0))
    below = np.where(cav > 0, abdomen, section).astype(np.float32)
    dome = diaphragm_z(a, x2, y2).astype(np.float32)
    for i, z in enumerate(c.z):
        c.hu[i] = np.where(dome > z, below, above)
    body: npt.NDArray[np.bool_] = (outer > 0) | table
    return body


def _paint_spine(c: _Canvas) -> None:
    a = c.anat
    sx, sy = a.spine_center
    r = a.spine_radius
    blk = block(
        c.grid, (sx - r - 30.0, sy - r - 2.0, c.z[0]), (sx + r + 30.0, sy + r + 60.0, c.z[-1])
    )
    if blk is None:
        return
    x, y = blk.x[0], blk.y[0]
    d_body = r - np.sqrt((x - sx) ** 2 + (y - sy) ** 2)
    canal_y = sy + r + 9.0
    d_canal = 7.5 - np.sqrt((x - sx) ** 2 + (y - canal_y) ** 2)
    arch = ellipse_depth(x - sx, y - (sy + r + 14.0), 0.9 * r + 4.0, 15.0)
    spinous = ellipse_depth(x - sx, y - (sy + r + 36.0), 5.0, 20.0)
    bone = np.full(d_body.shape, np.nan, dtype=np.float32)
    posterior = (arch > 0) | (spinous > 0)
    bone[posterior] = 450.0
    bone[d_canal > 0] = 10.0
    vert = bone.copy()
    vert[d_body > 0] = 250.0
    vert[(d_body > 0) & (d_body < 2.0)] = 700.0
    disc = bone.copy()
    disc[d_body > 0] = 90.0
    phase = np.mod(blk.z[:, 0, 0] - a.z_base, a.vertebra_mm)
    is_disc = phase < 6.0
    view = c.hu[blk.index]
    for i in range(view.shape[0]):
        pattern = disc if is_disc[i] else vert
        np.copyto(view[i], pattern, where=~np.isnan(pattern))


def _paint_ribs(c: _Canvas) -> None:
    a = c.anat
    ccx, ccy, ca, cb = a.cavity
    hr, hz = 3.5, 6.0
    dr = ellipse_depth(c.x2 - ccx, c.y2 - ccy, ca, cb) + 4.0 + hr
    theta = np.arctan2((c.y2 - ccy) / cb, (c.x2 - ccx) / ca)
    sin_t = np.sin(theta)
    sx, _ = a.spine_center
    arc = ~(sin_t < -0.8) & ~((sin_t > 0) & (np.abs(c.x2 - sx) < a.spine_radius + 12.0))
    ring = (np.abs(dr) <= hr) & arc
    jj, kk = np.nonzero(ring)
    if jj.size == 0:
        return
    drop = (a.rib_drop * (1.0 - sin_t) / 2.0)[jj, kk].astype(np.float32)
    drn = (dr[jj, kk] / hr).astype(np.float32)
    z_top = a.z_apex + 5.0
    u = c.z[:, None] + drop[None, :]
    k = np.rint((z_top - u) / a.rib_spacing)
    dz = (u - (z_top - k * a.rib_spacing)) / hz
    q = dz * dz + drn[None, :] ** 2
    inside = (k >= 0) & (k < 12) & (q <= 1.0)
    values = np.where(q > 0.4, np.float32(700.0), np.float32(250.0))
    current = c.hu[:, jj, kk]
    c.hu[:, jj, kk] = np.where(inside, values, current)


def _paint_sternum(c: _Canvas) -> None:
    a = c.anat
    ccx, ccy, _, cb = a.cavity
    y0 = ccy - cb - 7.0
    z_lo, z_hi = a.z_base + 0.2 * a.lung_height, a.z_apex - 10.0
    blk = block(c.grid, (ccx - 20.0, y0 - 8.0, z_lo), (ccx + 20.0, y0 + 8.0, z_hi))
    if blk is None:
        return
    d = ellipse_depth(blk.x[0] - ccx, blk.y[0] - y0, 16.0, 6.0)
    pattern = np.where(d > 1.5, np.float32(200.0), np.float32(550.0))
    view = c.hu[blk.index]
    np.copyto(view, np.broadcast_to(pattern, view.shape), where=np.broadcast_to(d > 0, view.shape))


def _paint_heart(c: _Canvas) -> None:
    a = c.anat
    hx, hy, hz, ha, hb, hc = a.heart
    for pad, value in ((3.0, a.fat_hu + 10.0), (0.0, 40.0), (-9.0, a.blood_hu)):
        if pad < 0 and not a.contrast:
            continue
        blob = Blob(
            (hx, hy, hz), (ha + pad, hb + pad, hc + pad), np.eye(3), np.zeros((0, 3)), np.zeros(0)
        )
        got = blob.coverage(c.grid, c.soft)
        if got is not None:
            c.blend(got[0], got[1], value)


def _paint_lungs(c: _Canvas) -> None:
    a = c.anat
    texture_amp = 12.0
    for side in (RIGHT, LEFT):
        (x0, x1), (y0, y1), (z0, z1) = lung_bbox(a, side)
        blk = block(c.grid, (x0, y0, z0), (x1, y1, z1))
        if blk is None:
            continue
        fluid = c.fluid_for(side)
        if fluid is None:
            cavity = lung = lung_inside(a, side, blk.x, blk.y, blk.z)[0]
        else:
            cavity, aerated = lung_inside(a, side, blk.x, blk.y, blk.z, (None, fluid))
            lung = aerated & cavity
        c.pleura[blk.index] |= cavity
        c.lung[blk.index] |= lung
        if fluid is not None:
            c.fluid_masks.append((side, blk, cavity & ~lung))
        dep = np.clip((blk.y - y0) / (y1 - y0), 0.0, 1.0) ** 2 * np.float32(a.lung_gradient_hu)
        tex = smooth_field(a.seed, blk, 9.0) * np.float32(texture_amp)
        value = np.float32(a.lung_hu) + dep + tex
        view = c.hu[blk.index]
        np.copyto(view, value, where=cavity)


def _paint_tube(
    c: _Canvas, seg: Segment, value: float, extra: float, clip: str
) -> tuple[Block, Array] | None:
    got = tube(c.grid, seg.p0, seg.p1, seg.r0 + extra, seg.r1 + extra, c.soft)
    if got is None:
        return None
    blk, cov = got
    if clip == "lung":
        cov = cov * c.lung[blk.index]
    elif clip == "cavity":
        cov = cov * c.cavity2d[blk.index[1], blk.index[2]][None]
    c.blend(blk, cov, value)
    return blk, cov


def _paint_aorta(c: _Canvas) -> None:
    a = c.anat
    path = a.aorta_path()
    value = a.blood_hu
    for p0, p1 in itertools.pairwise(path):
        seg = Segment(p0, p1, a.aorta_radius, a.aorta_radius, 0, -1)
        got = _paint_tube(c, seg, value, 0.0, "none")
        if got is not None:
            blk, cov = got
            c.lung[blk.index] &= cov < 0.5


def _paint_vessels(c: _Canvas) -> None:
    value = 0.8 * c.anat.blood_hu if c.anat.contrast else c.anat.blood_hu
    for seg in vessel_tree(c.anat):
        if seg.generation >= 2 and max(seg.r0, seg.r1) < 0.25 * c.pixel:
            continue
        _paint_tube(c, seg, value, 0.0, "cavity")


def _paint_airways(c: _Canvas) -> None:
    clip = c.cavity2d
    for seg in airway_tree(c.anat):
        wall = float(np.clip(0.18 * seg.r0, 0.9, 2.0))
        got = tube_distance(c.grid, seg.p0, seg.p1, seg.r0, seg.r1, wall + c.soft)
        if got is None:
            continue
        blk, signed = got
        inside = clip[blk.index[1], blk.index[2]][None]
        c.blend(blk, edge_coverage(signed + np.float32(wall), c.soft) * inside, 35.0)
        c.blend(blk, edge_coverage(signed, c.soft) * inside, -1000.0)


def _paint_fluid(c: _Canvas, lesions: list[Lesion]) -> bool:
    """Paint the pleural fluid of the effusions; whether any voxel was filled."""
    k = LABEL_KEYS.index("pleural_effusion")
    filled = False
    for les in lesions:
        value = float(np.random.default_rng(les.seed).uniform(0.0, 20.0))
        for side, blk, fluid in c.fluid_masks:
            if side == les.side and fluid.any():
                view = c.hu[blk.index]
                np.copyto(view, np.float32(value), where=fluid)
                c.masks[k][blk.index] |= fluid.astype(np.uint8)
                filled = True
    return filled


# ---------------------------------------------------------------------------- generator 2
def _paint_parenchyma(c: _Canvas, r: Realism) -> None:
    """Density shift, dependent gradient and texture of the aerated lung."""
    for side, blk in lung_boxes(c.anat, c.grid):
        lung = c.lung[blk.index]
        if not lung.any():
            continue
        (_, _), (y0, y1), (_, _) = lung_bbox(c.anat, side)
        dep = np.clip((blk.y - y0) / (y1 - y0), 0.0, 1.0) ** 2 * np.float32(r.lung_gradient_hu)
        add = np.float32(r.lung_shift_hu) + dep + lung_texture(r.seed + side, blk, r)
        view = c.hu[blk.index]
        view += np.where(lung, add, np.float32(0.0))


def _paint_fissures(c: _Canvas, r: Realism) -> None:
    for side, blk in lung_boxes(c.anat, c.grid):
        lung = c.lung[blk.index]
        if lung.any():
            cov = fissure_coverage(c.anat, side, blk, r, c.soft) * lung
            c.blend(blk, cov, r.fissure_hu)


def _paint_mediastinum(c: _Canvas, r: Realism) -> None:
    """Oesophagus (air in its lumen or collapsed) and superior vena cava."""
    for seg in oesophagus(c.anat, r):
        got = _paint_tube(c, seg, 35.0, 0.0, "cavity")
        if got is not None:
            blk, cov = got
            c.lung[blk.index] &= cov < 0.5
        lumen = Segment(seg.p0, seg.p1, 0.4 * seg.r0, 0.4 * seg.r1, 0, -1)
        _paint_tube(c, lumen, -1000.0 if r.oesophagus_air else 15.0, 0.0, "cavity")
    for seg in svc(c.anat, r):
        got = _paint_tube(c, seg, c.anat.blood_hu, 0.0, "cavity")
        if got is not None:
            blk, cov = got
            c.lung[blk.index] &= cov < 0.5


def _paint_peripheral_vessels(c: _Canvas, r: Realism) -> None:
    value = 0.8 * c.anat.blood_hu if c.anat.contrast else c.anat.blood_hu
    for seg in peripheral_vessels(c.anat, r.vessel_generations):
        if max(seg.r0, seg.r1) < 0.2 * c.pixel:
            continue
        _paint_tube(c, seg, value, 0.0, "lung")


def _paint_nodes(c: _Canvas, r: Realism) -> None:
    """Mediastinal and hilar lymph nodes: soft tissue beside the lung, not a finding."""
    for blob in lymph_nodes(c.anat, r):
        got = blob.coverage(c.grid, c.soft)
        if got is None:
            continue
        blk, cov = got
        cov = cov * c.cavity2d[blk.index[1], blk.index[2]][None]
        c.blend(blk, cov, 38.0)
        c.lung[blk.index] &= cov < 0.5


# ---------------------------------------------------------------------------- findings
def _airway_children(segs: tuple[Segment, ...], parent: Segment) -> list[Segment]:
    out = [parent]
    frontier = [parent]
    while frontier:
        cur = frontier.pop()
        for s in segs:
            if s.generation == cur.generation + 1 and math.dist(s.p0, cur.p1) < 1e-6:
                out.append(s)
                frontier.append(s)
    return out


def _lesion_blob(les: Lesion, rng: np.random.Generator, lobulation: float) -> Blob:
    e = les.extent_mm
    return Blob.random(rng, les.center_lps, (e[0], e[1], e[2]), lobulation)


def _clip(c: _Canvas, blk: Block, cov: Array) -> tuple[Array, Array]:
    lung = c.lung[blk.index]
    return cov * lung, (cov > 0.5) & lung


def _render_lesion(c: _Canvas, les: Lesion) -> list[tuple[Block, Array]]:
    """Paint one lesion; return its mask pieces."""
    rng = np.random.default_rng(les.seed)
    label = les.label
    pieces: list[tuple[Block, Array]] = []
    if label == "nodule":
        got = _lesion_blob(les, rng, float(rng.uniform(0.05, 0.25))).coverage(c.grid, c.soft)
        if got:
            blk, cov = got
            cov, mask = _clip(c, blk, cov)
            solid_hu = float(rng.uniform(0.0, 60.0))
            if "subsolid" in les.kind:
                # Ground-glass or part-solid: hazy, below soft tissue, with texture.
                sub = np.random.default_rng([les.seed, 5])
                haze = np.float32(sub.uniform(-680.0, -320.0))
                value_field = haze + smooth_field(les.seed, blk, 2.5) * np.float32(60.0)
                view = c.hu[blk.index]
                view += cov * np.maximum(value_field - view, 0.0)
            else:
                c.blend(blk, cov, solid_hu)
            pieces.append((blk, mask))
    elif label == "ground_glass_opacity":
        got = _lesion_blob(les, rng, 0.3).coverage(c.grid, max(c.soft, 4.0))
        if got:
            blk, cov = got
            cov, mask = _clip(c, blk, cov)
            view = c.hu[blk.index]
            view += cov * np.maximum(np.float32(rng.uniform(-700.0, -450.0)) - view, 0.0)
            pieces.append((blk, mask))
    elif label == "emphysema":
        got = _lesion_blob(les, rng, 0.3).coverage(c.grid, max(c.soft, 2.0))
        if got:
            blk, cov = got
            cov, mask = _clip(c, blk, cov)
            view = c.hu[blk.index]
            cov = cov * (view < -500.0)
            value = np.float32(rng.uniform(-1000.0, -950.0)) + smooth_field(
                les.seed, blk, 4.0
            ) * np.float32(8.0)
            view += cov * (value - view)
            pieces.append((blk, mask))
    elif label == "consolidation":
        got = _lesion_blob(les, rng, 0.25).coverage(c.grid, max(c.soft, 1.5))
        if got:
            blk, cov = got
            cov, mask = _clip(c, blk, cov)
            lobe = LOBES.index(les.location)
            in_lobe = lobe_index(c.anat, les.side, blk.x, blk.y, blk.z) == lobe
            cov, mask = cov * in_lobe, mask & in_lobe
            c.blend(blk, cov, float(rng.uniform(0.0, 50.0)))
            if rng.random() < 0.6:
                _air_bronchograms(c, les, rng, blk, mask)
            pieces.append((blk, mask))
    elif label == "septal_thickening":
        pieces += _septal(c, les, rng)
    elif label == "micronodules":
        pieces += _micronodules(c, les, rng)
    elif label == "linear_opacities":
        pieces += _linear(c, les, rng)
    elif label in ("bronchial_wall_thickening", "bronchiectasis"):
        pieces += _airway_lesion(c, les, rng)
    return pieces


def _air_bronchograms(
    c: _Canvas, les: Lesion, rng: np.random.Generator, blk: Block, region: Array
) -> None:
    radius = les.extent_mm[0]
    for _ in range(int(rng.integers(2, 5))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        start = np.asarray(les.center_lps) - d * radius * 0.3
        end = start + d * radius * float(rng.uniform(0.5, 0.9))
        r = float(rng.uniform(1.0, 2.0))
        got = tube(c.grid, tuple(start.tolist()), tuple(end.tolist()), r * 1.2, r * 0.8, c.soft)
        if got is None:
            continue
        tblk, cov = got
        # Restrict to the consolidation region (both blocks are boxes of the same grid).
        sub = _intersect(blk, tblk)
        if sub is None:
            continue
        (bz, by, bx), (tz, ty, tx) = sub
        cov_sub = cov[tz, ty, tx] * region[bz, by, bx]
        view = c.hu[blk.index][bz, by, bx]
        view += cov_sub * (np.float32(-950.0) - view)


def _intersect(
    outer: Block, inner: Block
) -> tuple[tuple[slice, slice, slice], tuple[slice, slice, slice]] | None:
    """Local slices of the overlap of two blocks, in ``outer`` and in ``inner`` coordinates."""
    a: list[slice] = []
    b: list[slice] = []
    for so, si in zip(outer.index, inner.index, strict=True):
        lo, hi = max(so.start, si.start), min(so.stop, si.stop)
        if hi <= lo:
            return None
        a.append(slice(lo - so.start, hi - so.start))
        b.append(slice(lo - si.start, hi - si.start))
    return (a[0], a[1], a[2]), (b[0], b[1], b[2])


def _septal(c: _Canvas, les: Lesion, rng: np.random.Generator) -> list[tuple[Block, Array]]:
    r0, r1, band = les.extent_mm
    env = Blob.random(rng, les.center_lps, (r0, r1, r0), 0.2)
    got = env.coverage(c.grid, max(c.soft, 5.0))
    if got is None:
        return []
    blk, cov = got
    fluid = c.fluid_for(les.side)
    depth = lung_depth(c.anat, les.side, blk.x, blk.y, blk.z, fluid)
    in_band = edge_coverage(band - depth, 4.0)
    cov, mask = _clip(c, blk, cov * in_band)
    mask &= depth < band
    field = smooth_field(les.seed, blk, 7.0)
    lines = np.exp(-((field / np.float32(0.28)) ** 2))
    value = np.float32(rng.uniform(-300.0, -100.0))
    view = c.hu[blk.index]
    target = lines * value + (1.0 - lines) * (view + np.float32(70.0))
    view += cov * (target - view)
    return [(blk, mask)]


def _micronodules(c: _Canvas, les: Lesion, rng: np.random.Generator) -> list[tuple[Block, Array]]:
    env = _lesion_blob(les, rng, 0.15)
    got = env.coverage(c.grid, max(c.soft, 3.0))
    if got is None:
        return []
    blk, cov = got
    cov, mask = _clip(c, blk, cov)
    view = c.hu[blk.index]
    view += cov * np.float32(30.0)
    n = int(rng.integers(20, 81))
    value = float(rng.uniform(-100.0, 30.0))
    pts = rng.normal(size=(n, 3))
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    pts *= rng.uniform(0.0, 1.0, size=(n, 1)) ** (1.0 / 3.0)
    centers = np.asarray(les.center_lps) + (pts * np.asarray(les.extent_mm)) @ env.rot.T
    for p in centers:
        r = float(rng.uniform(1.0, 2.0))
        q = (float(p[0]), float(p[1]), float(p[2]))
        got_n = tube(c.grid, q, q, r, r, c.soft)
        if got_n is None:
            continue
        nblk, ncov = got_n
        ncov = ncov * c.lung[nblk.index]
        c.blend(nblk, ncov, value)
    return [(blk, mask)]


def _linear(c: _Canvas, les: Lesion, rng: np.random.Generator) -> list[tuple[Block, Array]]:
    length, width, thick = les.extent_mm
    rot = Blob.random(rng, les.center_lps, (1.0, 1.0, 1.0), 0.0).rot
    reach = length / 2.0 + c.soft + 2.0
    cx, cy, cz = les.center_lps
    blk = block(c.grid, (cx - reach, cy - reach, cz - reach), (cx + reach, cy + reach, cz + reach))
    if blk is None:
        return []
    dx, dy, dz = blk.x - np.float32(cx), blk.y - np.float32(cy), blk.z - np.float32(cz)
    u, v, w = (
        dx * np.float32(rot[0, i]) + dy * np.float32(rot[1, i]) + dz * np.float32(rot[2, i])
        for i in range(3)
    )
    d_uv = ellipse_depth(u, v, length / 2.0, width / 2.0)
    aw = np.abs(w)
    cov = edge_coverage(np.minimum(d_uv, thick / 2.0 - aw), c.soft)
    mask_thick = max(thick + 3.0, 6.0)
    region = (np.minimum(d_uv, mask_thick / 2.0 - aw) > 0.0) & c.lung[blk.index]
    cov = cov * c.lung[blk.index]
    c.blend(blk, cov, float(rng.uniform(-300.0, 0.0)))
    return [(blk, region)]


def _airway_lesion(c: _Canvas, les: Lesion, rng: np.random.Generator) -> list[tuple[Block, Array]]:
    segs = airway_tree(c.anat)
    gen3 = [s for s in segs if s.generation == 3]
    if not gen3:
        return []
    center = les.center_lps
    anchor = min(gen3, key=lambda s: math.dist(s.midpoint, center))
    pieces: list[tuple[Block, Array]] = []
    if les.label == "bronchiectasis":
        _, lumen, wall = les.extent_mm
        chain = _airway_children(segs, anchor)
        for seg in chain:
            f = 0.9 ** (seg.generation - 3)
            fat = Segment(seg.p0, seg.p1, lumen * f, lumen * f, seg.generation, seg.lobe)
            pieces += _thick_tube(c, fat, wall, 35.0, max(fat.r0 + wall, 3.0))
    else:
        radius, _, wall = les.extent_mm
        chosen = [
            s
            for s in segs
            if s.generation >= 3 and (s is anchor or math.dist(s.midpoint, center) < radius)
        ]
        value = float(rng.uniform(20.0, 50.0))
        for seg in chosen:
            lumen = max(seg.r0, 1.2)
            thick = Segment(seg.p0, seg.p1, lumen, max(seg.r1, 1.0), seg.generation, seg.lobe)
            pieces += _thick_tube(c, thick, wall, value, max(lumen + wall, 3.0))
    return pieces


def _thick_tube(
    c: _Canvas, seg: Segment, wall: float, value: float, mask_radius: float
) -> list[tuple[Block, Array]]:
    got = tube(c.grid, seg.p0, seg.p1, seg.r0 + wall, seg.r1 + wall, c.soft)
    if got is None:
        return []
    blk, cov = got
    lung = c.lung[blk.index]
    c.blend(blk, cov * lung, value)
    inner = tube(c.grid, seg.p0, seg.p1, seg.r0, seg.r1, c.soft)
    if inner is not None:
        iblk, icov = inner
        sub = _intersect(blk, iblk)
        if sub is not None:
            (bz, by, bx), (iz, iy, ix) = sub
            view = c.hu[blk.index][bz, by, bx]
            icov_sub = icov[iz, iy, ix] * lung[bz, by, bx]
            view += icov_sub * (np.float32(-1000.0) - view)
    grow = mask_radius - (seg.r0 + wall)
    if grow > 0:
        mtube = tube(c.grid, seg.p0, seg.p1, mask_radius, max(seg.r1 + wall, mask_radius), c.soft)
        if mtube is None:
            return []
        mblk, mcov = mtube
        return [(mblk, (mcov > 0.5) & c.lung[mblk.index])]
    return [(blk, (cov > 0.5) & lung)]


# ---------------------------------------------------------------------------- main
def _z_kernel(grid: Grid) -> list[tuple[int, float]]:
    """Taps ``(offset, weight)`` of the partial-volume blur along z (Gaussian, sd 0.3 x thickness)."""
    sigma = 0.3 * grid.slice_thickness / grid.slice_spacing
    if sigma < 0.2 or grid.shape[0] == 1:
        return [(0, 1.0)]
    reach = max(1, math.ceil(2.5 * sigma))
    offsets = np.arange(-reach, reach + 1)
    w = np.exp(-0.5 * (offsets / sigma) ** 2)
    w /= w.sum()
    return [(int(o), float(v)) for o, v in zip(offsets, w, strict=True)]


class _NoiseBank:
    """Unit Gaussian noise slices, fast: each slice mixes two slices of a small bank.

    Slice ``i`` is ``cos(t) A + sin(t) B`` with ``A, B`` random shifted crops of bank
    slices and ``t`` random, so every voxel is N(0, 1) and slices are practically
    independent, at a fraction of the cost of drawing every voxel.
    """

    def __init__(
        self, rng: np.random.Generator, shape: tuple[int, int], size: int = 12, pad: int = 48
    ) -> None:
        self.rng = rng
        self.shape = shape
        self.pad = pad
        self.bank = rng.standard_normal((size, shape[0] + pad, shape[1] + pad), dtype=np.float32)

    def draw(self, out: Array) -> None:
        h, w = self.shape
        k = self.rng.integers(0, self.bank.shape[0], size=2)
        o = self.rng.integers(0, self.pad + 1, size=4)
        t = float(self.rng.uniform(0.0, 2.0 * math.pi))
        np.multiply(
            self.bank[k[0], o[0] : o[0] + h, o[1] : o[1] + w], np.float32(math.cos(t)), out=out
        )
        out += np.float32(math.sin(t)) * self.bank[k[1], o[2] : o[2] + h, o[3] : o[3] + w]


def _finish(c: _Canvas, body2d: npt.NDArray[np.bool_]) -> npt.NDArray[np.int16]:
    """Blur along z, add noise, blank the air outside the body, round to int16 (slice by slice)."""
    grid = c.grid
    hu = c.hu
    taps = _z_kernel(grid)
    sigma = np.float32(c.spec.noise_sigma_ref / math.sqrt(grid.voxel_volume))
    bank = _NoiseBank(np.random.default_rng(c.spec.noise_seed), (grid.shape[1], grid.shape[2]))
    out = np.empty(grid.shape, dtype=np.int16)
    keep = body2d.astype(np.float32)
    air = np.float32(AIR_HU) * (1.0 - keep)
    n = grid.shape[0]
    acc = np.empty(grid.shape[1:], dtype=np.float32)
    noise = np.empty(grid.shape[1:], dtype=np.float32)
    for i in range(n):
        np.multiply(hu[min(n - 1, max(0, i + taps[0][0]))], np.float32(taps[0][1]), out=acc)
        for off, w in taps[1:]:
            acc += np.float32(w) * hu[min(n - 1, max(0, i + off))]
        bank.draw(noise)
        noise *= sigma
        acc += noise
        acc *= keep
        acc += air
        np.clip(acc, -1024.0, 3071.0, out=acc)
        np.rint(acc, out=acc)
        out[i] = acc
    return out


def _paint(c: _Canvas) -> npt.NDArray[np.bool_]:
    """Paint anatomy and findings on the canvas; returns the body section."""
    spec, grid, r = c.spec, c.grid, c.realism
    body2d = _paint_body(c)
    _paint_spine(c)
    _paint_ribs(c)
    _paint_sternum(c)
    _paint_heart(c)
    _paint_lungs(c)
    if r is not None:
        _paint_parenchyma(c, r)
        _paint_fissures(c, r)
    _paint_aorta(c)
    if r is not None:
        _paint_mediastinum(c, r)
    _paint_vessels(c)
    if r is not None:
        _paint_peripheral_vessels(c, r)
    _paint_airways(c)
    if r is not None:
        _paint_nodes(c, r)
    by_label: dict[str, list[Lesion]] = {}
    for les in spec.lesions:
        by_label.setdefault(les.label, []).append(les)
    effusions = by_label.get("pleural_effusion", [])
    if effusions and not _paint_fluid(c, effusions):
        c.masks[LABEL_KEYS.index("pleural_effusion")][
            grid.nearest_index(effusions[0].center_lps)
        ] = 1
    for label in PAINT_ORDER:
        if label == "pleural_effusion":
            continue
        k = LABEL_KEYS.index(label)
        for les in by_label.get(label, []):
            pieces = _render_lesion(c, les)
            hit = False
            for blk, mask in pieces:
                if mask.any():
                    c.masks[k][blk.index] |= mask.astype(np.uint8)
                    hit = True
            if not hit:
                c.masks[k][grid.nearest_index(les.center_lps)] = 1
    return body2d


def _render(spec: CaseSpec, grid: Grid) -> tuple[Phantom, Regions]:
    if spec.realism is not None:
        return _render_v2(spec, grid, spec.realism)
    c = _Canvas(spec, grid)
    body2d = _paint(c)
    hu = _finish(c, body2d)
    # Every lesion leaves at least one mask voxel, so presence follows from the lesions
    # (no scan of the full masks needed).
    present = spec.present
    report_rng = np.random.default_rng([spec.seed, 0x2E90])
    phantom = Phantom(
        spec=spec,
        grid=grid,
        hu=hu,
        masks=c.masks,
        present=present,
        lesions=spec.lesions,
        report=compose_report(spec.lesions, report_rng),
    )
    return phantom, Regions(body=body2d, lungs=c.lung, pleura=c.pleura)


def _render_v2(spec: CaseSpec, grid: Grid, r: Realism) -> tuple[Phantom, Regions]:
    """Generator 2: rasterise on sub-slices, integrate each slice's slab, then the
    kernel's noise, edge overshoot and the vendor's calibration."""
    fine, k = fine_grid(grid)
    c = _Canvas(spec, fine)
    body2d = _paint(c)
    hu = integrate_slabs(c.hu, grid, k)
    masks = np.zeros((len(LABEL_KEYS), *grid.shape), dtype=np.uint8)
    for i in range(len(LABEL_KEYS)):
        if c.masks[i].any():
            masks[i] = integrate_slabs(c.masks[i].astype(np.float32), grid, k) >= 0.5
    for les in spec.lesions:  # every lesion keeps at least one voxel, as in generator 1
        i = LABEL_KEYS.index(les.label)
        if not masks[i].any():
            masks[i][grid.nearest_index(les.center_lps)] = 1
    lungs = integrate_slabs(c.lung.astype(np.float32), grid, k) >= 0.5
    pleura = integrate_slabs(c.pleura.astype(np.float32), grid, k) >= 0.5
    del c
    out = _finish_v2(hu, grid, spec, r, body2d)
    report_rng = np.random.default_rng([spec.seed, 0x2E90])
    phantom = Phantom(
        spec=spec,
        grid=grid,
        hu=out,
        masks=masks,
        present=spec.present,
        lesions=spec.lesions,
        report=compose_report(spec.lesions, report_rng),
    )
    return phantom, Regions(body=body2d, lungs=lungs, pleura=pleura)


def _finish_v2(
    hu: Array, grid: Grid, spec: CaseSpec, r: Realism, body2d: npt.NDArray[np.bool_]
) -> npt.NDArray[np.int16]:
    pixel = float(min(grid.pixel_spacing))
    sigma = np.float32(r.noise_factor * spec.noise_sigma_ref / math.sqrt(grid.voxel_volume))
    bank = _NoiseBank(np.random.default_rng(spec.noise_seed), (grid.shape[1], grid.shape[2]))
    bank.bank = kernel_filter(r, pixel)(bank.bank)
    out = np.empty(grid.shape, dtype=np.int16)
    keep = body2d.astype(np.float32)
    air = np.float32(AIR_HU) * (1.0 - keep)
    noise = np.empty(grid.shape[1:], dtype=np.float32)
    for i in range(grid.shape[0]):
        acc = hu[i]
        sharpen_slice(acc, r, pixel)
        bank.draw(noise)
        acc += noise * sigma
        acc *= np.float32(r.hu_gain)
        acc += np.float32(r.hu_offset)
        acc *= keep
        acc += air
        np.clip(acc, -1024.0, 3071.0, out=acc)
        np.rint(acc, out=acc)
        out[i] = acc
    return out


def render(spec: CaseSpec, grid: Grid) -> Phantom:
    """Render a case on a grid.

    Parameters
    ----------
    spec
        The case (anatomy, lesions, noise).
    grid
        Where to render it.

    Returns
    -------
    The :class:`~model.phantom.case.Phantom`: HU volume, one mask per abnormality (each
    lesion leaves at least one voxel), presence vector and report.
    """
    return _render(spec, grid)[0]


def render_with_regions(spec: CaseSpec, grid: Grid) -> tuple[Phantom, Regions]:
    """:func:`render`, plus the body, aerated-lung and pleural-cavity regions."""
    return _render(spec, grid)


def describe(phantom: Phantom) -> dict[str, Any]:
    """Per-label voxel counts and the lesion list (JSON-ready, for logs)."""
    counts = phantom.masks.reshape(len(LABEL_KEYS), -1).sum(axis=1)
    return {
        "grid": list(phantom.grid.shape),
        "voxels": {k: int(n) for k, n in zip(LABEL_KEYS, counts, strict=True)},
        "lesions": [(les.label, les.location, round(les.size_mm, 1)) for les in phantom.lesions],
    }
