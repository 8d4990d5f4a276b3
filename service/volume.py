"""Series to volume: read a single-frame CT series into one Hounsfield-unit array.

The slices are ordered by their position along the plane normal (the cross product of
the two direction cosines of Image Orientation (Patient), DICOM PS3.3 C.7.6.2.1.1),
never by Instance Number, which PACS and routers do not keep meaningful. Everything that
would make the array lie about the anatomy is refused with a
:class:`~service.errors.SeriesGeometryError` that names the attribute at fault: missing
Image Plane attributes, mixed orientations or matrix sizes, duplicate positions
(multi-phase series), gaps, and instances from another series or frame of reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from service.errors import SeriesGeometryError, StageError
from service.stages import Stage

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

#: Largest difference between two direction cosines still called the same orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Positions along the normal closer than this (mm) are the same slice position.
DUPLICATE_TOLERANCE_MM = 1e-2
#: Largest relative deviation of a slice from the uniform grid before it is a gap.
SPACING_TOLERANCE = 0.05

_NATIVE_LITTLE_ENDIAN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True, eq=False)
class SourceVolume:
    """A CT series as one volume, with the headers needed to reference it.

    Attributes
    ----------
    hu
        ``(D, H, W)`` float32 Hounsfield units (Rescale Slope and Intercept applied),
        slices ascending along the plane normal.
    affine_lps
        4x4 map from voxel index ``(slice, row, column, 1)`` to LPS patient
        coordinates (mm): column 0 is the step between slices, column 1 the step to
        the next row, column 2 the step to the next column, column 3 the centre of
        the first voxel of the first slice (its Image Position (Patient)).
    datasets
        The source instances in the same order as ``hu``, without Pixel Data:
        everything else is kept so SEG and SR can reference them (PS3.3 C.7.6.1.1.3).
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Shared by every instance.
    slice_thickness
        Slice Thickness (mm) of the first slice, ``None`` when absent or empty.
    spacing
        Voxel spacing (mm) along the three array axes: slice, row, column.
    """

    hu: FloatArray
    affine_lps: npt.NDArray[np.float64]
    datasets: tuple[Dataset, ...]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slice_thickness: float | None
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)``."""
        d, h, w = self.hu.shape
        return (int(d), int(h), int(w))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm³)."""
        return abs(float(np.linalg.det(self.affine_lps[:3, :3]))) / 1000.0


def _require(ds: Dataset, keyword: str, position: int) -> Any:
    """The value of ``keyword``, or a geometry error naming it."""
    value = ds.get(keyword)
    if value is None or (not isinstance(value, int | float) and len(value) == 0):
        raise SeriesGeometryError(f"instance {position + 1} of the series has no {keyword}")
    return value


def _read(path: Path, position: int) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise StageError(
            Stage.LOAD, f"cannot read instance {position + 1} ({path.name}): {type(exc).__name__}"
        ) from exc


def _floats(ds: Dataset, keyword: str, position: int, count: int) -> list[float]:
    """A multi-valued DS attribute as floats, or a geometry error naming it."""
    values = [float(v) for v in _require(ds, keyword, position)]
    if len(values) != count:
        raise SeriesGeometryError(
            f"{keyword} must have {count} values, instance {position + 1} has {len(values)}"
        )
    return values


def _check_single_frame(ds: Dataset, position: int) -> None:
    """Refuse what is not one greyscale slice before decoding it."""
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise SeriesGeometryError(
            f"instance {position + 1} is multi-frame; only single-frame series are supported"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesGeometryError(
            f"instance {position + 1} is not greyscale (SamplesPerPixel != 1)"
        )


def _permute_slices(volume: npt.NDArray[np.float32], order: npt.NDArray[np.intp]) -> None:
    """In place, ``volume[k] = old volume[order[k]]``: one slice of scratch, not a copy."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            done[start] = True
            continue
        scratch = volume[start].copy()
        k = start
        while True:
            done[k] = True
            source = int(order[k])
            if source == start:
                volume[k] = scratch
                break
            volume[k] = volume[source]
            k = source


def _check_consistent(
    datasets: Sequence[Dataset],
) -> tuple[npt.NDArray[np.float64], tuple[float, float], npt.NDArray[np.float64]]:
    """Check what every slice must share; return cosines, pixel spacing and positions."""
    first = datasets[0]
    for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "StudyInstanceUID"):
        _require(first, keyword, 0)
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1:
            raise SeriesGeometryError(
                f"instances differ in {keyword} ({len(values)} distinct values)"
            )
    orientations = np.array(
        [_floats(ds, "ImageOrientationPatient", i, 6) for i, ds in enumerate(datasets)]
    )
    spacings = np.array([_floats(ds, "PixelSpacing", i, 2) for i, ds in enumerate(datasets)])
    positions = np.array(
        [_floats(ds, "ImagePositionPatient", i, 3) for i, ds in enumerate(datasets)]
    )
    if len({(ds.get("Rows"), ds.get("Columns")) for ds in datasets}) > 1:
        raise SeriesGeometryError("instances have mixed Rows/Columns")
    iop, spacing = orientations[0], spacings[0]
    if np.max(np.abs(orientations - iop)) > ORIENTATION_TOLERANCE:
        raise SeriesGeometryError("instances have mixed ImageOrientationPatient")
    if np.any(spacing <= 0):
        raise SeriesGeometryError("PixelSpacing must be two positive values")
    if np.max(np.abs(spacings - spacing)) > 1e-4 * spacing.max():
        raise SeriesGeometryError("instances have mixed PixelSpacing")
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(row_cos @ col_cos) > 1e-3
    ):
        raise SeriesGeometryError("ImageOrientationPatient is not two orthogonal unit vectors")
    return iop, (float(spacing[0]), float(spacing[1])), positions


def _sort_and_check_positions(
    positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64], tolerance: float
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]:
    """Order by distance along ``normal``; refuse duplicates and non-uniform steps.

    Returns the order and the mean step vector between consecutive sorted slices (which
    need not be parallel to the normal: gantry tilt gives a sheared grid).
    """
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    sorted_positions = positions[order]
    gaps = np.diff(distances[order])
    duplicates = int(np.count_nonzero(gaps < DUPLICATE_TOLERANCE_MM))
    if duplicates:
        raise SeriesGeometryError(
            f"{duplicates} slice position(s) occur more than once along the normal "
            "(multi-phase, repeated or duplicated instances)"
        )
    n = len(positions)
    step = (sorted_positions[-1] - sorted_positions[0]) / (n - 1)
    step_length = float(np.linalg.norm(step))
    expected = sorted_positions[0] + np.arange(n)[:, None] * step
    deviation = float(np.max(np.linalg.norm(sorted_positions - expected, axis=1)))
    if deviation > max(tolerance * step_length, 1e-3):
        smallest, largest = float(gaps.min()), float(gaps.max())
        raise SeriesGeometryError(
            f"slices are not uniformly spaced: spacing along the normal ranges from "
            f"{smallest:.3f} to {largest:.3f} mm (missing slices or a gap), or positions "
            f"leave a straight line by up to {deviation:.3f} mm"
        )
    return order, step


def _native_stored(ds: Dataset) -> npt.NDArray[np.integer[Any]] | None:
    """Stored values of uncompressed 16-bit little-endian greyscale pixels, without copies.

    The common case of a CT series; anything else (compressed, 8 or 32 bits, big
    endian) returns ``None`` and goes through pydicom's pixel handlers.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax not in _NATIVE_LITTLE_ENDIAN or ds.get("BitsAllocated") != 16:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * cols * 2:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols)
    stored = stored.reshape(rows, cols)
    bits = int(ds.get("BitsStored", 16))
    if bits < 16:  # PS3.5 8.1.1: only the low BitsStored bits are the value
        shift = 16 - bits
        stored = (stored << shift) >> shift if signed else stored & ((1 << bits) - 1)
    return stored


def _decode_into(out: npt.NDArray[np.float32], ds: Dataset, position: int) -> None:
    """Write one slice in HU into ``out`` (Rescale Slope/Intercept, PS3.3 C.11.1.1.2)."""
    if "PixelData" not in ds:
        raise SeriesGeometryError(f"instance {position + 1} of the series has no PixelData")
    stored = _native_stored(ds)
    if stored is None:
        try:
            stored = ds.pixel_array
        except Exception as exc:  # the pixel handlers raise many types; the stage records it
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
            name = getattr(syntax, "name", str(syntax))
            raise StageError(
                Stage.LOAD, f"cannot decode pixel data of instance {position + 1} ({name}): {exc}"
            ) from exc
    if stored.shape != out.shape:
        raise SeriesGeometryError(f"instance {position + 1} has pixel data of shape {stored.shape}")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        np.multiply(stored, np.float32(slope), out=out, casting="unsafe")
    else:
        np.copyto(out, stored, casting="unsafe")
    if intercept != 0.0:
        out += np.float32(intercept)


def load_series(
    paths: Sequence[Path], *, spacing_tolerance: float = SPACING_TOLERANCE
) -> SourceVolume:
    """Read single-frame instances of one series into a :class:`SourceVolume`.

    Parameters
    ----------
    paths
        One file per instance, in any order.
    spacing_tolerance
        Largest deviation of a slice position from the uniform grid, as a fraction of
        the slice spacing, before the series is refused as having gaps.

    Returns
    -------
    SourceVolume
        Slices ascending along the normal of Image Orientation (Patient).

    Raises
    ------
    service.errors.SeriesGeometryError
        If the instances do not form one regular volume (the reason names why).
    service.errors.StageError
        If a file cannot be read or its pixel data cannot be decoded (stage ``load``).
    """
    if len(paths) < 2:
        if len(paths) == 1:
            # One Enhanced CT instance holds the whole volume: say that, not "1 slice".
            _check_single_frame(_read(Path(paths[0]), 0), 0)
        raise SeriesGeometryError(f"a volume needs at least 2 slices, got {len(paths)}")
    # One read per file, decoded at once into the volume (in file order) and its pixel
    # bytes dropped, so at most one file's pixel data is held besides the volume.
    datasets: list[Dataset] = []
    hu: npt.NDArray[np.float32] | None = None
    for i, path in enumerate(paths):
        ds = _read(Path(path), i)
        _check_single_frame(ds, i)
        if hu is None:
            hu = np.empty((len(paths), int(ds.Rows), int(ds.Columns)), dtype=np.float32)
        elif (ds.get("Rows"), ds.get("Columns")) != hu.shape[1:]:
            raise SeriesGeometryError("instances have mixed Rows/Columns")
        _decode_into(hu[i], ds, i)
        del ds.PixelData  # keep the headers, drop the bulk (and pydicom's cached array)
        datasets.append(ds)
    assert hu is not None
    iop, (row_spacing, col_spacing), positions = _check_consistent(datasets)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    order, step = _sort_and_check_positions(positions, normal, spacing_tolerance)
    ordered = [datasets[int(i)] for i in order]
    _permute_slices(hu, order)
    first = ordered[0]

    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = step
    affine[:3, 1] = col_cos * row_spacing
    affine[:3, 2] = row_cos * col_spacing
    affine[:3, 3] = positions[order[0]]
    thickness = first.get("SliceThickness")
    volume = SourceVolume(
        hu=hu,
        affine_lps=affine,
        datasets=tuple(ordered),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
        spacing=(float(np.linalg.norm(step)), row_spacing, col_spacing),
    )
    logger.info(
        "loaded series %s: %d slices of %dx%d, spacing %.3g/%.3g/%.3g mm",
        volume.series_instance_uid,
        *volume.shape,
        *volume.spacing,
    )
    return volume
