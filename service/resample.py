"""Model-grid probabilities onto the source voxels, inside the region that matters.

The segmentation of the model grid is resampled (:func:`model.transforms.to_source_grid`)
only inside the bounding box of its above-threshold region, at a stride that the later
refinement makes up for.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from model.transforms import LPS_TO_RAS, ModelInput, to_source_grid
from service.volume import SourceVolume

__all__ = ["grow_box", "probability_on_source", "stride"]


def _model_to_source_index(
    model_input: ModelInput, volume: SourceVolume
) -> npt.NDArray[np.float64]:
    """4x4 map from model-grid voxel index to source voxel index."""
    ras_to_index = np.linalg.inv(volume.affine_lps) @ LPS_TO_RAS
    return np.asarray(ras_to_index @ model_input.affine_ras, dtype=np.float64)


def _source_box(
    model_box: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]],
    model_to_source: npt.NDArray[np.float64],
    shape: tuple[int, int, int],
) -> tuple[slice, slice, slice] | None:
    """Source-grid slices covering a (dilated) model-grid box, or ``None`` when outside."""
    lo, hi = model_box
    corners = np.array(
        [
            [c0, c1, c2, 1.0]
            for c0 in (lo[0], hi[0])
            for c1 in (lo[1], hi[1])
            for c2 in (lo[2], hi[2])
        ],
        dtype=np.float64,
    )
    mapped = (model_to_source @ corners.T)[:3]
    start = np.maximum(np.floor(mapped.min(axis=1)).astype(int), 0)
    stop = np.minimum(np.ceil(mapped.max(axis=1)).astype(int) + 1, np.array(shape))
    if np.any(stop <= start):
        return None
    return (
        slice(int(start[0]), int(stop[0])),
        slice(int(start[1]), int(stop[1])),
        slice(int(start[2]), int(stop[2])),
    )


def probability_on_source(
    probability: npt.NDArray[np.float32],
    model_input: ModelInput,
    volume: SourceVolume,
    mask_threshold: float,
    stride: tuple[int, int, int] = (1, 1, 1),
) -> tuple[tuple[slice, slice, slice], npt.NDArray[np.float32]] | None:
    """Resample one model-grid probability map into a source-grid box.

    Only the region above ``mask_threshold`` (dilated by one model voxel, so trilinear
    interpolation sees its true neighbours) is resampled; outside it the resampled value
    cannot exceed the threshold, so the thresholded mask is the same as a full resample.
    With a ``stride``, the map is sampled once per block of ``stride`` source voxels (at
    the block's centre) and the value repeated over the block: enough for maps much
    coarser than the source (the model grid of ``small`` is 3 mm, a CT's pixels 0.7 mm).
    """
    above = probability > mask_threshold
    if not above.any():
        return None
    (box,) = ndimage.find_objects(above.astype(np.uint8))
    lo = np.array([max(s.start - 1, 0) for s in box])
    hi = np.array([min(s.stop, n - 1) for s, n in zip(box, probability.shape, strict=True)])
    model_to_source = _model_to_source_index(model_input, volume)
    source_box = _source_box((lo, hi), model_to_source, volume.shape)
    if source_box is None:
        return None
    crop = probability[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
    model_shift = np.eye(4)
    model_shift[:3, 3] = lo
    source_shift = np.eye(4)
    source_shift[:3, 3] = [s.start for s in source_box]
    box_shape = (
        source_box[0].stop - source_box[0].start,
        source_box[1].stop - source_box[1].start,
        source_box[2].stop - source_box[2].start,
    )
    coarse_shape = tuple(-(-n // k) for n, k in zip(box_shape, stride, strict=True))
    # Each sample at the centre of the block it stands for.
    centre = np.eye(4)
    centre[:3, 3] = [(k - 1) / 2.0 for k in stride]
    resampled = to_source_grid(
        crop[None],
        np.asarray(model_input.affine_ras, dtype=np.float64) @ model_shift,
        volume.affine_lps @ source_shift @ centre @ np.diag([*stride, 1.0]),
        coarse_shape,
    )[0]
    for axis, k in enumerate(stride):
        if k > 1:
            resampled = np.repeat(resampled, k, axis=axis)
    return source_box, resampled[: box_shape[0], : box_shape[1], : box_shape[2]]


def stride(model_input: ModelInput, volume: SourceVolume) -> tuple[int, int, int]:
    """Source voxels per sample for a map resampled at half the model grid's spacing."""
    model_spacing = np.sort(np.linalg.norm(model_input.affine_ras[:3, :3], axis=0))
    finest = float(model_spacing[0])
    return tuple(max(1, int(finest / (2.0 * s))) for s in volume.spacing)  # type: ignore[return-value]


def grow_box(
    box: tuple[slice, slice, slice], margin: tuple[int, int, int], shape: tuple[int, int, int]
) -> tuple[slice, slice, slice]:
    return (
        slice(max(box[0].start - margin[0], 0), min(box[0].stop + margin[0], shape[0])),
        slice(max(box[1].start - margin[1], 0), min(box[1].stop + margin[1], shape[1])),
        slice(max(box[2].start - margin[2], 0), min(box[2].stop + margin[2], shape[2])),
    )
