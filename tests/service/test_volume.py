"""load_series: ordered by position along the normal, HU applied, bad geometry refused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from service.errors import SeriesGeometryError, StageError
from service.stages import Stage
from service.volume import load_series
from tests.service.dicom_fixtures import (
    Sphere,
    axial_affine,
    oblique_affine,
    sphere_phantom,
    write_phantom_series,
)

SHAPE = (12, 128, 128)
SPHERES = (Sphere((-30.0, 5.0, -35.0), 12.0, 8),)
PATIENT_NAME = "Phantom^Test"
PATIENT_ID = "PHANTOM-1"


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("series")
    write_phantom_series(out, SHAPE, axial_affine(), SPHERES, instance_order="shuffled")
    return out


@pytest.fixture
def series_copy(series_dir: Path, tmp_path: Path) -> list[Path]:
    """A private copy of the series that a test may edit."""
    out = tmp_path / "copy"
    shutil.copytree(series_dir, out)
    return sorted(out.glob("*.dcm"))


def _expected(affine: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    return sphere_phantom(SHAPE, affine, SPHERES).astype(np.float32)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_any_instance_order_gives_the_same_volume(tmp_path: Path, order: str) -> None:
    affine = axial_affine()
    paths = write_phantom_series(tmp_path, SHAPE, affine, SPHERES, instance_order=order, rng_seed=7)
    volume = load_series(list(reversed(paths)) if order == "ascending" else paths)
    np.testing.assert_array_equal(volume.hu, _expected(affine))
    assert volume.hu.dtype == np.float32
    np.testing.assert_allclose(volume.affine_lps, affine, atol=1e-4)
    assert volume.spacing == pytest.approx((2.5, 1.5, 1.5))
    assert volume.slice_thickness == pytest.approx(2.5)
    assert volume.shape == SHAPE
    assert volume.voxel_volume_ml == pytest.approx(2.5 * 1.5 * 1.5 / 1000)


def test_datasets_follow_the_volume_without_pixel_data(series_dir: Path) -> None:
    volume = load_series(sorted(series_dir.glob("*.dcm")))
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z)
    assert all("PixelData" not in ds for ds in volume.datasets)
    first = volume.datasets[0]
    assert volume.study_instance_uid == first.StudyInstanceUID
    assert volume.series_instance_uid == first.SeriesInstanceUID
    assert volume.frame_of_reference_uid == first.FrameOfReferenceUID
    assert len({ds.SOPInstanceUID for ds in volume.datasets}) == SHAPE[0]
    # What highdicom needs for references and geometry is kept.
    for keyword in ("SOPClassUID", "PatientID", "ImageOrientationPatient", "PixelSpacing", "Rows"):
        assert keyword in first


def test_descending_slices_are_sorted_ascending_along_the_normal(tmp_path: Path) -> None:
    affine = axial_affine()
    affine[:3, 0] *= -1  # slice 0 is the most superior
    paths = write_phantom_series(tmp_path, SHAPE, affine, SPHERES)
    volume = load_series(paths)
    np.testing.assert_array_equal(volume.hu, _expected(affine)[::-1])
    assert volume.affine_lps[2, 0] == pytest.approx(2.5)
    np.testing.assert_allclose(
        volume.affine_lps @ [SHAPE[0] - 1, 0, 0, 1], affine @ [0, 0, 0, 1], atol=1e-4
    )


@pytest.mark.parametrize("flip_rows", [False, True])
def test_oblique_and_flipped_series(tmp_path: Path, flip_rows: bool) -> None:
    affine = oblique_affine(SHAPE, degrees=15.0, flip_rows=flip_rows)
    paths = write_phantom_series(tmp_path, SHAPE, affine, SPHERES, instance_order="shuffled")
    volume = load_series(paths)
    normal = np.cross(affine[:3, 2], affine[:3, 1])
    ascending = float(normal @ affine[:3, 0]) > 0
    expected = _expected(affine)
    np.testing.assert_array_equal(volume.hu, expected if ascending else expected[::-1])
    # Every voxel keeps its patient position.
    last = SHAPE[0] - 1
    for index in ((0, 0, 0), (last, 127, 5)):
        source = index if ascending else (last - index[0], *index[1:])
        np.testing.assert_allclose(
            volume.affine_lps @ [*index, 1], affine @ [*source, 1], atol=1e-3
        )


def test_gantry_tilt_is_a_sheared_grid(tmp_path: Path) -> None:
    affine = axial_affine()
    affine[:3, 0] = [0.0, 0.4, 2.5]  # each slice shifts 0.4 mm along y
    paths = write_phantom_series(tmp_path, SHAPE, affine)
    volume = load_series(paths)
    np.testing.assert_allclose(volume.affine_lps, affine, atol=1e-4)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series(tmp_path: Path, syntax: str) -> None:
    if not get_encoder(syntax).is_available:
        pytest.skip(f"no pydicom encoder plugin for {syntax}")
    affine = axial_affine()
    paths = write_phantom_series(tmp_path, SHAPE, affine, SPHERES, transfer_syntax=syntax)
    np.testing.assert_array_equal(load_series(paths).hu, _expected(affine))


def test_signed_pixel_data_and_rescale(tmp_path: Path) -> None:
    affine = axial_affine()
    paths = write_phantom_series(tmp_path, SHAPE, affine, SPHERES, pixel_representation="signed")
    for path in paths:  # a scanner with another slope and intercept
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "2"
        ds.RescaleIntercept = "-3000"
        ds.save_as(path)
    stored = _expected(affine) + 1024
    np.testing.assert_array_equal(load_series(paths).hu, stored * 2 - 3000)


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        delattr(ds, keyword)

    return change


def _set(keyword: str, value: object) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        setattr(ds, keyword, value)

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_delete("ImagePositionPatient"), "no ImagePositionPatient"),
        (_delete("ImageOrientationPatient"), "no ImageOrientationPatient"),
        (_delete("PixelSpacing"), "no PixelSpacing"),
        (
            _set("ImageOrientationPatient", [1, 0, 0, 0, 0.9848, -0.1736]),
            "mixed ImageOrientationPatient",
        ),
        (_set("Rows", 64), "mixed Rows/Columns"),
        (_set("PixelSpacing", [1.4, 1.5]), "mixed PixelSpacing"),
        (_set("SeriesInstanceUID", generate_uid()), "differ in SeriesInstanceUID"),
        (_set("FrameOfReferenceUID", generate_uid()), "differ in FrameOfReferenceUID"),
    ],
)
def test_refused_headers(
    series_copy: list[Path], change: Callable[[pydicom.Dataset], None], reason: str
) -> None:
    _edit(series_copy[len(series_copy) // 2], change)
    with pytest.raises(SeriesGeometryError, match=reason) as info:
        load_series(series_copy)
    assert info.value.stage == Stage.LOAD
    assert PATIENT_NAME not in str(info.value) and PATIENT_ID not in str(info.value)


def test_refuses_duplicate_positions(series_copy: list[Path], tmp_path: Path) -> None:
    duplicate = tmp_path / "duplicate.dcm"
    shutil.copy(series_copy[3], duplicate)
    _edit(duplicate, _set("SOPInstanceUID", generate_uid()))
    with pytest.raises(SeriesGeometryError, match="more than once"):
        load_series([*series_copy, duplicate])


def test_refuses_a_gap(series_dir: Path) -> None:
    volume_paths = load_series(sorted(series_dir.glob("*.dcm")))
    by_uid = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
        for p in series_dir.glob("*.dcm")
    }
    middle = volume_paths.datasets[SHAPE[0] // 2].SOPInstanceUID
    paths = [p for uid, p in by_uid.items() if uid != middle]
    with pytest.raises(SeriesGeometryError, match="not uniformly spaced"):
        load_series(paths)


def test_refuses_a_single_slice(series_copy: list[Path]) -> None:
    with pytest.raises(SeriesGeometryError, match="at least 2 slices"):
        load_series(series_copy[:1])


def test_unreadable_file_fails_the_load_stage(series_copy: list[Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not a DICOM file at all")
    with pytest.raises(StageError) as info:
        load_series([*series_copy, junk])
    assert info.value.stage == Stage.LOAD
    assert "junk.dcm" in info.value.reason
