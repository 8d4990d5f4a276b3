"""Shared helpers for the service tests: synthetic CT series with known spheres,
test-double inference results, DICOM round trips and the external validators.

A plain module (not a conftest) so tests import exactly what they use.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from engines.base import InferenceResult
from model.card import ModelCard, default_labels
from model.config import SMALL
from model.phantom.dicom_series import write_ct_series
from model.transforms import LPS_TO_RAS, ModelInput, preprocess
from service.postprocess import AnalysisResult, postprocess
from service.volume import SourceVolume, load_series

AIR_HU = -1000
LUNG_HU = -850
LESION_HU = 40


@dataclass(frozen=True)
class Sphere:
    """A lesion of the phantom: centre in LPS (mm), radius (mm), card label index."""

    centre_lps: tuple[float, float, float]
    radius_mm: float
    label_index: int

    @property
    def volume_ml(self) -> float:
        return 4.0 / 3.0 * np.pi * self.radius_mm**3 / 1000.0

    @property
    def diameter_mm(self) -> float:
        return 2.0 * self.radius_mm


def axial_affine(
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    origin: tuple[float, float, float] = (-95.25, -95.25, -50.0),
) -> npt.NDArray[np.float64]:
    """Index (slice, row, col) -> LPS for an axial series, slices going superior."""
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, spacing[0]]
    affine[:3, 1] = [0.0, spacing[1], 0.0]
    affine[:3, 2] = [spacing[2], 0.0, 0.0]
    affine[:3, 3] = origin
    return affine


def oblique_affine(
    shape: Sequence[int],
    spacing: tuple[float, float, float] = (2.5, 1.5, 1.5),
    degrees: float = 12.0,
    centre: tuple[float, float, float] = (0.0, 0.0, -1.25),
    flip_rows: bool = False,
) -> npt.NDArray[np.float64]:
    """An axial grid rotated about the LPS y axis (rows optionally flipped) around ``centre``."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, 1.0, 0.0], [-np.sin(t), 0.0, np.cos(t)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ axial_affine(spacing)[:3, :3]
    if flip_rows:
        affine[:3, 1] *= -1
    middle = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ middle
    return affine


def voxel_centres_lps(
    shape: Sequence[int], affine: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``(*shape, 3)`` LPS coordinates of every voxel centre."""
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    idx = np.stack([*grids, np.ones(grids[0].shape)], axis=-1)
    return (idx @ np.asarray(affine).T)[..., :3]


def sphere_phantom(
    shape: tuple[int, int, int],
    affine: npt.NDArray[np.float64],
    spheres: Sequence[Sphere],
) -> npt.NDArray[np.int16]:
    """HU volume of a chest: air outside a body cylinder (radius 90 mm) with a soft-tissue
    wall 10 mm thick, two lungs inside it either side of a mediastinum 16 mm wide, and
    soft-tissue spheres."""
    lps = voxel_centres_lps(shape, affine)
    hu = np.full(shape, AIR_HU, dtype=np.int16)
    radius = np.hypot(lps[..., 0], lps[..., 1])
    hu[radius < 90.0] = LESION_HU
    hu[(radius < 80.0) & (np.abs(lps[..., 0]) > 8.0)] = LUNG_HU
    for sphere in spheres:
        inside = np.linalg.norm(lps - np.array(sphere.centre_lps), axis=-1) <= sphere.radius_mm
        hu[inside] = LESION_HU
    return hu


def write_phantom_series(
    out_dir: Path,
    shape: tuple[int, int, int],
    affine: npt.NDArray[np.float64],
    spheres: Sequence[Sphere] = (),
    **kwargs: object,
) -> list[Path]:
    """Write a sphere phantom as a CT series (keyword arguments go to write_ct_series)."""
    hu = sphere_phantom(shape, affine, spheres)
    options: dict[str, object] = {"patient_name": "Phantom^Test", "patient_id": "PHANTOM-1"}
    options.update(kwargs)
    return write_ct_series(hu, affine, out_dir, **options)  # type: ignore[arg-type]


def make_card(threshold: float = 0.5) -> ModelCard:
    """A small-configuration card with the default labels."""
    return ModelCard(
        name="UniCT",
        version="0.1.0-test",
        config=SMALL,
        labels=default_labels(threshold),
        training_data="synthetic phantoms (tests)",
        intended_use="tests",
    )


def model_grid_sphere(
    model_input: ModelInput, sphere: Sphere, ramp_mm: float = 24.0
) -> npt.NDArray[np.float32]:
    """Test double of a segmentation head: probability 0.5 exactly on the sphere surface.

    A wide linear ramp keeps trilinear resampling unbiased (a ramp clipped within a
    voxel of the surface would push the 0.5 level outwards).
    """
    lps_affine = LPS_TO_RAS @ model_input.affine_ras
    lps = voxel_centres_lps(model_input.image.shape, lps_affine)
    distance = np.linalg.norm(lps - np.array(sphere.centre_lps), axis=-1)
    probability = np.clip(0.5 + (sphere.radius_mm - distance) / ramp_mm, 0.0, 1.0)
    return np.asarray(probability, dtype=np.float32)


def fake_result(
    model_input: ModelInput,
    spheres: Sequence[Sphere],
    *,
    num_labels: int = 10,
    present_probability: float = 0.9,
    absent_probability: float = 0.1,
    report_text: str = "Synthetic report: a nodule in the right lung.",
) -> InferenceResult:
    """An :class:`InferenceResult` whose segmentation is the known spheres."""
    probabilities = np.full(num_labels, absent_probability, dtype=np.float32)
    segmentation = np.zeros((num_labels, *model_input.image.shape), dtype=np.float32)
    for sphere in spheres:
        probabilities[sphere.label_index] = present_probability
        segmentation[sphere.label_index] = np.maximum(
            segmentation[sphere.label_index], model_grid_sphere(model_input, sphere)
        )
    return InferenceResult(
        probabilities=probabilities,
        segmentation=segmentation,
        report_tokens=(1, 2, 3),
        report_text=report_text,
        fusion_attention=np.full((3, 3), 1.0 / 3.0, dtype=np.float32),
        engine="fake",
    )


def write_and_read(dataset: Dataset) -> Dataset:
    """Encode a dataset as a DICOM file in memory and read it back (as highdicom's tests do)."""
    with DicomBytesIO() as buffer:
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        encoded = buffer.getvalue()
    # An open buffer: highdicom deep-copies datasets, and pydicom copies their buffer.
    return pydicom.dcmread(io.BytesIO(encoded))


def report_of(sr: Dataset) -> hd.sr.MeasurementReport:
    """The TID 1500 content of an SR dataset."""
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def save(dataset: Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    return path


# --- external validators -------------------------------------------------------------

DCIODVFY = shutil.which("dciodvfy")
DSRDUMP = shutil.which("dsrdump", path="/usr/bin:/usr/local/bin")


def venv_tool(name: str) -> str | None:
    """A console script of the running interpreter's environment (dcmqi), else on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


SEGIMAGE2ITKIMAGE = venv_tool("segimage2itkimage")
TID1500READER = venv_tool("tid1500reader")


@dataclass(frozen=True)
class Validation:
    returncode: int
    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    output: str


def dciodvfy(path: Path) -> Validation:
    """Run dciodvfy; split its report into Error and Warning lines."""
    assert DCIODVFY is not None
    proc = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    return Validation(
        returncode=proc.returncode,
        errors=tuple(line for line in lines if re.match(r"^\s*Error", line)),
        warnings=tuple(line for line in lines if re.match(r"^\s*Warning", line)),
        output=output,
    )


@dataclass(frozen=True)
class AnalysedPhantom:
    """A phantom series loaded and analysed with a test-double inference result."""

    volume: SourceVolume
    model_input: ModelInput
    analysis: AnalysisResult
    card: ModelCard
    paths: tuple[Path, ...]


def analysed_phantom(
    out_dir: Path,
    spheres: Sequence[Sphere],
    shape: tuple[int, int, int] = (40, 128, 128),
    affine: npt.NDArray[np.float64] | None = None,
    **write_kwargs: object,
) -> AnalysedPhantom:
    """Write, load, preprocess and postprocess a sphere phantom."""
    card = make_card()
    paths = write_phantom_series(
        out_dir, shape, axial_affine() if affine is None else affine, spheres, **write_kwargs
    )
    volume = load_series(paths)
    model_input = preprocess(volume.hu, volume.affine_lps, card.config.preprocess)
    analysis = postprocess(fake_result(model_input, spheres), model_input, volume, card)
    return AnalysedPhantom(volume, model_input, analysis, card, tuple(paths))
