"""Shape and attenuation of lesion candidates: what tells a nodule from a vessel.

The model's masks come from a grid of a few millimetres, so a nodule's mask also takes
in vessel segments that look alike at that scale (on the LIDC-IDRI-0001 chest CT nine of
ten "nodule" components were hilar and central vessels before this filter). CAD systems filter candidates
by the local shape of the image itself (Li, Sone and Doi, Med. Phys. 2003): at the scale
of a candidate, the Hessian of the smoothed CT has three strongly negative eigenvalues at
a bright blob (a nodule), two at a bright tube (a vessel) and one at a plate (a fissure,
the pleura). :func:`blob_ratio` is that test; :func:`refine_to_tissue` moves a coarse
mask's boundary onto the lesion's own attenuation.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

BoolArray = npt.NDArray[np.bool_]

#: HU window the Hessian is taken in: lung to soft tissue, so bone does not dominate.
_HESSIAN_WINDOW = (-1000.0, 200.0)
#: Scales (mm) the Hessian is taken at are bounded to these.
_SIGMA_MM = (1.0, 8.0)
#: Tissue of a lesion: above this (solid and part-solid nodules, consolidation).
TISSUE_HU = -600.0


def _ellipsoid(radius_mm: float, spacing: tuple[float, float, float]) -> BoolArray:
    radii = [max(0, math.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    ball = sum((g * s / radius_mm) ** 2 for g, s in zip(grids, spacing, strict=True)) <= 1.0
    return np.asarray(ball)


def blob_ratio(
    hu: npt.NDArray[np.float32],
    component: BoolArray,
    origin: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> float:
    """How blob-like the CT is at a candidate: ``|λ3| / |λ1|`` of the Hessian at its centre.

    Parameters
    ----------
    hu
        The whole source volume.
    component
        The candidate, a bool array whose element ``(0, 0, 0)`` is source voxel ``origin``.
    spacing
        Source voxel spacing (mm) along (slice, row, column).

    Returns
    -------
    float
        The smallest over the largest eigenvalue magnitude at the candidate's strongest
        bright-blob response (the peak of ``-trace``, the Laplacian of Gaussian), taken at
        the scale of a sphere of the candidate's volume; eigenvalues ordered
        ``λ1 <= λ2 <= λ3``. About 1 for a sphere, near 0 for a tube or a plate, negative
        where the centre is not bright in every direction. 0 for an empty candidate.
    """
    voxels = int(component.sum())
    if voxels == 0:
        return 0.0
    volume_mm3 = voxels * float(np.prod(spacing))
    radius = (3.0 * volume_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
    sigma = float(np.clip(radius / math.sqrt(3.0), *_SIGMA_MM))
    sigma_vox = np.array([sigma / s for s in spacing])
    margin = np.ceil(3.0 * sigma_vox).astype(int)
    lo = [max(o - m, 0) for o, m in zip(origin, margin, strict=True)]
    hi = [
        min(o + n + m, size)
        for o, n, m, size in zip(origin, component.shape, margin, hu.shape, strict=True)
    ]
    crop = np.clip(hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], *_HESSIAN_WINDOW).astype(
        np.float32
    )
    inside = np.zeros(crop.shape, dtype=bool)
    offset = [o - low for o, low in zip(origin, lo, strict=True)]
    inside[
        offset[0] : offset[0] + component.shape[0],
        offset[1] : offset[1] + component.shape[1],
        offset[2] : offset[2] + component.shape[2],
    ] = component[
        : crop.shape[0] - offset[0], : crop.shape[1] - offset[1], : crop.shape[2] - offset[2]
    ]
    # Coarser than a third of the scale, the image holds nothing the filter would keep:
    # average blocks of that size first (the filters then run on a fraction of the voxels).
    step = np.maximum(np.floor(sigma_vox / 3.0).astype(int), 1)
    if (step > 1).any():
        trim = tuple(slice(0, (n // k) * k) for n, k in zip(crop.shape, step, strict=True))
        crop, inside = crop[trim], inside[trim]
        shape = [n // k for n, k in zip(crop.shape, step, strict=True)]
        crop = crop.reshape(shape[0], step[0], shape[1], step[1], shape[2], step[2]).mean(
            axis=(1, 3, 5), dtype=np.float32
        )
        inside = np.asarray(
            inside.reshape(shape[0], step[0], shape[1], step[1], shape[2], step[2]).any(
                axis=(1, 3, 5)
            ),
            dtype=bool,
        )
        sigma_vox = sigma_vox / step
        spacing = (spacing[0] * step[0], spacing[1] * step[1], spacing[2] * step[2])
    points = np.nonzero(inside)
    hessian = np.empty((points[0].size, 3, 3), dtype=np.float64)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            # Scale-normalised second derivative in mm^-2 (times sigma^2).
            d = ndimage.gaussian_filter(crop, sigma_vox, order=order, mode="nearest")
            value = d[points] * sigma**2 / (spacing[i] * spacing[j])
            hessian[:, i, j] = value
            hessian[:, j, i] = value
    eig = np.linalg.eigvalsh(hessian)  # ascending: λ1 is the most negative
    peak = int(np.argmax(-eig.sum(axis=1)))
    l1, l3 = float(eig[peak, 0]), float(eig[peak, 2])
    if l1 >= 0:
        return 0.0
    return l3 / l1


def refine_to_tissue(
    hu: npt.NDArray[np.float32],
    component: BoolArray,
    allowed: BoolArray,
    spacing: tuple[float, float, float],
    grow_mm: float,
) -> BoolArray:
    """Move a coarse mask's boundary onto the lesion: its tissue within ``grow_mm``.

    The voxels above :data:`TISSUE_HU` within ``grow_mm`` of the component (and in
    ``allowed``) that are connected to the component's own tissue. ``hu``,
    ``component`` and ``allowed`` are crops of the same shape; the component is
    returned unchanged when it holds no tissue at all.
    """
    tissue = hu > TISSUE_HU
    seed = component & tissue
    if not seed.any():
        return component
    grown = ndimage.binary_dilation(component, structure=_ellipsoid(grow_mm, spacing))
    candidate = grown & tissue & allowed
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.unique(labels[seed & candidate])
    keep = keep[keep > 0]
    return np.asarray(np.isin(labels, keep))
