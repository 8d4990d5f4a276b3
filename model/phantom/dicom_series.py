"""Write a volume as a CT Image Storage series, one single-frame instance per slice.

The phantoms (and the tests) produce arrays; the node consumes DICOM. This module is the
bridge: :func:`write_ct_series` turns a ``(D, H, W)`` Hounsfield-unit array and its
voxel-to-patient affine into files that a PACS would send, following the CT Image IOD
(DICOM PS3.3 A.3) with the Image Plane Module (PS3.3 C.7.6.2) carrying the geometry.
It depends on nothing but arrays, so it serves any generator.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

logger = logging.getLogger(__name__)

#: Stored value = HU - RESCALE_INTERCEPT (slope 1), DICOM PS3.3 C.11.1.1.2.
RESCALE_INTERCEPT = -1024

InstanceOrder = Literal["ascending", "descending", "shuffled"]
PixelRepresentation = Literal["auto", "unsigned", "signed"]

_LOSSLESS_SYNTAXES = frozenset({RLELossless, JPEGLSLossless, JPEG2000Lossless})


def _ds(value: float) -> str:
    """A Decimal String (VR DS) of at most 16 characters, PS3.5 6.2."""
    return format_number_as_ds(float(value))


def _geometry(
    affine_lps: npt.NDArray[np.float64],
) -> tuple[list[float], tuple[float, float], npt.NDArray[np.float64]]:
    """Image Orientation (Patient), Pixel Spacing and slice step from an index affine.

    DICOM's row direction cosine (first triplet of Image Orientation (Patient),
    PS3.3 C.7.6.2.1.1) is the direction of increasing *column* index, and Pixel
    Spacing is ``[spacing between rows, spacing between columns]``.
    """
    affine = np.asarray(affine_lps, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine_lps must be 4x4, got {affine.shape}")
    slice_step, row_step, col_step = affine[:3, 0], affine[:3, 1], affine[:3, 2]
    row_spacing = float(np.linalg.norm(row_step))
    col_spacing = float(np.linalg.norm(col_step))
    if row_spacing <= 0 or col_spacing <= 0 or float(np.linalg.norm(slice_step)) <= 0:
        raise ValueError("affine_lps has a zero-length axis")
    row_cos = col_step / col_spacing
    col_cos = row_step / row_spacing
    if abs(float(row_cos @ col_cos)) > 1e-4:
        raise ValueError("the row and column axes of affine_lps are not orthogonal")
    normal = np.cross(row_cos, col_cos)
    if abs(float(normal @ slice_step)) < 1e-6:
        raise ValueError("the slice axis of affine_lps lies in the image plane")
    iop = [float(v) for v in (*row_cos, *col_cos)]
    return iop, (row_spacing, col_spacing), slice_step


def _instance_numbers(depth: int, order: InstanceOrder, rng_seed: int) -> npt.NDArray[np.int64]:
    """Instance Number (1-based) of each slice index, for the requested order."""
    if order == "ascending":
        return np.arange(1, depth + 1)
    if order == "descending":
        return np.arange(depth, 0, -1)
    if order == "shuffled":
        return np.random.default_rng(rng_seed).permutation(depth) + 1
    raise ValueError(f"instance_order must be ascending, descending or shuffled, got {order!r}")


def _stored_values(
    hu: npt.NDArray[np.int16], pixel_representation: PixelRepresentation
) -> tuple[npt.NDArray[np.uint16] | npt.NDArray[np.int16], int]:
    """Stored pixel values and Pixel Representation (0 unsigned, 1 signed), PS3.3 C.7.6.3."""
    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    lo, hi = int(stored.min()), int(stored.max())
    if pixel_representation == "auto":
        pixel_representation = "unsigned" if lo >= 0 else "signed"
    if pixel_representation == "unsigned":
        if lo < 0 or hi > np.iinfo(np.uint16).max:
            raise ValueError(
                f"HU range [{lo - 1024}, {hi - 1024}] does not fit unsigned pixel data"
            )
        return stored.astype(np.uint16), 0
    if lo < np.iinfo(np.int16).min or hi > np.iinfo(np.int16).max:
        raise ValueError(f"HU range [{lo - 1024}, {hi - 1024}] does not fit signed pixel data")
    return stored.astype(np.int16), 1


def write_ct_series(
    hu: npt.NDArray[np.int16],
    affine_lps: npt.NDArray[np.float64],
    out_dir: Path,
    *,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str = "",
    patient_sex: str = "O",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Chest CT",
    accession_number: str = "",
    slice_thickness: float | None = None,
    instance_order: InstanceOrder = "ascending",
    rng_seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    pixel_representation: PixelRepresentation = "auto",
    study_datetime: dt.datetime | None = None,
) -> list[Path]:
    """Write ``hu`` as a CT Image Storage series, one file per slice.

    Parameters
    ----------
    hu
        ``(D, H, W)`` Hounsfield units (integers; int16 range).
    affine_lps
        4x4 map from voxel index ``(slice, row, column, 1)`` to LPS patient coordinates
        in mm: column 0 is the step between slices, column 1 the step along a column
        (next row), column 2 the step along a row (next column), column 3 the centre of
        voxel ``(0, 0, 0)``. Oblique and flipped axes are allowed; the slice step need
        not be along the plane normal (gantry tilt) but must leave the image plane.
    out_dir
        Directory to create the files in (created if missing).
    patient_name, patient_id, patient_birth_date, patient_sex
        Patient Module (PS3.3 C.7.1.1). The birth date is ``YYYYMMDD`` or empty.
    study_uid, series_uid, frame_of_reference_uid
        UIDs to use; new ones are generated when ``None``.
    series_number, series_description, accession_number
        General Series / General Study attributes.
    slice_thickness
        Slice Thickness (mm); defaults to the distance between slices.
    instance_order
        How Instance Number relates to position: ``"ascending"`` (1 at slice 0),
        ``"descending"`` (1 at the last slice) or ``"shuffled"`` (a permutation drawn
        from ``rng_seed``), to exercise readers that must sort by position.
    rng_seed
        Seed of the ``"shuffled"`` permutation.
    transfer_syntax
        Transfer Syntax UID. Native (Explicit/Implicit VR Little Endian) or any
        lossless syntax pydicom can encode here (RLE Lossless, JPEG-LS Lossless,
        JPEG 2000 Lossless, with the matching plugin installed).
    pixel_representation
        ``"unsigned"`` (stored = HU + 1024), ``"signed"`` (the same values as int16),
        or ``"auto"``: unsigned unless some HU is below -1024.
    study_datetime
        Study/Series/Acquisition/Content date and time; now when ``None``.

    Returns
    -------
    list[pathlib.Path]
        The written files, in Instance Number order (``IM00001.dcm`` first).

    Raises
    ------
    ValueError
        If the array or affine cannot describe a valid series.
    """
    arr = np.asarray(hu)
    if arr.ndim != 3 or arr.shape[0] < 1:
        raise ValueError(f"hu must be a (D, H, W) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"hu must hold integers (HU), got dtype {arr.dtype}")
    syntax = UID(transfer_syntax)
    if not syntax.is_transfer_syntax:
        raise ValueError(f"{transfer_syntax} is not a transfer syntax UID")
    if syntax.is_encapsulated and syntax not in _LOSSLESS_SYNTAXES:
        raise ValueError(f"transfer syntax {syntax.name} is not a supported lossless syntax")

    iop, pixel_spacing, slice_step = _geometry(np.asarray(affine_lps, dtype=np.float64))
    affine = np.asarray(affine_lps, dtype=np.float64)
    stored, pixel_rep = _stored_values(arr.astype(np.int32).astype(np.int16), pixel_representation)
    depth, rows, cols = arr.shape
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    spacing_between = abs(float(normal @ slice_step))
    thickness = spacing_between if slice_thickness is None else float(slice_thickness)
    numbers = _instance_numbers(depth, instance_order, rng_seed)

    when = study_datetime or dt.datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()

    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[int, Path] = {}
    for index in range(depth):
        number = int(numbers[index])
        position = affine @ np.array([index, 0.0, 0.0, 1.0])
        ds = _slice_dataset(
            patient=(patient_name, patient_id, patient_birth_date, patient_sex),
            uids=(study_uid, series_uid, for_uid),
            date=date,
            time=time,
            series_number=series_number,
            series_description=series_description,
            accession_number=accession_number,
            instance_number=number,
            iop=iop,
            ipp=position[:3],
            slice_location=float(normal @ position[:3]),
            pixel_spacing=pixel_spacing,
            thickness=thickness,
            spacing_between=spacing_between,
            images_in_acquisition=depth,
            rows=rows,
            cols=cols,
            pixel_rep=pixel_rep,
        )
        ds.file_meta = _file_meta(ds.SOPInstanceUID, syntax)
        plane = np.ascontiguousarray(stored[index])
        if syntax.is_encapsulated:
            ds.compress(syntax, plane, generate_instance_uid=False)
        else:
            ds.PixelData = plane.tobytes()
        path = out_dir / f"IM{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written[number] = path
    logger.debug("wrote %d CT instances of series %s to %s", depth, series_uid, out_dir)
    return [written[n] for n in sorted(written)]


def _file_meta(sop_instance_uid: str, syntax: UID) -> FileMetaDataset:
    """File Meta Information, PS3.10 7.1."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _slice_dataset(
    *,
    patient: tuple[str, str, str, str],
    uids: tuple[str, str, str],
    date: str,
    time: str,
    series_number: int,
    series_description: str,
    accession_number: str,
    instance_number: int,
    iop: Sequence[float],
    ipp: npt.NDArray[np.float64],
    slice_location: float,
    pixel_spacing: tuple[float, float],
    thickness: float,
    spacing_between: float,
    images_in_acquisition: int,
    rows: int,
    cols: int,
    pixel_rep: int,
) -> Dataset:
    """One CT Image Storage instance without its pixels (PS3.3 A.3.3 module table)."""
    name, pid, birth_date, sex = patient
    study_uid, series_uid, for_uid = uids
    ds = Dataset()
    # SOP Common (C.12.1)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient (C.7.1.1)
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth_date
    ds.PatientSex = sex
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "Chest CT"
    # General Series (C.7.3.1); Patient Position is Type 2C for CT
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS"
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "UniCT Node phantom"
    ds.ManufacturerModelName = "write_ct_series"
    ds.SoftwareVersions = "1"
    # General Acquisition (C.7.10.1) and General Image (C.7.6.1)
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.InstanceNumber = instance_number
    ds.ImagesInAcquisition = images_in_acquisition
    ds.BurnedInAnnotation = "NO"
    # Image Plane (C.7.6.2)
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.SliceThickness = _ds(thickness)
    ds.SpacingBetweenSlices = _ds(spacing_between)
    ds.SliceLocation = _ds(slice_location)
    # Image Pixel (C.7.6.3) and CT Image (C.8.2.1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = pixel_rep
    ds.RescaleIntercept = _ds(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ExposureTime = 500
    ds.ConvolutionKernel = "STANDARD"
    ds.ReconstructionDiameter = _ds(max(rows * pixel_spacing[0], cols * pixel_spacing[1]))
    ds.ScanOptions = "HELICAL"
    return ds
