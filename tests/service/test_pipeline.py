"""analyse_series: every stage in order, timed, failures named by stage."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from pydantic import ValidationError
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from engines.base import Availability, Engine, InferenceResult
from model.card import ModelCard
from model.labels import label_index
from model.phantom.dicom_series import write_ct_series
from service.config import OutputsSettings, SegOutputSettings, SrOutputSettings
from service.errors import SeriesGeometryError, StageError
from service.outputs.seg import build_seg
from service.outputs.sr import build_sr
from service.pipeline import OutputOptions, analyse_series, preprocess_stage
from service.postprocess import postprocess
from service.stages import Stage
from service.volume import load_series
from tests.service.dicom_fixtures import (
    Sphere,
    axial_affine,
    fake_result,
    make_card,
    report_of,
    write_and_read,
    write_phantom_series,
)

NODULE = label_index("nodule")
T = TypeVar("T")
RADIUS_MM = 20.0
#: Where the test double's nodule is: in the right lung of the test phantom (LPS mm).
NODULE_CENTRE_X = -45.0


class FakeEngine(Engine):
    """Test double of an engine: a sphere of 20 mm radius ``centre_x_mm`` to the patient's
    left of the model grid's centre (by default 45 mm to the right: in the right lung of
    :func:`write_fake_engine_series`, where that series has a soft-tissue sphere).

    It stands in for the real model, which another part of the project provides.
    """

    name = "fake"

    def __init__(
        self,
        card: ModelCard,
        *,
        probabilities: int = 10,
        fail: bool = False,
        centre_x_mm: float = NODULE_CENTRE_X,
    ) -> None:
        self.spacing = np.array(card.config.preprocess.spacing_mm)
        self.centre_x_mm = centre_x_mm
        self.probabilities = probabilities
        self.fail = fail
        self.loads = 0

    @classmethod
    def is_available(cls) -> Availability:
        return Availability(True)

    def load(self) -> None:
        self.loads += 1
        self._loaded = True

    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        if self.fail:
            raise RuntimeError("device lost")
        grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in image.shape), indexing="ij")
        centre = (np.array(image.shape) - 1) / 2.0
        # Model axes run inferior->superior, right->left, anterior->posterior (SLP).
        centre[1] += self.centre_x_mm / self.spacing[1]
        distance = np.sqrt(
            sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre, self.spacing, strict=True))
        )
        segmentation = np.zeros((10, *image.shape), dtype=np.float32)
        segmentation[NODULE] = np.clip(0.5 + (RADIUS_MM - distance) / 24.0, 0.0, 1.0)
        probabilities = np.full(10, 0.05, dtype=np.float32)
        probabilities[NODULE] = 0.95
        return InferenceResult(
            probabilities=probabilities[: self.probabilities],
            segmentation=segmentation,
            report_tokens=(5, 6),
            report_text="A 40 mm nodule in the left upper lobe.",
            fusion_attention=np.eye(3, dtype=np.float32),
            engine=self.name,
        )


def write_fake_engine_series(out_dir: Path, **kwargs: object) -> list[Path]:
    """The test chest with the soft-tissue sphere :class:`FakeEngine` segments (keyword
    arguments go to ``write_ct_series``)."""
    return write_phantom_series(
        out_dir,
        (40, 128, 128),
        axial_affine(),
        (Sphere((NODULE_CENTRE_X, 0.0, 0.0), RADIUS_MM, NODULE),),
        **kwargs,
    )


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_fake_engine_series(tmp_path_factory.mktemp("pipeline"), instance_order="shuffled")


def test_analyse_series(series: list[Path]) -> None:
    card = make_card()
    engine = FakeEngine(card)
    result = analyse_series(series, engine, card, OutputOptions())
    assert engine.loads == 1
    assert set(result.timings) == {
        Stage.LOAD,
        Stage.PREPROCESS,
        Stage.INFER,
        Stage.POSTPROCESS,
        Stage.ENCODE,
    }
    assert set(result.timings) == {"load", "preprocess", "infer", "postprocess", "encode"}
    assert all(seconds >= 0 for seconds in result.timings.values())

    (finding,) = result.analysis.present
    assert finding.index == NODULE
    (lesion,) = finding.lesions
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * RADIUS_MM**3 / 1000, rel=0.05)
    assert abs(lesion.longest_axial_diameter_mm - 2 * RADIUS_MM) <= 1.5

    assert result.seg is not None
    seg = write_and_read(result.seg)
    sr = write_and_read(result.sr)
    assert seg.SOPClassUID == SegmentationStorage and seg.SeriesNumber == 9901
    assert sr.SOPClassUID == Comprehensive3DSRStorage and sr.SeriesNumber == 9902
    report = report_of(sr)
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment is not None
    assert group.referenced_segment[0].referenced_sop_instance_uid == seg.SOPInstanceUID


def test_labelmap_and_all_frames(series: list[Path]) -> None:
    card = make_card()
    seg = SegOutputSettings(segmentation_type="LABELMAP", omit_empty_frames=False, series_number=77)
    options = OutputOptions(OutputsSettings(seg=seg))
    result = analyse_series(series, FakeEngine(card), card, options)
    assert result.seg is not None
    assert result.seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert int(result.seg.NumberOfFrames) == 40 and result.seg.SeriesNumber == 77


def test_nothing_found_gives_an_sr_without_seg(series: list[Path]) -> None:
    card = make_card(threshold=0.99)
    result = analyse_series(series, FakeEngine(card), card, OutputOptions())
    assert result.seg is None and result.analysis.present == ()
    assert write_and_read(result.sr).SOPClassUID == Comprehensive3DSRStorage


def test_engine_failure_is_an_infer_stage_error(series: list[Path]) -> None:
    card = make_card()
    with pytest.raises(StageError) as info:
        analyse_series(series, FakeEngine(card, fail=True), card, OutputOptions())
    assert info.value.stage == Stage.INFER
    assert info.value.reason == "RuntimeError: device lost"
    assert isinstance(info.value.__cause__, RuntimeError)


def test_wrong_output_is_a_postprocess_stage_error(series: list[Path]) -> None:
    card = make_card()
    with pytest.raises(StageError) as info:
        analyse_series(series, FakeEngine(card, probabilities=5), card, OutputOptions())
    assert info.value.stage == Stage.POSTPROCESS
    assert "probabilities" in info.value.reason


def test_geometry_failure_is_a_load_stage_error(series: list[Path]) -> None:
    card = make_card()
    with pytest.raises(SeriesGeometryError) as info:
        analyse_series(series[:1], FakeEngine(card), card, OutputOptions())
    assert info.value.stage == Stage.LOAD


def test_output_options_are_the_validated_outputs_section() -> None:
    with pytest.raises(ValidationError, match="BINARY"):
        SegOutputSettings(segmentation_type="FRACTIONAL")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="already the SEG's"):
        OutputsSettings(sr=SrOutputSettings(series_number=9901))


@pytest.mark.slow
def test_a_full_size_series_goes_through_load_postprocess_and_outputs(tmp_path: Path) -> None:
    """A 300-slice 512x512 series (shuffled files): loaded, post-processed, SEG and SR built.

    Only correctness is asserted; the stage times are printed for the log. Speed is
    measured in ``bench/`` (``bench_encode``, ``bench_turnaround``; BENCHMARKS.md), not
    asserted here, where a busy CI machine would decide the result.
    """
    affine = axial_affine(spacing=(1.0, 0.7, 0.7), origin=(-178.85, -178.85, -150.0))
    hu = np.full((300, 512, 512), -850, dtype=np.int16)
    spheres = (
        Sphere((-60.0, -20.0, -10.0), 12.0, label_index("nodule")),
        Sphere((50.0, 10.0, 20.0), 25.0, label_index("consolidation")),
        Sphere((40.0, -40.0, -60.0), 8.0, label_index("ground_glass_opacity")),
    )
    for sphere in spheres:  # the lesions are in the CT too (a nodule must look like one)
        centre = np.linalg.solve(affine, [*sphere.centre_lps, 1.0])[:3]
        reach = np.ceil(sphere.radius_mm / np.array([1.0, 0.7, 0.7])).astype(int)
        lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
        box = tuple(slice(a, b) for a, b in zip(lo, lo + 2 * reach + 2, strict=True))
        k, r, c = np.meshgrid(*(np.arange(b.start, b.stop) for b in box), indexing="ij")
        lps = affine[:3, :3] @ np.stack([k.ravel(), r.ravel(), c.ravel()]) + affine[:3, 3:4]
        inside = np.linalg.norm(lps.T - sphere.centre_lps, axis=1).reshape(k.shape)
        hu[box][inside <= sphere.radius_mm] = 40
    paths = write_ct_series(
        hu, affine, tmp_path, patient_name="Perf^Test", patient_id="PERF", instance_order="shuffled"
    )
    del hu
    volume, load_s = _timed(lambda: load_series(paths))
    assert volume.shape == (300, 512, 512)
    card = make_card()
    model_input = preprocess_stage(volume, card)
    result = fake_result(model_input, spheres)
    analysis, post_s = _timed(lambda: postprocess(result, model_input, volume, card))
    assert [f.abnormality.key for f in analysis.present] == [
        "consolidation",
        "ground_glass_opacity",
        "nodule",
    ]
    seg, seg_s = _timed(
        lambda: build_seg(volume, analysis, card, series_number=1, series_description="perf")
    )
    assert seg is not None
    assert len(seg.SegmentSequence) == 3
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 300
    sr, sr_s = _timed(
        lambda: build_sr(volume, analysis, seg, card, series_number=2, series_description="perf")
    )
    assert sr.SOPInstanceUID != seg.SOPInstanceUID
    print(f"load {load_s:.2f} s, postprocess {post_s:.2f} s, SEG {seg_s:.2f} s, SR {sr_s:.2f} s")


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    """Result and the lesser of wall and process CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = work()
    return value, min(time.perf_counter() - wall, time.process_time() - cpu)


def test_a_series_over_the_memory_bound_is_refused_before_loading(series: list[Path]) -> None:
    from service.pipeline import ANALYSIS_BYTES_PER_VOXEL, resident_mb

    card = make_card()
    engine = FakeEngine(card)
    need = 40 * 128 * 128 * ANALYSIS_BYTES_PER_VOXEL / 2**20
    limit = resident_mb() + need / 2  # what is in use plus half of what the series needs
    with pytest.raises(StageError) as info:
        analyse_series(series, engine, card, OutputOptions(), memory_limit_mb=limit)
    assert info.value.stage == Stage.LOAD and not info.value.retryable
    assert "40 frames of 128x128" in info.value.reason
    assert "workers.memory_limit_mb" in info.value.reason
    assert engine.loads == 0  # refused before anything was loaded or run
    result = analyse_series(series, engine, card, OutputOptions(), memory_limit_mb=limit + need)
    assert Stage.INFER in result.timings
