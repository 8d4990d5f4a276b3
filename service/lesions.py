"""Focal findings as lesions: components gated on the lungs, refined onto their tissue,
nodules blob-tested, measured as a reader would, the largest itemised.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from model.labels import Abnormality
from service.findings import BoolArray, Laterality, LesionMeasurement, LongAxis
from service.gating import AnalysisContext, laterality
from service.lesion_shape import blob_ratio, refine_to_tissue
from service.lung_field import lobe_side
from service.measure import longest_axial_diameter
from service.resample import grow_box

__all__ = [
    "BLOB_FINDINGS",
    "MAX_NODULE_OVERLAP",
    "MIN_IN_LUNG_FRACTION",
    "MIN_NODULE_BLOB_RATIO",
    "focal_lesions",
]

logger = logging.getLogger(__name__)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
#: A lesion of the lungs has at least this fraction of its voxels in the lung field
#: itself: what lies only in the tolerance band is chest wall, bone or mediastinum.
MIN_IN_LUNG_FRACTION = 0.5
#: A nodule candidate is blob-like at least this much (``blob_ratio``; a sphere is
#: about 1, vessels and fissures below 0.2; on LIDC-IDRI-0001 the readers' nodule
#: scores 0.60 and the nine vessel and bone look-alikes -0.27 to 0.28).
MIN_NODULE_BLOB_RATIO = 0.35
#: Findings whose lesions must pass the blob test.
BLOB_FINDINGS = frozenset({"nodule"})
#: A lesion of another focal finding that lies mostly (this fraction of its voxels or
#: more) in a nodule is that nodule seen by a less specific head (a mass is not also a
#: consolidation); it is not reported twice.
MAX_NODULE_OVERLAP = 0.5
#: A lobe is involved by a diffuse finding that has at least this fraction of its volume


def _measure(
    component: BoolArray,
    origin: tuple[int, int, int],
    lobes: npt.NDArray[np.uint8],
    index: int,
    ctx: AnalysisContext,
) -> LesionMeasurement:
    """Measure one component (``component[0, 0, 0]`` is source voxel ``origin``)."""
    volume = ctx.volume
    row_step, col_step = volume.affine_lps[:3, 1], volume.affine_lps[:3, 2]
    key, diameter, start, end = longest_axial_diameter(component, row_step, col_step)
    long_axis = LongAxis(
        slice_index=int(origin[0] + key),
        start=(start[0] + origin[1], start[1] + origin[2]),
        end=(end[0] + origin[1], end[1] + origin[2]),
    )
    centre = np.array(ndimage.center_of_mass(component)) + np.array(origin)
    centroid = (volume.affine_lps @ np.array([*centre, 1.0]))[:3]
    voxels = int(component.sum())
    codes = np.bincount(lobes[component], minlength=6)[1:]
    lobe = int(np.argmax(codes)) + 1 if codes.any() else 0
    side: Laterality = (
        lobe_side(lobe) if lobe else laterality(float(centroid[0]), ctx.midline)
    )
    return LesionMeasurement(
        label_index=index,
        lesion_number=0,
        voxel_count=voxels,
        volume_ml=voxels * volume.voxel_volume_ml,
        longest_axial_diameter_mm=diameter,
        centroid_lps=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
        slice_range=(int(origin[0]), int(origin[0] + component.shape[0] - 1)),
        laterality=side,
        long_axis=long_axis,
        lobe=lobe,
    )


def focal_lesions(
    index: int,
    abnormality: Abnormality,
    box: tuple[slice, slice, slice],
    raw: BoolArray,
    ctx: AnalysisContext,
    nodules: BoolArray | None,
) -> tuple[BoolArray | None, tuple[LesionMeasurement, ...], int]:
    """The lesions of a focal finding: (mask on the source grid, itemised, count).

    ``nodules`` is the reported nodule mask (source grid), when this is another finding.
    """
    volume, options = ctx.volume, ctx.options
    voxel_ml = volume.voxel_volume_ml
    # Room for the boundary to move onto the lesion's tissue.
    margin = tuple(
        math.ceil(options.refine_mm / s) if abnormality.site == "lung" else 0
        for s in volume.spacing
    )
    outer = grow_box(box, margin, volume.shape)  # type: ignore[arg-type]
    inner = tuple(
        slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer, strict=True)
    )
    candidates = np.zeros(tuple(s.stop - s.start for s in outer), dtype=bool)
    candidates[inner] = raw
    allowed = ctx.allowed(abnormality, outer)
    if allowed is not None:
        candidates &= allowed
    lobes = ctx.lobes(outer)
    in_lungs = lobes > 0
    hu = volume.hu[outer]
    origin = (outer[0].start, outer[1].start, outer[2].start)
    labels, _ = ndimage.label(candidates, structure=_STRUCTURE_26)
    kept: list[tuple[BoolArray, tuple[slice, ...], LesionMeasurement]] = []
    for label, bbox in enumerate(ndimage.find_objects(labels), start=1):
        if bbox is None:
            continue
        component = labels[bbox] == label
        if component.sum() * voxel_ml < options.min_lesion_ml:
            continue
        if ctx.lungs is not None and abnormality.site == "lung":
            if in_lungs[bbox][component].mean() < MIN_IN_LUNG_FRACTION:
                continue
            # The boundary onto the lesion's own tissue, within the allowed region.
            grown = grow_box(bbox, margin, candidates.shape)  # type: ignore[arg-type]
            local = tuple(
                slice(b.start - g.start, b.stop - g.start) for b, g in zip(bbox, grown, strict=True)
            )
            seed = np.zeros(tuple(s.stop - s.start for s in grown), dtype=bool)
            seed[local] = component
            room = allowed[grown] if allowed is not None else np.ones_like(seed)
            component = refine_to_tissue(hu[grown], seed, room, volume.spacing, options.refine_mm)
            bbox = grown
            if not component.any():
                continue
            tight = ndimage.find_objects(component.astype(np.uint8))[0]
            component = component[tight]
            bbox = tuple(
                slice(b.start + t.start, b.start + t.stop) for b, t in zip(bbox, tight, strict=True)
            )
        corner = (origin[0] + bbox[0].start, origin[1] + bbox[1].start, origin[2] + bbox[2].start)
        if nodules is not None:
            region = tuple(slice(c, c + n) for c, n in zip(corner, component.shape, strict=True))
            if nodules[region][component].mean() >= MAX_NODULE_OVERLAP:
                continue
        if ctx.lungs is not None and abnormality.key in BLOB_FINDINGS:
            ratio = blob_ratio(volume.hu, component, corner, volume.spacing)
            if ratio < MIN_NODULE_BLOB_RATIO:
                logger.debug("%s candidate dropped: blob ratio %.2f", abnormality.key, ratio)
                continue
        lesion = _measure(component, corner, lobes[bbox], index, ctx)
        if (
            lesion.longest_axial_diameter_mm < abnormality.min_diameter_mm
            or lesion.volume_ml < abnormality.min_volume_ml
        ):
            continue
        kept.append((component, bbox, lesion))
    if not kept:
        return None, (), 0
    kept.sort(key=lambda k: -k[2].voxel_count)
    mask = np.zeros(volume.shape, dtype=bool)
    for component, bbox, _ in kept:
        region = tuple(
            slice(o.start + b.start, o.start + b.stop) for o, b in zip(outer, bbox, strict=True)
        )
        mask[region] |= component
    itemised = tuple(
        dataclasses.replace(lesion, lesion_number=number)
        for number, (_, _, lesion) in enumerate(kept[: options.max_lesions], start=1)
    )
    return mask, itemised, len(kept)
