"""Preprocessing shared by training and inference (CT-Scroll), as MONAI transforms.

One :func:`build_transforms` chain serves both paths: orientation to ``SLP``
(axis 0 inferior->superior, 1 right->left, 2 anterior->posterior), area-averaging
down to about the target spacing (so noise and partial volume look the same whatever
the scanner's native resolution), resampling to the target spacing, HU window and
scaling ``(hu + 1000) / 1200 - 0.449``, and centre crop/pad with the value of air.

Volumes enter as ``(D0, D1, D2)`` arrays with a 4x4 affine from voxel index to patient
coordinates in DICOM's LPS convention; MONAI works in RAS internally.
:func:`to_source_grid` maps a model-grid map (a segmentation probability) back onto
the source voxels for SEG writing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from model.config import PreprocessConfig

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelInput:
    """A volume on the model grid.

    Attributes
    ----------
    image
        ``(D, H, W)`` float32, scaled intensities.
    affine_ras
        4x4 voxel -> RAS (mm) of the model grid.
    masks
        ``(C, D, H, W)`` float32 in [0, 1] when masks were given, else ``None``.
    """

    image: FloatArray
    affine_ras: npt.NDArray[np.float64]
    masks: FloatArray | None = None


def spacing_of(affine: npt.NDArray[np.float64]) -> tuple[float, float, float]:
    """Voxel spacing (mm) along the three array axes of a 4x4 affine."""
    cols = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(cols[0]), float(cols[1]), float(cols[2]))


class AreaDownsampled(MapTransform):
    """Average-pool by integer factors towards a target spacing (anti-aliasing).

    The factor on each axis is ``floor(target / current)``; the affine is updated so the
    pooled voxel centres stay exact. Resampling to the final spacing follows.
    """

    def __init__(self, keys: Sequence[str], target_spacing: Sequence[float]) -> None:
        super().__init__(keys)
        self.target = tuple(float(s) for s in target_spacing)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img: MetaTensor = d[key]
            affine = np.asarray(img.affine, dtype=np.float64)
            current = spacing_of(affine)
            factors = tuple(
                max(1, min(math.floor(t / c + 1e-6), n))
                for t, c, n in zip(self.target, current, img.shape[1:], strict=True)
            )
            if factors == (1, 1, 1):
                continue
            pooled = F.avg_pool3d(
                img.as_tensor()[None].float(), kernel_size=factors, stride=factors
            )[0]
            scale = np.eye(4)
            scale[:3, :3] = np.diag(factors)
            scale[:3, 3] = [(f - 1) / 2.0 for f in factors]
            d[key] = MetaTensor(pooled, affine=torch.as_tensor(affine @ scale))
        return d


def build_transforms(cfg: PreprocessConfig, with_masks: bool = False) -> Compose:
    """The preprocessing chain on dictionaries with ``image`` (and ``masks``) MetaTensors."""
    keys = ["image", "masks"] if with_masks else ["image"]
    lo, hi = cfg.hu_window
    return Compose(
        [
            Orientationd(keys=keys, axcodes=cfg.orientation, labels=None),
            AreaDownsampled(keys=keys, target_spacing=cfg.spacing_mm),
            Spacingd(
                keys=keys,
                pixdim=cfg.spacing_mm,
                mode="bilinear",
                padding_mode="border",
                dtype=np.float32,
            ),
            ScaleIntensityRanged(
                keys=["image"],
                a_min=lo,
                a_max=hi,
                b_min=cfg.offset,
                b_max=cfg.offset + 1.0,
                clip=True,
            ),
            ResizeWithPadOrCropd(
                keys=["image"], spatial_size=cfg.size, mode="constant", value=cfg.pad_value
            ),
            *(
                [
                    ResizeWithPadOrCropd(
                        keys=["masks"], spatial_size=cfg.size, mode="constant", value=0.0
                    )
                ]
                if with_masks
                else []
            ),
        ]
    )


def preprocess(
    hu: npt.NDArray[Any],
    affine_lps: npt.NDArray[np.float64],
    cfg: PreprocessConfig,
    masks: npt.NDArray[Any] | None = None,
) -> ModelInput:
    """Bring a CT volume (and optional masks) onto the model grid.

    Parameters
    ----------
    hu
        ``(D0, D1, D2)`` Hounsfield units, any numeric dtype.
    affine_lps
        4x4 voxel index -> LPS patient coordinates (mm).
    cfg
        The configuration's preprocessing.
    masks
        Optional ``(C, D0, D1, D2)`` binary masks on the same grid as ``hu``.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {hu.shape}")
    affine_ras = torch.as_tensor(LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64))
    data: dict[str, Any] = {
        "image": MetaTensor(
            torch.as_tensor(np.asarray(hu, dtype=np.float32))[None], affine=affine_ras
        )
    }
    if masks is not None:
        if masks.shape[1:] != hu.shape:
            raise ValueError(f"masks shape {masks.shape} does not match volume {hu.shape}")
        data["masks"] = MetaTensor(
            torch.as_tensor(np.asarray(masks, dtype=np.float32)), affine=affine_ras
        )
    out = build_transforms(cfg, with_masks=masks is not None)(data)
    image: MetaTensor = out["image"]
    model_masks = None
    if masks is not None:
        model_masks = np.ascontiguousarray(
            out["masks"].as_tensor().numpy().clip(0.0, 1.0), dtype=np.float32
        )
    return ModelInput(
        image=np.ascontiguousarray(image.as_tensor()[0].numpy(), dtype=np.float32),
        affine_ras=np.asarray(image.affine, dtype=np.float64),
        masks=model_masks,
    )


def to_source_grid(
    maps: npt.NDArray[Any],
    model_affine_ras: npt.NDArray[np.float64],
    source_affine_lps: npt.NDArray[np.float64],
    source_shape: tuple[int, int, int],
    chunk: int = 32,
) -> FloatArray:
    """Resample model-grid maps back onto the source voxel grid (trilinear).

    Parameters
    ----------
    maps
        ``(C, D, H, W)`` maps on the model grid (probabilities).
    model_affine_ras
        The model grid's affine, from :class:`ModelInput`.
    source_affine_lps, source_shape
        The source volume's geometry.
    chunk
        Source slices (along axis 0) resampled at a time, to bound memory.

    Returns
    -------
    ``(C, *source_shape)`` float32; outside the model grid the value is 0.
    """
    maps_t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]  # (1, C, D, H, W)
    dims = np.array(maps_t.shape[2:], dtype=np.float64)
    src_to_model = np.linalg.inv(model_affine_ras) @ (
        LPS_TO_RAS @ np.asarray(source_affine_lps, dtype=np.float64)
    )
    # grid_sample wants (x, y, z) = (w, h, d) normalised to [-1, 1] (align_corners=True):
    # fold that normalisation into the affine, then the grid is an outer sum per axis.
    norm = np.eye(4)
    norm[:3, :3] = np.diag(2.0 / np.maximum(dims - 1.0, 1.0))
    norm[:3, 3] = -1.0
    m = torch.as_tensor((norm @ src_to_model)[[2, 1, 0]], dtype=torch.float32)  # rows: x, y, z
    j = torch.arange(source_shape[1], dtype=torch.float32)
    k = torch.arange(source_shape[2], dtype=torch.float32)
    plane = j[:, None, None] * m[:, 1] + k[None, :, None] * m[:, 2] + m[:, 3]  # (H0, W0, 3)
    out = np.zeros((maps_t.shape[1], *source_shape), dtype=np.float32)
    for start in range(0, source_shape[0], chunk):
        stop = min(start + chunk, source_shape[0])
        i = torch.arange(start, stop, dtype=torch.float32)
        grid = plane[None] + i[:, None, None, None] * m[:, 0]  # (n, H0, W0, 3)
        sampled = F.grid_sample(
            maps_t, grid[None], mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out[:, start:stop] = sampled[0].numpy()
    return out
