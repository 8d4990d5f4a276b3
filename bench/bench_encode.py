"""SEG and SR encoding: the node's writers vs a plain highdicom call on the same masks.

Usage: python -m bench.bench_encode [--slices 300] [--size 512] [--segments 10] [--repeats 3]

A CT series of ``--slices`` slices of ``--size`` squared (1 mm slices, a 358 mm field of
view) is written and loaded as the node loads it; ``--segments`` sparse lesions (spheres
of 6-15 mm radius, one per finding of the bundled model card, none overlapping) are drawn
as model-grid probabilities and turned into source-grid masks and measured lesions by the
node's own post-processing. Then, for BINARY and LABELMAP:

- **node**: :func:`service.outputs.seg.build_seg` with the node's default options
  (empty frames omitted, the smallest array that says the same thing);
- **plain**: one ``highdicom.seg.Segmentation`` call with its default options, given the
  same masks as the ``(slices, rows, columns, segments)`` stack a caller would pass
  (built before the clock starts) and the same segment descriptions;

and the node's TID 1500 SR (:func:`service.outputs.sr.build_sr`, referencing the node's
BINARY SEG). Seconds are the build of the object (what the pipeline's ``encode`` stage
times), median and best of ``--repeats`` after one untimed warm-up build; bytes are the file written with pydicom;
``dciodvfy`` (dicom3tools) checks each file: its count of ``Error`` and ``Warning`` lines.
dicom3tools 2022 does not know Label Map Segmentation Storage ("Information Object Not
found"), so LABELMAP outputs get "n/a" with that reason. The speed-up column is the plain call's median time over the node's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # the service's modules import torch and scipy: not for --help
    import highdicom as hd
    from pydicom.dataset import Dataset

    from model.card import ModelCard
    from service.postprocess import AnalysisResult
    from service.volume import SourceVolume

FIELD_OF_VIEW_MM = 358.4
SLICE_SPACING_MM = 1.0
LABELMAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
LABELMAP_NA = "n/a (dicom3tools 2022 does not know Label Map Segmentation Storage)"


@dataclass
class Row:
    """One writer's measurements."""

    writer: str
    kind: str
    seconds: list[float] = field(default_factory=list)
    frames: int | None = None
    bytes: int = 0
    dciodvfy: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_s(self) -> float:
        return min(self.seconds)


def load_card() -> ModelCard:
    """The bundled model card (labels, colours, identity); a default one without it."""
    from model.bundle import CARD_FILE, DEFAULT_CHECKPOINT_DIR
    from model.card import LabelCard, ModelCard
    from model.config import SMALL
    from model.labels import DEFAULT_LABELS

    path = DEFAULT_CHECKPOINT_DIR / CARD_FILE
    if path.is_file():
        return ModelCard.load(path)
    return ModelCard(
        name="UniCT",
        version="bench",
        config=SMALL,
        labels=tuple(LabelCard(a, 0.5) for a in DEFAULT_LABELS),
        training_data="none (benchmark)",
        intended_use="benchmark",
    )


def make_volume(work: Path, slices: int, size: int) -> SourceVolume:
    """Write an axial CT series (air and lung density) and load it as the node does."""
    from model.phantom.dicom_series import write_ct_series
    from service.volume import load_series

    spacing = FIELD_OF_VIEW_MM / size
    affine = np.eye(4)
    affine[:3, 0] = [0.0, 0.0, SLICE_SPACING_MM]
    affine[:3, 1] = [0.0, spacing, 0.0]
    affine[:3, 2] = [spacing, 0.0, 0.0]
    affine[:3, 3] = [-FIELD_OF_VIEW_MM / 2 + spacing / 2] * 2 + [-slices * SLICE_SPACING_MM / 2]
    hu = np.full((slices, size, size), -850, dtype=np.int16)
    paths = write_ct_series(
        hu, affine, work / "ct", patient_name="Bench^Encode", patient_id="ENCODE"
    )
    return load_series(paths)


def sparse_findings(
    volume: SourceVolume, card: ModelCard, segments: int, seed: int = 11
) -> AnalysisResult:
    """`segments` present findings, one sphere of 6-15 mm radius each, none overlapping.

    The spheres are drawn as model-grid probabilities and go through the node's own
    post-processing (:func:`service.postprocess.postprocess`: resampled to the source
    grid, thresholded, split into lesions and measured), as a real analysis would. Centres
    lie on a circle of 30% of the field of view (adjacent ones at least 60 mm apart at
    512x512), spread along the stack.
    """
    from engines.base import InferenceResult
    from model.transforms import LPS_TO_RAS
    from service.pipeline import preprocess_stage
    from service.postprocess import postprocess

    labels = len(card.labels)
    if not 1 <= segments <= labels:
        raise ValueError(f"segments must be 1..{labels} (the card's findings)")
    model_input = preprocess_stage(volume, card)
    shape = model_input.image.shape
    lps_affine = LPS_TO_RAS @ model_input.affine_ras
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    lps = (lps_affine[:3, :3] @ index + lps_affine[:3, 3:4]).T.reshape(*shape, 3)
    depth, rows, _ = volume.shape
    steps = volume.affine_lps[:3, :3]
    units = steps / np.linalg.norm(steps, axis=0)
    centre = (volume.affine_lps @ np.array([(n - 1) / 2 for n in volume.shape] + [1.0]))[:3]
    ring = 0.3 * rows * float(np.linalg.norm(steps[:, 1]))
    height = depth * float(np.linalg.norm(steps[:, 0]))
    rng = np.random.default_rng(seed)
    probabilities = np.full(labels, 0.05, dtype=np.float32)
    segmentation = np.zeros((labels, *shape), dtype=np.float32)
    for i in range(segments):
        angle = 2 * np.pi * i / segments
        position = (
            centre
            + ring * (np.cos(angle) * units[:, 2] + np.sin(angle) * units[:, 1])
            + ((i + 0.5) / segments - 0.5) * height * units[:, 0]
        )
        radius = float(rng.uniform(6.0, 15.0))
        distance = np.linalg.norm(lps - position, axis=-1)
        # A wide linear ramp: probability 0.5 exactly on the sphere's surface.
        segmentation[i] = np.clip(0.5 + (radius - distance) / 24.0, 0.0, 1.0)
        probabilities[i] = 0.9
    result = InferenceResult(
        probabilities=probabilities,
        segmentation=segmentation,
        report_tokens=(1, 2, 3),
        report_text="Benchmark: sparse lesions, one per finding.",
        fusion_attention=np.full((3, 3), 1.0 / 3.0, dtype=np.float32),
        engine="bench",
    )
    return postprocess(result, model_input, volume, card)


def plain_segmentation(
    volume: SourceVolume,
    analysis: AnalysisResult,
    card: ModelCard,
    stack: npt.NDArray[np.bool_],
    kind: str,
) -> hd.seg.Segmentation:
    """One ``highdicom.seg.Segmentation`` call with its defaults on the 4D stack."""
    import highdicom as hd

    from service.outputs.seg import segment_descriptions, segmented_findings

    return hd.seg.Segmentation(
        source_images=list(volume.datasets),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues(kind),
        segment_descriptions=segment_descriptions(segmented_findings(analysis), card),
        series_instance_uid=hd.UID(),
        series_number=9901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=card.manufacturer,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        device_serial_number="bench",
    )


def dciodvfy(path: Path) -> str:
    """``dciodvfy``'s verdict on a file: "E errors, W warnings", or why there is none."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        return "n/a (dciodvfy not installed: apt-get install dicom3tools)"
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=600)
    text = result.stdout + result.stderr
    if "Information Object Not found" in text:
        # It does not know the SOP class, so it checks nothing of substance.
        import pydicom

        sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
        if sop_class == LABELMAP_SEG_STORAGE:
            return LABELMAP_NA
        return f"n/a (dciodvfy does not know SOP class {sop_class})"
    lines = text.splitlines()
    errors = sum(1 for line in lines if re.match(r"^\s*Error", line))
    warnings = sum(1 for line in lines if re.match(r"^\s*Warning", line))
    return f"{errors} errors, {warnings} warnings"


def _timed(build: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """The built value and the seconds of each build, after one untimed warm-up build."""
    seconds, value = [], build()
    for _ in range(repeats):
        start = time.perf_counter()
        value = build()
        seconds.append(time.perf_counter() - start)
    return value, seconds


def _write(dataset: Dataset, path: Path) -> int:
    import pydicom

    pydicom.dcmwrite(path, dataset, enforce_file_format=True)
    return path.stat().st_size


def run(work: Path, *, slices: int, size: int, segments: int, repeats: int) -> list[Row]:
    """Build, time, write and check every output; one row each."""
    from service.outputs.seg import build_seg
    from service.outputs.sr import build_sr

    card = load_card()
    volume = make_volume(work, slices, size)
    analysis = sparse_findings(volume, card, segments)
    masks = [f.mask for f in analysis.findings if f.mask is not None]
    stack = np.stack(masks, axis=-1)
    rows: list[Row] = []
    node_binary: Dataset | None = None
    for kind in ("BINARY", "LABELMAP"):
        writers: list[tuple[str, Callable[[], Any]]] = [
            (
                "node build_seg",
                partial(
                    build_seg,
                    volume,
                    analysis,
                    card,
                    series_number=9901,
                    series_description="bench",
                    segmentation_type=kind,
                ),
            ),
            ("plain highdicom", partial(plain_segmentation, volume, analysis, card, stack, kind)),
        ]
        for writer, build in writers:
            seg, seconds = _timed(build, repeats)
            path = work / f"{writer.split()[0]}-{kind}.dcm"
            row = Row(writer, kind, seconds, int(seg.NumberOfFrames), _write(seg, path))
            row.dciodvfy = dciodvfy(path)
            rows.append(row)
            if writer.startswith("node") and kind == "BINARY":
                node_binary = seg
    sr, seconds = _timed(
        lambda: build_sr(
            volume, analysis, node_binary, card, series_number=9902, series_description="bench"
        ),
        repeats,
    )
    path = work / "node-sr.dcm"
    rows.append(Row("node build_sr", "TID 1500", seconds, None, _write(sr, path)))
    rows[-1].dciodvfy = dciodvfy(path)
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table; speed-up = plain median / node median, same type."""
    plain = {r.kind: r.median_s for r in rows if r.writer.startswith("plain")}
    lines = [
        "| writer | type | median s | best s | frames | MB | plain ÷ node | dciodvfy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = (
            f"**{plain[r.kind] / r.median_s:.1f}×**"
            if r.writer.startswith("node") and r.kind in plain and r.median_s > 0
            else ""
        )
        frames = "" if r.frames is None else str(r.frames)
        lines.append(
            f"| {r.writer} | {r.kind} | {r.median_s:.3f} | {r.best_s:.3f} | {frames} "
            f"| {r.bytes / 1e6:.2f} | {speedup} | {r.dciodvfy} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300, help="source slices (300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (512)")
    parser.add_argument("--segments", type=int, default=10, help="present findings (10)")
    parser.add_argument("--repeats", type=int, default=3, help="builds per writer (3)")
    args = parser.parse_args(argv)
    if args.slices < 2 or args.size < 8 or args.repeats < 1:
        parser.error("--slices >= 2, --size >= 8 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import highdicom as hd
    import pydicom

    with tempfile.TemporaryDirectory(prefix="unict-bench-encode-") as tmp:
        rows = run(
            Path(tmp),
            slices=args.slices,
            size=args.size,
            segments=args.segments,
            repeats=args.repeats,
        )
    print(
        f"\nSEG/SR encoding, {args.slices} frames of {args.size}x{args.size}, "
        f"{args.segments} segments (sparse spheres), {args.repeats} repeats; highdicom "
        f"{hd.__version__}, pydicom {pydicom.__version__}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
