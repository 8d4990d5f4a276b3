"""write_ct_series: valid CT Image Storage instances whose geometry is the affine's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from model.phantom.dicom_series import write_ct_series

DCIODVFY = shutil.which("dciodvfy")
SHAPE = (6, 32, 48)


def _affine(oblique: bool = False, flip: bool = False) -> npt.NDArray[np.float64]:
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, 2.5]
    affine[:3, 1] = [0.0, 0.8, 0.0]
    affine[:3, 2] = [0.7, 0.0, 0.0]
    if oblique:
        t = np.deg2rad(20.0)
        rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
        affine[:3, :3] = rot @ affine[:3, :3]
    if flip:
        affine[:3, 1] *= -1
        affine[:3, 0] *= -1
    affine[:3, 3] = [-20.0, 10.0, -35.5]
    return affine


def _hu(seed: int = 0, low: int = -1024) -> npt.NDArray[np.int16]:
    return np.random.default_rng(seed).integers(low, 1500, SHAPE).astype(np.int16)


def _write(tmp_path: Path, hu: npt.NDArray[np.int16] | None = None, **kwargs: object) -> list[Path]:
    options: dict[str, object] = {"patient_name": "Test^Writer", "patient_id": "W-1"}
    options.update(kwargs)
    affine = options.pop("affine", _affine())
    return write_ct_series(_hu() if hu is None else hu, affine, tmp_path, **options)  # type: ignore[arg-type]


def _slice_index(ds: pydicom.Dataset, affine: npt.NDArray[np.float64]) -> int:
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    steps = (position - affine[:3, 3]) @ affine[:3, 0] / (affine[:3, 0] @ affine[:3, 0])
    return round(float(steps))


def test_writes_one_ct_instance_per_slice_with_the_pixels(tmp_path: Path) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu)
    assert len(paths) == SHAPE[0]
    uids = set()
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.Modality == "CT"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert (ds.Rows, ds.Columns) == SHAPE[1:]
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert ds.ImagesInAcquisition == SHAPE[0]
        assert float(ds.KVP) > 0
        index = _slice_index(ds, _affine())
        stored = ds.pixel_array.astype(np.int32)
        np.testing.assert_array_equal(stored - 1024, hu[index])
        uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
    assert len(uids) == 1


@pytest.mark.parametrize(("oblique", "flip"), [(False, False), (True, False), (True, True)])
def test_geometry_follows_the_affine(tmp_path: Path, oblique: bool, flip: bool) -> None:
    affine = _affine(oblique, flip)
    paths = _write(tmp_path, affine=affine, slice_thickness=3.0)
    for path in paths:
        ds = pydicom.dcmread(path)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        np.testing.assert_allclose(iop[:3], affine[:3, 2] / 0.7, atol=1e-6)
        np.testing.assert_allclose(iop[3:], affine[:3, 1] / 0.8, atol=1e-6)
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.8, 0.7])
        index = _slice_index(ds, affine)
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], (affine @ [index, 0, 0, 1])[:3], atol=1e-4
        )
        assert float(ds.SliceThickness) == pytest.approx(3.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(2.5)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_instance_order(tmp_path: Path, order: str) -> None:
    paths = _write(tmp_path, instance_order=order, rng_seed=3)
    by_index = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        by_index[_slice_index(ds, _affine())] = int(ds.InstanceNumber)
    numbers = [by_index[i] for i in range(SHAPE[0])]
    assert sorted(numbers) == list(range(1, SHAPE[0] + 1))
    if order == "ascending":
        assert numbers == sorted(numbers)
    elif order == "descending":
        assert numbers == sorted(numbers, reverse=True)
    else:
        assert numbers not in (sorted(numbers), sorted(numbers, reverse=True))
    assert [p.name for p in paths] == [f"IM{n:05d}.dcm" for n in range(1, SHAPE[0] + 1)]


def test_signed_pixel_data_below_minus_1024(tmp_path: Path) -> None:
    hu = _hu(low=-2048)
    paths = _write(tmp_path, hu)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == 1
    index = _slice_index(ds, _affine())
    np.testing.assert_array_equal(ds.pixel_array.astype(np.int32) - 1024, hu[index])
    unsigned = pydicom.dcmread(_write(tmp_path / "u", pixel_representation="unsigned")[0])
    assert unsigned.PixelRepresentation == 0


@pytest.mark.parametrize(
    "syntax", [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless]
)
def test_transfer_syntaxes_round_trip(tmp_path: Path, syntax: str) -> None:
    if syntax not in (ImplicitVRLittleEndian,) and not get_encoder(syntax).is_available:
        pytest.skip(f"no pydicom encoder plugin for {syntax}")
    hu = _hu()
    paths = _write(tmp_path, hu, transfer_syntax=syntax)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(
            ds.pixel_array.astype(np.int32) - 1024, hu[_slice_index(ds, _affine())]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hu": np.zeros((4, 4), np.int16)}, "shape"),
        ({"hu": np.zeros(SHAPE, np.float32)}, "integers"),
        ({"transfer_syntax": JPEGBaseline8Bit}, "lossless"),
        ({"instance_order": "random"}, "instance_order"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _write(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_refuses_in_plane_slice_axis(tmp_path: Path) -> None:
    affine = _affine()
    affine[:3, 0] = [0.0, 2.5, 0.0]  # along the rows: no volume
    with pytest.raises(ValueError, match="image plane"):
        _write(tmp_path, affine=affine)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_dciodvfy_finds_no_errors(tmp_path: Path, syntax: str) -> None:
    paths = _write(
        tmp_path, _hu(low=-2000), affine=_affine(oblique=True, flip=True), transfer_syntax=syntax
    )
    assert DCIODVFY is not None
    for path in (paths[0], paths[-1]):
        proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if re.match(r"^\s*Error", line)]
        assert not errors, output
        assert proc.returncode == 0, output
