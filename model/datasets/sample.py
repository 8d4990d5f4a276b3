"""The common form every dataset reader returns, and the way into the model's transforms.

A :class:`Sample` is one CT volume in the array convention of the phantoms and the node
(axis 0 inferior -> superior, axis 1 anterior -> posterior, axis 2 right -> left, with a
4x4 voxel -> LPS affine), with whatever labels its source carries: segmentation masks,
presence of the ten abnormalities of :mod:`model.labels`, and a report.

:func:`canonical_axes` brings any NIfTI array (RAS affine, any axis order) into that
convention; :func:`to_model_input` runs a sample through :func:`model.transforms.preprocess`,
the preprocessing of training and inference, so real data and phantoms share one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from model.config import PreprocessConfig
from model.labels import NUM_LABELS

if TYPE_CHECKING:
    from model.transforms import ModelInput

FloatArray = npt.NDArray[np.float32]
Affine = npt.NDArray[np.float64]

#: Flips x and y: LPS <-> RAS (its own inverse).
LPS_TO_RAS: Affine = np.diag([-1.0, -1.0, 1.0, 1.0])

#: nibabel axis codes (RAS space) of our convention: axis 0 towards superior, axis 1
#: towards posterior, axis 2 towards the patient's left.
OUR_AXCODES: tuple[str, str, str] = ("S", "P", "L")


@dataclass(frozen=True, eq=False)
class Sample:
    """One CT volume with its labels, in the node's array convention.

    Attributes
    ----------
    name
        Identifier in the source dataset (e.g. the CT-RATE ``VolumeName``).
    hu
        ``(D, H, W)`` float32 Hounsfield units; axis 0 inferior -> superior, axis 1
        anterior -> posterior, axis 2 right -> left (nearest to these for oblique data).
    affine_lps
        4x4 voxel index ``(d, h, w)`` -> LPS patient coordinates (mm).
    masks
        ``(10, D, H, W)`` uint8 binary masks in :data:`model.labels.DEFAULT_LABELS` order,
        or ``None`` when the source has no segmentation.
    present
        ``(10,)`` bool presence of each abnormality, or ``None`` when the source has no
        labels for this volume.
    report
        Report text ("" when the source has none).
    present_known
        ``(10,)`` bool: which entries of :attr:`present` the source actually asserts
        (``False`` entries of :attr:`present` are then "unknown", not "absent").
        ``None`` means every entry is known when :attr:`present` is given.
    """

    name: str
    hu: FloatArray
    affine_lps: Affine
    masks: npt.NDArray[np.uint8] | None
    present: npt.NDArray[np.bool_] | None
    report: str
    present_known: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"{self.name}: hu must be (D, H, W), got shape {self.hu.shape}")
        if self.affine_lps.shape != (4, 4):
            raise ValueError(f"{self.name}: affine_lps must be 4x4, got {self.affine_lps.shape}")
        if self.masks is not None and self.masks.shape != (NUM_LABELS, *self.hu.shape):
            raise ValueError(
                f"{self.name}: masks shape {self.masks.shape} is not "
                f"({NUM_LABELS}, {', '.join(map(str, self.hu.shape))})"
            )
        for field_name in ("present", "present_known"):
            value = getattr(self, field_name)
            if value is not None and value.shape != (NUM_LABELS,):
                raise ValueError(
                    f"{self.name}: {field_name} must be ({NUM_LABELS},), got {value.shape}"
                )
        if self.present_known is not None and self.present is None:
            raise ValueError(f"{self.name}: present_known without present")

    @property
    def known(self) -> npt.NDArray[np.bool_]:
        """``(10,)`` which entries of :attr:`present` are asserted by the source."""
        if self.present is None:
            return np.zeros(NUM_LABELS, dtype=np.bool_)
        if self.present_known is None:
            return np.ones(NUM_LABELS, dtype=np.bool_)
        return self.present_known


def canonical_axes(
    arrays: tuple[npt.NDArray[Any], ...], affine_ras: Affine
) -> tuple[tuple[npt.NDArray[Any], ...], Affine]:
    """Reorder and flip the last three axes of arrays into our convention.

    Parameters
    ----------
    arrays
        Arrays sharing one voxel grid on their last three axes (a volume ``(A, B, C)``,
        masks ``(F, A, B, C)``...).
    affine_ras
        4x4 voxel -> RAS (mm) of that grid, as nibabel gives it.

    Returns
    -------
    tuple
        The arrays with their last three axes as (inferior->superior,
        anterior->posterior, right->left), and the 4x4 voxel -> LPS affine of the new
        grid. Oblique grids get the nearest axis assignment; their affine stays exact.
    """
    affine_ras = np.asarray(affine_ras, dtype=np.float64)
    if not arrays:
        raise ValueError("no array to reorient")
    shape = arrays[0].shape[-3:]
    current = io_orientation(affine_ras)  # type: ignore[no-untyped-call]
    target = axcodes2ornt(OUR_AXCODES)  # type: ignore[no-untyped-call]
    transform = ornt_transform(current, target)  # type: ignore[no-untyped-call]
    new_affine = affine_ras @ inv_ornt_aff(transform, shape)  # type: ignore[no-untyped-call]
    out = []
    for array in arrays:
        if array.shape[-3:] != shape:
            raise ValueError(f"array of shape {array.shape} is not on the grid {shape}")
        lead = array.ndim - 3
        result = array
        for axis in range(3):
            if transform[axis, 1] == -1:
                result = np.flip(result, axis=lead + axis)
        order = list(range(lead)) + [lead + int(a) for a in np.argsort(transform[:, 0])]
        out.append(np.ascontiguousarray(result.transpose(order)))
    return tuple(out), LPS_TO_RAS @ new_affine


def to_model_input(sample: Sample, cfg: PreprocessConfig) -> ModelInput:
    """Bring a sample onto the model grid with the node's preprocessing.

    Parameters
    ----------
    sample
        A sample from any reader of :mod:`model.datasets`.
    cfg
        The configuration's preprocessing (``get_config(name).preprocess``).

    Returns
    -------
    model.transforms.ModelInput
        Scaled image on the model grid, and masks there when the sample has them; the
        same :func:`model.transforms.preprocess` the phantom training cache and the node
        use, so a site can train or evaluate on its own data with identical transforms.
    """
    from model.transforms import preprocess  # torch and MONAI load only when needed

    return preprocess(sample.hu, sample.affine_lps, cfg, masks=sample.masks)
