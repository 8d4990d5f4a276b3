"""``unict-node evaluate --dicom DIR [--mask MASK] [--out JSON]``: one real series through
the node's own analysis, with each finding's probability and decision, and with a
reference mask the Dice and the detection of every marked lesion.

The stages are the node's (:mod:`service.pipeline`): the series is read with
:func:`~service.pipeline.load_stage`, brought onto the model grid with
:func:`~service.pipeline.preprocess_stage`, run on the first available engine of the
node's engine order (:func:`engines.registry.select_engine`) and post-processed with
:func:`~service.pipeline.postprocess_stage`: decisions at the card's thresholds, the lung
field gating, lesions and extents. What is printed is what the node would put in its SEG
and SR; nothing is sent anywhere.

The reference mask is ``.npz`` (key ``mask``, or its only array) or ``.npy``, ``(D, H, W)``
on the series' grid with slices ascending along the plane normal (ascending z for an
axial series: the order the node loads slices in), or ``(10, D, H, W)`` with one channel
per label (the ``masks.npy`` of ``unict-node generate --format dicom``). It is compared
with the finding ``--mask-label`` (default: nodule). A marked lesion (connected
component, 26-connectivity) is detected when the reported mask overlaps it; a reported
lesion overlapping no marked one is a false positive.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from model.labels import LABEL_KEYS
from service.errors import StageError
from service.pipeline import (
    OutputOptions,
    infer_stage,
    load_stage,
    postprocess_stage,
    preprocess_stage,
)
from service.postprocess import AnalysisResult, FindingResult
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def add_series_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--dicom`` options of ``unict-node evaluate``."""
    parser.add_argument(
        "--dicom",
        type=Path,
        default=None,
        metavar="DIR",
        help="evaluate one real DICOM series (files under DIR, any depth) through the node's "
        "own loading, preprocessing, engine and post-processing",
    )
    parser.add_argument(
        "--series",
        default=None,
        metavar="UID",
        help="with --dicom: the Series Instance UID to take when DIR holds several",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="with --dicom: reference mask (.npz key 'mask', or .npy) on the series' grid, "
        "slices ascending along the normal; (10, D, H, W) label masks are accepted",
    )
    parser.add_argument(
        "--mask-label",
        default="nodule",
        choices=list(LABEL_KEYS),
        help="with --dicom --mask: the finding the mask marks (default: nodule)",
    )
    parser.add_argument(
        "--node-config",
        type=Path,
        default=None,
        help="with --dicom: the node's config.yaml, for its model (checkpoint, engines, "
        "threads) and outputs settings; default: the node's defaults with --checkpoint",
    )


# ------------------------------------------------------------------ the series


def series_files(folder: Path, series_uid: str | None = None) -> list[Path]:
    """The instance files of the one series under ``folder`` (or of ``series_uid``).

    Raises
    ------
    ValueError
        If no DICOM image is found, or several series are and none was chosen.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    by_series: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, ValueError):
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if uid:
            by_series.setdefault(uid, []).append(path)
    if not by_series:
        raise ValueError(f"no DICOM instance under {folder}")
    if series_uid is not None:
        if series_uid not in by_series:
            raise ValueError(f"series {series_uid} is not under {folder}")
        return by_series[series_uid]
    if len(by_series) > 1:
        listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in by_series.items())
        raise ValueError(
            f"{folder} holds {len(by_series)} series; choose one with --series: {listing}"
        )
    return next(iter(by_series.values()))


def load_reference_mask(path: Path, label: str, shape: tuple[int, int, int]) -> BoolArray:
    """The reference mask of ``label`` as ``(D, H, W)`` bool, checked against ``shape``."""
    if path.suffix == ".npz":
        with np.load(path) as archive:
            key = "mask" if "mask" in archive.files else None
            if key is None and len(archive.files) == 1:
                key = archive.files[0]
            if key is None:
                raise ValueError(f"{path}: no 'mask' array (found {', '.join(archive.files)})")
            array = np.asarray(archive[key])
    else:
        array = np.load(path)
    if array.ndim == 4:
        if array.shape[0] != len(LABEL_KEYS):
            raise ValueError(f"{path}: a 4D mask must have {len(LABEL_KEYS)} label channels")
        array = array[LABEL_KEYS.index(label)]
    if array.shape != shape:
        raise ValueError(f"{path}: mask shape {array.shape} is not the series' {shape}")
    return np.asarray(array != 0)


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class MarkedLesion:
    """One connected component of the reference mask and what the node reported on it."""

    number: int
    volume_ml: float
    slice_range: tuple[int, int]
    detected: bool
    dice: float


def dice_of(a: BoolArray, b: BoolArray) -> float:
    """Dice of two masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def compare_with_mask(
    reported: BoolArray | None, reference: BoolArray, voxel_ml: float
) -> dict[str, Any]:
    """Dice of the reported mask, and detection of each marked lesion.

    A marked lesion's Dice is against the reported lesions that touch it; reported
    lesions touching no marked one are false positives.
    """
    predicted = np.zeros_like(reference) if reported is None else reported
    marked, n_marked = ndimage.label(reference, structure=_CONNECTIVITY)
    found, n_found = ndimage.label(predicted, structure=_CONNECTIVITY)
    lesions = []
    touched: set[int] = set()
    boxes = ndimage.find_objects(marked)
    for number in range(1, n_marked + 1):
        box = boxes[number - 1]
        assert box is not None
        lesion = marked == number
        hits = {int(v) for v in np.unique(found[lesion]) if v}
        touched |= hits
        mine = np.isin(found, sorted(hits)) if hits else np.zeros_like(lesion)
        lesions.append(
            MarkedLesion(
                number=number,
                volume_ml=float(lesion.sum()) * voxel_ml,
                slice_range=(int(box[0].start), int(box[0].stop - 1)),
                detected=bool(hits),
                dice=dice_of(mine, lesion),
            )
        )
    false_positive = [i for i in range(1, n_found + 1) if i not in touched]
    sizes = ndimage.sum_labels(predicted, found, false_positive) if false_positive else []
    return {
        "dice": dice_of(predicted, reference),
        "reference_ml": float(reference.sum()) * voxel_ml,
        "reported_ml": float(predicted.sum()) * voxel_ml,
        "marked_lesions": [lesion.__dict__ for lesion in lesions],
        "detected": sum(lesion.detected for lesion in lesions),
        "false_positive_lesions": len(false_positive),
        "false_positive_ml": [round(float(s) * voxel_ml, 3) for s in sizes],
    }


# ------------------------------------------------------------------ the command


def _finding_record(f: FindingResult, voxel_ml: float) -> dict[str, Any]:
    return {
        "key": f.abnormality.key,
        "name": f.abnormality.name,
        "probability": round(float(f.probability), 4),
        "threshold": round(float(f.threshold), 4),
        "decision": "Present" if f.present else "Absent",
        "localised": f.mask is not None,
        "pattern": f.pattern,
        "lesion_count": f.lesion_count,
        "volume_ml": round(float(f.mask.sum()) * voxel_ml, 2) if f.mask is not None else 0.0,
        "removed_ml": round(f.removed_ml, 2),
    }


def evaluate_series(
    paths: Sequence[Path],
    *,
    checkpoint: Path | None,
    engines: Sequence[str],
    threads: int = 0,
    outputs: OutputOptions | None = None,
    mask: Path | None = None,
    mask_label: str = "nodule",
) -> dict[str, Any]:
    """Analyse one series as the node does; the findings, and the comparison with ``mask``."""
    from engines.base import EngineOptions
    from engines.registry import select_engine
    from model.bundle import load_bundle

    outputs = outputs or OutputOptions()
    bundle = load_bundle(checkpoint)
    card = bundle.card
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="unict-plans-") as plans:
        engine = select_engine(
            engines, bundle, EngineOptions(plan_dir=Path(plans), threads=threads)
        )
        started = time.perf_counter()
        volume: SourceVolume = load_stage(paths)
        timings["load"] = time.perf_counter() - started
        started = time.perf_counter()
        model_input = preprocess_stage(volume, card)
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        result = infer_stage(engine, model_input)
        timings["infer"] = time.perf_counter() - started
        started = time.perf_counter()
        analysis: AnalysisResult = postprocess_stage(result, model_input, volume, card, outputs)
        timings["postprocess"] = time.perf_counter() - started
    voxel_ml = volume.voxel_volume_ml
    out: dict[str, Any] = {
        "series_instance_uid": volume.series_instance_uid,
        "slices": volume.shape[0],
        "matrix": list(volume.shape[1:]),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "model": {"name": card.name, "version": card.version, "sha256": card.checkpoint_sha256},
        "engine": analysis.engine,
        "lungs_found": analysis.lungs.found if analysis.lungs is not None else None,
        "findings": [_finding_record(f, voxel_ml) for f in analysis.findings],
        "report_text": analysis.report_text,
        "model_report_text": analysis.model_report_text,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    if mask is not None:
        reference = load_reference_mask(mask, mask_label, volume.shape)
        finding = analysis.findings[[lc.abnormality.key for lc in card.labels].index(mask_label)]
        out["mask"] = {
            "file": str(mask),
            "label": mask_label,
            "decision": "Present" if finding.present else "Absent",
            **compare_with_mask(finding.mask, reference, voxel_ml),
        }
    return out


def format_text(result: dict[str, Any]) -> str:
    """The human-readable table ``evaluate --dicom`` prints."""
    lines = [
        f"series {result['series_instance_uid']}: {result['slices']} slices of "
        f"{'x'.join(map(str, result['matrix']))}, spacing "
        f"{'/'.join(f'{s:g}' for s in result['spacing_mm'])} mm",
        f"model {result['model']['name']} {result['model']['version']} on {result['engine']}",
        f"{'finding':<34} {'prob':>6} {'thr':>5}  {'decision':<8} {'lesions':>7} {'mL':>8}",
    ]
    for f in result["findings"]:
        note = "" if f["localised"] or f["decision"] == "Absent" else "  not localised"
        lines.append(
            f"{f['name'][:34]:<34} {f['probability']:>6.3f} {f['threshold']:>5.2f}  "
            f"{f['decision']:<8} {f['lesion_count']:>7} {f['volume_ml']:>8.2f}{note}"
        )
    if "mask" in result:
        m = result["mask"]
        lines.append(
            f"{m['label']} vs {m['file']}: Dice {m['dice']:.3f} (reference {m['reference_ml']:.2f} mL, "
            f"reported {m['reported_ml']:.2f} mL); {m['detected']} of {len(m['marked_lesions'])} "
            f"marked lesion(s) detected, {m['false_positive_lesions']} false positive lesion(s)"
        )
        for les in m["marked_lesions"]:
            lines.append(
                f"  lesion {les['number']}: {les['volume_ml']:.2f} mL, slices "
                f"{les['slice_range'][0]}-{les['slice_range'][1]}, "
                f"{'detected' if les['detected'] else 'missed'}, Dice {les['dice']:.3f}"
            )
    lines.append(f"report: {result['report_text']}")
    return "\n".join(lines)


def cmd_evaluate_series(args: argparse.Namespace) -> int:
    """``unict-node evaluate --dicom``: exit 0 with the findings, 2 on bad input."""
    from model.bundle import DEFAULT_CHECKPOINT_DIR
    from service.config import ModelSettings

    checkpoint: Path | None = args.checkpoint
    engines: Sequence[str] = ModelSettings().engines
    threads = int(args.threads or 0)
    outputs = OutputOptions()
    if args.node_config is not None:
        from service.commands import settings_from_args
        from service.processor import output_options

        settings = settings_from_args(argparse.Namespace(config=args.node_config))
        outputs = output_options(settings)
        engines = settings.model.engines
        threads = threads or int(settings.model.threads or 0)
        if checkpoint in (None, DEFAULT_CHECKPOINT_DIR):
            checkpoint = settings.model.checkpoint_path
    try:
        paths = series_files(args.dicom, args.series)
        result = evaluate_series(
            paths,
            checkpoint=checkpoint,
            engines=engines,
            threads=threads,
            outputs=outputs,
            mask=args.mask,
            mask_label=args.mask_label,
        )
    except (ValueError, StageError, FileNotFoundError) as exc:
        print(f"evaluate --dicom: {exc}", file=sys.stderr)
        return 2
    print(format_text(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"written to {args.out}")
    return 0
