"""One series through UniCT: load, preprocess, infer, postprocess, encode.

Each stage is a plain function between frozen dataclasses, so each can be tested and
timed alone; :func:`analyse_series` runs them in order, records the seconds each took
under its :class:`~service.errors.Stage` name, and turns any failure into a
:class:`~service.errors.StageError` that names the stage (the job store records it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from engines.base import Engine, InferenceResult
from model.card import ModelCard
from model.transforms import ModelInput, preprocess
from service.config import OutputsSettings
from service.errors import StageError
from service.lung_field import LungField
from service.outputs.sc import build_key_images
from service.outputs.seg import build_seg
from service.outputs.sr import build_sr
from service.postprocess import AnalysisResult, PostprocessOptions, postprocess
from service.stages import Stage
from service.volume import SourceVolume, load_series

logger = logging.getLogger(__name__)

_MAX_REASON = 300


@dataclass(frozen=True)
class OutputOptions:
    """How the SEG, SR and optional key-image series are written.

    Attributes
    ----------
    settings
        The ``outputs`` section of the configuration (series numbers and descriptions,
        BINARY or LABELMAP SEG, empty frames, lesions itemised, key images), validated
        there: equal series numbers are refused at load.
    device_serial
        Device Serial Number of the node (the host name when empty).
    min_lesion_ml
        Connected components smaller than this are dropped.
    mask_threshold
        Probability above which a voxel is in a finding's mask; ``None``: the model
        card's per-class mask thresholds.
    """

    settings: OutputsSettings = field(default_factory=OutputsSettings)
    device_serial: str = ""
    min_lesion_ml: float = 0.05
    mask_threshold: float | None = None


@dataclass(frozen=True)
class OutputUIDs:
    """Series and SOP Instance UIDs of a job's SEG and SR.

    Derived from what identifies the result (source study and series, series version,
    model name and version), never drawn at random, so that a job run again after a crash
    or a failed send produces the same UIDs: a PACS that already stored an output keeps
    one copy instead of a duplicate result (PS3.4 B.4.1: an instance is identified by its
    SOP Instance UID).
    """

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    sc_series: str = ""

    def sc_instances(self, count: int) -> tuple[str, ...]:
        """SOP Instance UIDs of the first `count` key images (derived from `sc_series`)."""
        series = self.sc_series or str(generate_uid(entropy_srcs=[self.sr_instance, "sc"]))
        return tuple(
            str(generate_uid(entropy_srcs=[series, "sc instance", str(i)])) for i in range(count)
        )

    @classmethod
    def for_result(
        cls, study_uid: str, series_uid: str, version: int, card: ModelCard
    ) -> OutputUIDs:
        """The UIDs of the result of `card`'s model on version `version` of a series."""

        def uid(kind: str) -> str:
            sources = ["unict-node output", study_uid, series_uid, str(version)]
            return str(generate_uid(entropy_srcs=[*sources, card.name, card.version, kind]))

        return cls(
            uid("seg series"),
            uid("seg instance"),
            uid("sr series"),
            uid("sr instance"),
            uid("sc series"),
        )


@dataclass(frozen=True, eq=False)
class PipelineResult:
    """The outputs of one analysed series.

    Attributes
    ----------
    seg
        The SEG instance, ``None`` when no finding had a mask.
    sr
        The Comprehensive 3D SR instance.
    analysis
        Findings, lesions and report text.
    volume
        The loaded source volume (for previews; not kept after the job).
    timings
        Seconds per stage, keyed by :class:`~service.errors.Stage`.
    sc
        The key images (Secondary Capture), when enabled and any finding has a mask.
    """

    seg: Dataset | None
    sr: Dataset
    analysis: AnalysisResult
    volume: SourceVolume
    timings: Mapping[Stage, float]
    sc: tuple[Dataset, ...] = ()


@contextmanager
def _stage(stage: Stage, timings: dict[Stage, float]) -> Iterator[None]:
    """Time a stage; re-raise anything but a :class:`StageError` as one for ``stage``."""
    start = time.perf_counter()
    try:
        yield
    except StageError:
        raise
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        logger.warning("stage %s failed: %s", stage.value, reason)
        raise StageError(stage, reason) from exc
    finally:
        timings[stage] = time.perf_counter() - start


#: Bytes of process memory one voxel of the source series costs during analysis (the
#: stored pixels, the float32 volume and the resampling copies), measured with
#: ``bench/bench_memory.py``: 300 and 600 slices of 512x512 both peaked at 8.0 bytes a
#: voxel above the ready node (BENCHMARKS.md, "Memory").
ANALYSIS_BYTES_PER_VOXEL = 8


def resident_mb() -> float:
    """This process's resident memory (VmRSS) in MiB; 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def check_memory(paths: Sequence[Path], limit_mb: float) -> None:
    """Refuse a series whose analysis would take this process over ``limit_mb``.

    The estimate is the first instance's frame size times the number of frames, at
    :data:`ANALYSIS_BYTES_PER_VOXEL`, on top of the memory in use now; only that header
    is read. Raises a non-retryable :class:`StageError` of stage ``load`` that names the
    setting, so an admin can raise it and retry the job.
    """
    if not paths:
        return
    header = dcmread(paths[0], stop_before_pixels=True)
    frames = int(getattr(header, "NumberOfFrames", 1) or 1) * len(paths)
    voxels = int(header.Rows) * int(header.Columns) * frames
    need = voxels * ANALYSIS_BYTES_PER_VOXEL / 2**20
    in_use = resident_mb()
    if in_use + need > limit_mb:
        raise StageError(
            Stage.LOAD,
            f"series of {frames} frames of {header.Rows}x{header.Columns} needs about "
            f"{need:.0f} MB for analysis on top of {in_use:.0f} MB in use: over "
            f"workers.memory_limit_mb ({limit_mb:.0f})",
        )


def load_stage(paths: Sequence[Path], memory_limit_mb: float | None = None) -> SourceVolume:
    """Stage ``load``: the series as one volume (refused first if over the memory bound)."""
    if memory_limit_mb is not None:
        check_memory(paths, memory_limit_mb)
    return load_series(paths)


def preprocess_stage(volume: SourceVolume, card: ModelCard) -> ModelInput:
    """Stage ``preprocess``: the volume on the model grid."""
    return preprocess(volume.hu, volume.affine_lps, card.config.preprocess)


def infer_stage(engine: Engine, model_input: ModelInput) -> InferenceResult:
    """Stage ``infer``: run the engine (loading it first if needed)."""
    if not engine.loaded:
        engine.load()
    return engine.infer(model_input.image)


def postprocess_stage(
    result: InferenceResult,
    model_input: ModelInput,
    volume: SourceVolume,
    card: ModelCard,
    outputs: OutputOptions,
    lungs: LungField | None = None,
) -> AnalysisResult:
    """Stage ``postprocess``: decisions, the lung field (computed here unless given), gated
    masks, lesions and extents, and the report text made to agree with them."""
    options = PostprocessOptions(
        min_lesion_ml=outputs.min_lesion_ml,
        mask_threshold=outputs.mask_threshold,
        max_lesions=outputs.settings.sr.max_lesions_per_finding,
    )
    return postprocess(result, model_input, volume, card, options, lungs=lungs)


def encode_stage(
    volume: SourceVolume,
    analysis: AnalysisResult,
    card: ModelCard,
    outputs: OutputOptions,
    uids: OutputUIDs | None = None,
) -> tuple[Dataset | None, Dataset]:
    """Stage ``encode``: the SEG (if any finding has a mask) and the SR (new UIDs when
    `uids` is ``None``)."""
    seg = build_seg(
        volume,
        analysis,
        card,
        series_number=outputs.settings.seg.series_number,
        series_description=outputs.settings.seg.series_description,
        segmentation_type=outputs.settings.seg.segmentation_type,
        omit_empty_frames=outputs.settings.seg.omit_empty_frames,
        device_serial=outputs.device_serial,
        series_instance_uid=uids.seg_series if uids else None,
        sop_instance_uid=uids.seg_instance if uids else None,
    )
    sr = build_sr(
        volume,
        analysis,
        seg,
        card,
        series_number=outputs.settings.sr.series_number,
        series_description=outputs.settings.sr.series_description,
        device_serial=outputs.device_serial,
        series_instance_uid=uids.sr_series if uids else None,
        sop_instance_uid=uids.sr_instance if uids else None,
    )
    return seg, sr


def key_image_stage(
    volume: SourceVolume,
    analysis: AnalysisResult,
    card: ModelCard,
    outputs: OutputOptions,
    uids: OutputUIDs | None = None,
) -> tuple[Dataset, ...]:
    """Part of stage ``encode``: the key images, when ``outputs.sc.enabled``."""
    sc = outputs.settings.sc
    if not sc.enabled:
        return ()
    return tuple(
        build_key_images(
            volume,
            analysis,
            card,
            series_number=sc.series_number,
            series_description=sc.series_description,
            max_images=sc.max_images,
            series_instance_uid=(uids.sc_series or None) if uids else None,
            sop_instance_uids=uids.sc_instances(sc.max_images) if uids else None,
        )
    )


def analyse_series(
    paths: Sequence[Path],
    engine: Engine,
    card: ModelCard,
    outputs: OutputOptions,
    *,
    uids: OutputUIDs | None = None,
    memory_limit_mb: float | None = None,
) -> PipelineResult:
    """Run one series through every stage.

    Parameters
    ----------
    paths
        The series' instance files, in any order.
    engine
        The inference backend (loaded on first use).
    card
        The model card of the engine's checkpoint.
    outputs
        SEG/SR options.
    uids
        UIDs of the SEG and SR (see :meth:`OutputUIDs.for_result`); new ones when ``None``.
    memory_limit_mb
        Refuse, before loading, a series whose analysis would take the process over this
        (see :func:`check_memory`); no bound when ``None``.

    Returns
    -------
    PipelineResult
        SEG, SR, the analysis, and seconds per stage.

    Raises
    ------
    service.errors.StageError
        From the stage that failed (a :class:`~service.errors.SeriesGeometryError`
        for series that do not form a volume).
    """
    timings: dict[Stage, float] = {}
    with _stage(Stage.LOAD, timings):
        volume = load_stage(paths, memory_limit_mb)
    with _stage(Stage.PREPROCESS, timings):
        model_input = preprocess_stage(volume, card)
    with _stage(Stage.INFER, timings):
        result = infer_stage(engine, model_input)
    with _stage(Stage.POSTPROCESS, timings):
        analysis = postprocess_stage(result, model_input, volume, card, outputs)
    with _stage(Stage.ENCODE, timings):
        seg, sr = encode_stage(volume, analysis, card, outputs, uids)
        sc = key_image_stage(volume, analysis, card, outputs, uids)
    logger.info(
        "analysed series %s with %s: %d present finding(s); %s",
        volume.series_instance_uid,
        analysis.engine,
        len(analysis.present),
        ", ".join(f"{stage.value} {seconds:.2f} s" for stage, seconds in timings.items()),
    )
    return PipelineResult(seg=seg, sr=sr, analysis=analysis, volume=volume, timings=timings, sc=sc)
