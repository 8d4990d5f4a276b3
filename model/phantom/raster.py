"""Rasterisation of analytic shapes onto a :class:`~model.phantom.grid.Grid`, block by block.

Shapes are evaluated only inside their bounding box (a :class:`Block`), in float32, and
return a coverage in ``[0, 1]`` whose soft edge (about one pixel, or wider for hazy
findings) stands in for in-plane partial volume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from model.phantom.grid import Grid

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Block:
    """An axis-aligned sub-block of a grid and the patient coordinates of its voxels.

    ``z`` is ``(n, 1, 1)``, ``y`` ``(1, m, 1)``, ``x`` ``(1, 1, l)`` (mm, float32), so they
    broadcast to the block's shape.
    """

    index: tuple[slice, slice, slice]
    z: Array
    y: Array
    x: Array

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n, m, l)``."""
        return (self.z.shape[0], self.y.shape[1], self.x.shape[2])


def block(
    grid: Grid, lo: tuple[float, float, float], hi: tuple[float, float, float]
) -> Block | None:
    """The block of voxels whose centres lie in the LPS box ``[lo, hi]``; ``None`` if empty."""
    sz = grid.index_range(0, lo[2], hi[2])
    sy = grid.index_range(1, lo[1], hi[1])
    sx = grid.index_range(2, lo[0], hi[0])
    if sz.stop <= sz.start or sy.stop <= sy.start or sx.stop <= sx.start:
        return None
    z = grid.axis_mm(0)[sz][:, None, None]
    y = grid.axis_mm(1)[sy][None, :, None]
    x = grid.axis_mm(2)[sx][None, None, :]
    return Block((sz, sy, sx), z, y, x)


def edge_coverage(signed_mm: Array, soft_mm: float) -> Array:
    """Coverage from a signed distance inside a shape (mm, positive inside)."""
    out: Array = np.clip(signed_mm * (1.0 / soft_mm) + 0.5, 0.0, 1.0).astype(np.float32, copy=False)
    return out


def tube_distance(
    grid: Grid,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    r0: float,
    r1: float,
    reach: float,
) -> tuple[Block, Array] | None:
    """Signed distance (mm, positive inside) to a tapered capsule ``p0 -> p1``, radii ``r0 -> r1``.

    Evaluated over the capsule's bounding box grown by ``reach`` beyond the larger radius.
    """
    rmax = max(r0, r1) + reach
    blk = block(
        grid,
        (min(p0[0], p1[0]) - rmax, min(p0[1], p1[1]) - rmax, min(p0[2], p1[2]) - rmax),
        (max(p0[0], p1[0]) + rmax, max(p0[1], p1[1]) + rmax, max(p0[2], p1[2]) + rmax),
    )
    if blk is None:
        return None
    vx, vy, vz = (p1[0] - p0[0], p1[1] - p0[1], p1[2] - p0[2])
    vv = max(vx * vx + vy * vy + vz * vz, 1e-9)
    wx = blk.x - np.float32(p0[0])
    wy = blk.y - np.float32(p0[1])
    wz = blk.z - np.float32(p0[2])
    wv = wx * np.float32(vx) + wy * np.float32(vy) + wz * np.float32(vz)
    t = np.clip(wv * np.float32(1.0 / vv), 0.0, 1.0)
    ww = (wx * wx + wy * wy) + wz * wz
    d2 = ww - t * (2.0 * wv - t * np.float32(vv))
    np.maximum(d2, 0.0, out=d2)
    signed: Array = np.float32(r0) + t * np.float32(r1 - r0) - np.sqrt(d2)
    return blk, signed


def tube(
    grid: Grid,
    p0: tuple[float, float, float],
    p1: tuple[float, float, float],
    r0: float,
    r1: float,
    soft_mm: float,
) -> tuple[Block, Array] | None:
    """Coverage of a tapered capsule ``p0 -> p1`` with radii ``r0 -> r1`` (mm)."""
    got = tube_distance(grid, p0, p1, r0, r1, soft_mm)
    if got is None:
        return None
    return got[0], edge_coverage(got[1], soft_mm)


def rotation(rng: np.random.Generator) -> Array:
    """A uniformly random 3x3 rotation matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    out: Array = q
    return out


@dataclass(frozen=True)
class Blob:
    """A rotated, lobulated ellipsoid.

    The surface is ``|R^T (p - c) / s| = 1 + sum_k a_k ((n . u_k)^4 - 0.2)``, with ``n`` the
    direction from the centre in the ellipsoid frame.
    """

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    rot: Array
    bumps: Array  # (K, 3) unit vectors
    amplitudes: Array  # (K,)

    @staticmethod
    def random(
        rng: np.random.Generator,
        center: tuple[float, float, float],
        semi_axes: tuple[float, float, float],
        lobulation: float,
        n_bumps: int = 5,
    ) -> Blob:
        """A blob with random orientation and bumps of relative height up to ``lobulation``."""
        u = rng.normal(size=(n_bumps, 3))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        amp = rng.uniform(-lobulation, lobulation, size=n_bumps)
        return Blob(center, semi_axes, rotation(rng), u, amp)

    @property
    def reach(self) -> float:
        """Radius (mm) of a sphere enclosing the blob."""
        return max(self.semi_axes) * (1.0 + float(np.abs(self.amplitudes).sum()) * 0.8 + 0.05)

    def signed_depth(self, blk: Block) -> Array:
        """Approximate distance (mm) inside the surface over a block."""
        dx = blk.x - np.float32(self.center[0])
        dy = blk.y - np.float32(self.center[1])
        dz = blk.z - np.float32(self.center[2])
        r = self.rot
        q = [
            (dx * np.float32(r[0, i]) + dy * np.float32(r[1, i]) + dz * np.float32(r[2, i]))
            * np.float32(1.0 / self.semi_axes[i])
            for i in range(3)
        ]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        inv = 1.0 / np.maximum(rho, 1e-6)
        surface = np.ones_like(rho)
        for u, a in zip(self.bumps, self.amplitudes, strict=True):
            c = (q[0] * np.float32(u[0]) + q[1] * np.float32(u[1]) + q[2] * np.float32(u[2])) * inv
            c2 = c * c
            surface += np.float32(a) * (c2 * c2 - np.float32(0.2))
        out: Array = (surface - rho) * np.float32(min(self.semi_axes))
        return out

    def coverage(self, grid: Grid, soft_mm: float) -> tuple[Block, Array] | None:
        """Coverage of the blob on ``grid``."""
        reach = self.reach + soft_mm
        c = self.center
        blk = block(
            grid,
            (c[0] - reach, c[1] - reach, c[2] - reach),
            (c[0] + reach, c[1] + reach, c[2] + reach),
        )
        if blk is None:
            return None
        return blk, edge_coverage(self.signed_depth(blk), soft_mm)


def _hash_uniform(seed: int, iz: Array, iy: Array, ix: Array) -> Array:
    """Deterministic uniform [0, 1) values of integer lattice nodes (broadcasting)."""
    with np.errstate(over="ignore"):
        h = (
            iz.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            ^ iy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
            ^ ix.astype(np.uint64) * np.uint64(0x165667B19E3779F9)
            ^ np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x27D4EB2F165667C5)
        )
        h ^= h >> np.uint64(31)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(32)
    out: Array = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)
    return out


def _axis_weights(coords: Array, spacing: float) -> tuple[Array, Array, int]:
    u = coords.astype(np.float64).ravel() / spacing
    i0 = np.floor(u).astype(np.int64)
    return i0, (u - i0).astype(np.float32), int(i0.min())


def smooth_field(seed: int, blk: Block, spacing_mm: float) -> Array:
    """A zero-mean, about unit-variance random field over a block, fixed in patient space.

    Values on a lattice of pitch ``spacing_mm`` (anchored at the LPS origin, drawn from a
    hash of the node and ``seed``) are linearly interpolated, so the field does not depend
    on the grid it is sampled on.
    """
    iz0, fz, bz = _axis_weights(blk.z, spacing_mm)
    iy0, fy, by = _axis_weights(blk.y, spacing_mm)
    ix0, fx, bx = _axis_weights(blk.x, spacing_mm)
    nz, ny, nx = int(iz0.max()) - bz + 2, int(iy0.max()) - by + 2, int(ix0.max()) - bx + 2
    lz = np.arange(bz, bz + nz)[:, None, None]
    ly = np.arange(by, by + ny)[None, :, None]
    lx = np.arange(bx, bx + nx)[None, None, :]
    lattice = ((_hash_uniform(seed, lz, ly, lx) - 0.5) * np.sqrt(12.0) * 1.6).astype(np.float32)
    kx, ky, kz = ix0 - bx, iy0 - by, iz0 - bz
    a = lattice[:, :, kx] * (1.0 - fx) + lattice[:, :, kx + 1] * fx
    b = a[:, ky, :] * (1.0 - fy)[None, :, None] + a[:, ky + 1, :] * fy[None, :, None]
    out: Array = b[kz] * (1.0 - fz)[:, None, None] + b[kz + 1] * fz[:, None, None]
    return out
