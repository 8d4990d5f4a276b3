"""``unict-node evaluate``: metrics of a checkpoint on phantoms or a real dataset, as JSON.

Without ``--data`` the cases are freshly generated phantoms (``--seed``, ``--cases``).
With ``--data KIND:DIR`` they are the test part of the checkpoint's fold (the
``split.json`` the training wrote into the bundle, or the same patient-level split drawn
again): ``--fold 0,1,2,3,4`` with ``--checkpoint runs/rex/fold{fold}/bundle`` evaluates
each fold's model on its own test part and reports every fold and their mean.
``radchestct:DIR`` is the external set: every scan is used (``--part all``), and nodule and
micronodules are merged into one label, as in the paper (RAD-ChestCT's nodule labels
cover both). Labels a source does not assert, masks it lacks and reports it does not
have are left out of the metric they would feed.

Classification: per-class and macro F1 (at the card's thresholds), AUROC and average
precision. Segmentation: Dice per class on the model grid over the cases where the
finding is present (prediction: probability above the card's mask threshold of the class),
and their mean. Reports: BLEU-4, ROUGE-L, and clinical-efficacy F1 (each finding read
back from the generated text with :func:`model.phantom.read_findings`, compared with the
truth). Also the fusion attention matrix averaged over cases.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.bundle import DEFAULT_CHECKPOINT_DIR, load_bundle
from model.datasets.splits import SPLIT_FILE, FoldSplit
from model.inference import Predictor
from model.tokenizer import split_words
from model.training.data import Case, build_cache, load_case
from model.training.metrics import auroc, average_precision, corpus_bleu, dice, f1_score, rouge_l
from model.training.real_data import (
    DataSpec,
    build_real_cache,
    fold_splits,
    load_splits,
    parse_data_spec,
    scan_names,
)

logger = logging.getLogger(__name__)


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``unict-node evaluate``."""
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=DEFAULT_CHECKPOINT_DIR,
        help="checkpoint directory with model_card.json (default: the bundled small model)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=7_000_000,
        help="first generator seed of the evaluation cases; pick one never used in training "
        "(the shipped model trained on seeds below 1,000,000)",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=48,
        help="number of generated cases (>= 40 for the acceptance run)",
    )
    parser.add_argument(
        "--grid",
        choices=["training", "realistic"],
        default="training",
        help="phantom grid: 'training' (coarse, fast) or 'realistic' (512x512, 0.6-0.9 mm pixels; slower)",
    )
    parser.add_argument(
        "--generator",
        choices=["1", "2"],
        default="1",
        help="phantom generator: 1 (original) or 2 (scanner realism, model.phantom.realism)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON file to write (default: evaluation.json; with --dicom: none)",
    )
    parser.add_argument(
        "--data",
        type=parse_data_spec,
        default=None,
        metavar="KIND:DIR",
        help="evaluate on a real dataset instead of phantoms: rexgroundingct:DIR, ctrate:DIR, "
        "or radchestct:DIR (external set; nodule and micronodules merged)",
    )
    parser.add_argument(
        "--fold",
        default="0",
        help="with --data: fold(s), e.g. 0 or 0,1,2,3,4; a {fold} in --checkpoint is replaced "
        "by each (per-fold and mean metrics)",
    )
    parser.add_argument(
        "--part",
        choices=["test", "val", "train", "all"],
        default=None,
        help="with --data: which part of the fold's split (default: test; radchestct: all)",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="with --data: seed of the patient split when the checkpoint has no split.json",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _nanmean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and v == v]
    return float(np.mean(finite)) if finite else None


def parse_folds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        folds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--fold expects comma-separated fold numbers, got {text!r}") from None
    if not folds:
        raise ValueError("--fold names no fold")
    return folds


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a checkpoint; returns (and writes) the metrics dictionary."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data: DataSpec | None = getattr(args, "data", None)
    metrics = _evaluate_phantoms(args) if data is None else _evaluate_data(args, data)
    if args.out is None:
        args.out = Path("evaluation.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def _evaluate_phantoms(args: argparse.Namespace) -> dict[str, Any]:
    seeds = range(args.seed, args.seed + args.cases)
    bundle = load_bundle(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="unict-eval-") as tmp:
        paths = build_cache(
            seeds,
            bundle.card.config.preprocess,
            Path(tmp),
            kind=args.grid,
            workers=args.workers,
            generator=getattr(args, "generator", "1"),
        )
        metrics = _run(args.checkpoint, (load_case(p) for p in paths), args.cases, args)
    return {
        **{k: metrics[k] for k in ("checkpoint", "model", "cases")},
        "seeds": [seeds.start, seeds.stop - 1],
        "grid": args.grid,
        "generator": int(getattr(args, "generator", "1")),
        **{k: v for k, v in metrics.items() if k not in ("checkpoint", "model", "cases")},
    }


def _fold_split(checkpoint: Path, data: DataSpec, fold: int, seed: int) -> FoldSplit | None:
    """The split of ``fold``: the one the training wrote into the bundle, else drawn again."""
    saved = checkpoint / SPLIT_FILE
    if saved.exists():
        splits = load_splits(saved)
        if data.kind in splits:
            split = splits[data.kind]
            if split.fold != fold:
                raise ValueError(
                    f"{saved} is fold {split.fold}, not fold {fold}: name each fold's "
                    "checkpoint with {fold} in --checkpoint"
                )
            return split
    if data.kind == "radchestct":
        return None
    return fold_splits([data], fold, seed=seed)[0][1]


def _evaluate_data(args: argparse.Namespace, data: DataSpec) -> dict[str, Any]:
    folds = parse_folds(args.fold)
    template = str(args.checkpoint)
    if len(folds) > 1 and "{fold}" not in template:
        raise ValueError("several --fold values need {fold} in --checkpoint (one model per fold)")
    external = data.kind == "radchestct"
    part = args.part or ("all" if external else "test")
    per_fold: list[dict[str, Any]] = []
    for fold in folds:
        checkpoint = Path(template.format(fold=fold))
        split = _fold_split(checkpoint, data, fold, args.split_seed)
        names = list(scan_names(data)) if split is None or part == "all" else list(split.part(part))
        if split is not None and part == "all":
            names = list(split.part("all"))
        if not names:
            raise ValueError(f"{data}: fold {fold} has no scan in part {part!r}")
        bundle = load_bundle(checkpoint)
        with tempfile.TemporaryDirectory(prefix="unict-eval-") as tmp:
            paths = build_real_cache(data, names, bundle.card.config.preprocess, Path(tmp))
            metrics = _run(
                checkpoint,
                (load_case(p) for p in paths),
                len(paths),
                args,
                merge_micronodules=external,
            )
        per_fold.append({"fold": fold, "part": part, **metrics})
    mean = _mean_of(per_fold)
    return {
        "dataset": str(data),
        "part": part,
        "folds": [f["fold"] for f in per_fold],
        "merged": ["nodule", "micronodules"] if external else [],
        **mean,
        "per_fold": per_fold,
    }


#: Fields of the per-fold metrics that are counts: summed over folds, not averaged.
_COUNTS = ("cases", "positives", "known", "present_findings")


def _mean_of(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise mean over folds of the numbers of metric dictionaries (counts summed;
    ``None`` and NaN skipped; ``None`` when no fold has a number)."""
    out: dict[str, Any] = {}
    for key in items[0]:
        if key in ("checkpoint", "model", "fold", "part", "fusion_attention"):
            continue
        values = [item.get(key) for item in items]
        if any(isinstance(v, dict) for v in values):
            out[key] = _mean_of([v for v in values if isinstance(v, dict)])
            continue
        numbers = [
            float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if key in _COUNTS:
            out[key] = int(sum(numbers))
        elif numbers or all(v is None for v in values):
            out[key] = _nanmean(numbers)
    return out


def _run(
    checkpoint: Path,
    cases: Iterable[Case],
    total: int,
    args: argparse.Namespace,
    *,
    merge_micronodules: bool = False,
) -> dict[str, Any]:
    """Infer every case with the checkpoint and compute the metrics."""
    from model.phantom import read_findings

    bundle = load_bundle(checkpoint)
    card = bundle.card
    engine = Predictor(bundle, device="cpu")
    engine.load()
    keys = [lc.abnormality.key for lc in card.labels]
    mask_thresholds = card.mask_thresholds
    started = time.perf_counter()
    probs, truth, known, read_back, attention = [], [], [], [], []
    dices: list[list[float]] = [[] for _ in keys]
    refs, hyps, rouges = [], [], []
    for case in tqdm(cases, total=total, desc="evaluate", disable=args.no_progress):
        result = engine.predict(case.image)
        probs.append(result.probabilities)
        truth.append(case.present)
        known.append(case.known if case.known is not None else np.ones(len(keys), dtype=bool))
        read_back.append(read_findings(result.report_text))
        attention.append(result.fusion_attention)
        if case.has_masks:
            for i in np.flatnonzero(case.present):
                dices[i].append(dice(result.segmentation[i] > mask_thresholds[i], case.masks[i]))
        if case.report.strip():
            ref, hyp = split_words(case.report), split_words(result.report_text)
            refs.append(ref)
            hyps.append(hyp)
            rouges.append(rouge_l(ref, hyp))
    p, t, k, r = np.stack(probs), np.stack(truth), np.stack(known), np.stack(read_back)
    thresholds = np.array(card.thresholds)
    pred = p >= thresholds[None]
    t_list = list(card.thresholds)
    m_list = list(mask_thresholds)
    if merge_micronodules:
        n, m = keys.index("nodule"), keys.index("micronodules")
        p[:, n] = np.maximum(p[:, n], p[:, m])
        pred[:, n] |= pred[:, m]
        r[:, n] |= r[:, m]
        dices[n] += dices[m]
        keep = [i for i in range(len(keys)) if i != m]
        p, t, k, r, pred = p[:, keep], t[:, keep], k[:, keep], r[:, keep], pred[:, keep]
        keys = [keys[i] for i in keep]
        dices = [dices[i] for i in keep]
        t_list = [t_list[i] for i in keep]
        m_list = [m_list[i] for i in keep]
    per_class: dict[str, dict[str, Any]] = {}
    for c, key in enumerate(keys):
        rows = k[:, c]
        per_class[key] = {
            "known": int(rows.sum()),
            "positives": int(t[rows, c].sum()),
            "threshold": float(t_list[c]),
            "mask_threshold": float(m_list[c]),
            "f1": f1_score(t[rows, c], pred[rows, c]) if rows.any() else None,
            "auroc": auroc(t[rows, c], p[rows, c]) if rows.any() else None,
            "average_precision": average_precision(t[rows, c], p[rows, c]) if rows.any() else None,
            "dice": _nanmean(dices[c]) if dices[c] else None,
            "report_f1": f1_score(t[rows, c], r[rows, c]) if rows.any() else None,
        }
    all_dice = [d for ds in dices for d in ds]
    return {
        "checkpoint": str(checkpoint),
        "model": {"name": card.name, "version": card.version, "sha256": card.checkpoint_sha256},
        "cases": total,
        "seconds": round(time.perf_counter() - started, 1),
        "classification": {
            "macro_f1": _nanmean([v["f1"] for v in per_class.values()]),
            "macro_auroc": _nanmean([v["auroc"] for v in per_class.values()]),
            "macro_average_precision": _nanmean(
                [v["average_precision"] for v in per_class.values()]
            ),
        },
        "segmentation": {
            "mean_dice_over_present_findings": _nanmean(all_dice),
            "macro_dice": _nanmean(
                [v["dice"] for v in per_class.values() if v["dice"] is not None]
            ),
            "present_findings": len(all_dice),
        },
        "report": {
            "bleu4": corpus_bleu(refs, hyps) if refs else None,
            "rouge_l": float(np.mean(rouges)) if rouges else None,
            "clinical_efficacy_f1_micro": f1_score(t[k], r[k]) if k.any() else None,
            "clinical_efficacy_f1_macro": _nanmean([v["report_f1"] for v in per_class.values()]),
        },
        "fusion_attention": {
            "order": ["classification", "segmentation", "report"],
            "mean": np.mean(np.stack(attention), axis=0).round(4).tolist(),
        },
        "per_class": per_class,
    }
