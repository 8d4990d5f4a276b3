"""``unict-node evaluate``: metrics of a checkpoint on freshly generated phantoms, as JSON.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.bundle import DEFAULT_CHECKPOINT_DIR, load_bundle
from model.inference import Predictor
from model.tokenizer import split_words
from model.training.data import build_cache, load_case
from model.training.metrics import auroc, average_precision, corpus_bleu, dice, f1_score, rouge_l

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
        "--out", type=Path, default=Path("evaluation.json"), help="JSON file to write"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _nanmean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and v == v]
    return float(np.mean(finite)) if finite else None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a checkpoint; returns (and writes) the metrics dictionary."""
    from model.phantom import read_findings

    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = load_bundle(args.checkpoint)
    card = bundle.card
    engine = Predictor(bundle, device="cpu")
    engine.load()
    keys = [lc.abnormality.key for lc in card.labels]
    thresholds = np.array(card.thresholds)
    mask_thresholds = card.mask_thresholds
    seeds = range(args.seed, args.seed + args.cases)
    started = time.perf_counter()
    probs, truth, read_back, attention = [], [], [], []
    dices: list[list[float]] = [[] for _ in keys]
    refs, hyps, rouges = [], [], []
    with tempfile.TemporaryDirectory(prefix="unict-eval-") as tmp:
        paths = build_cache(
            seeds, card.config.preprocess, Path(tmp), kind=args.grid, workers=args.workers
        )
        for path in tqdm(paths, total=args.cases, desc="evaluate", disable=args.no_progress):
            case = load_case(path)
            result = engine.predict(case.image)
            probs.append(result.probabilities)
            truth.append(case.present)
            read_back.append(read_findings(result.report_text))
            attention.append(result.fusion_attention)
            for c in np.flatnonzero(case.present):
                dices[c].append(dice(result.segmentation[c] > mask_thresholds[c], case.masks[c]))
            ref, hyp = split_words(case.report), split_words(result.report_text)
            refs.append(ref)
            hyps.append(hyp)
            rouges.append(rouge_l(ref, hyp))
    p, t, r = np.stack(probs), np.stack(truth), np.stack(read_back)
    pred = p >= thresholds[None]
    per_class = {
        key: {
            "positives": int(t[:, c].sum()),
            "threshold": float(thresholds[c]),
            "mask_threshold": float(mask_thresholds[c]),
            "f1": f1_score(t[:, c], pred[:, c]),
            "auroc": auroc(t[:, c], p[:, c]),
            "average_precision": average_precision(t[:, c], p[:, c]),
            "dice": _nanmean(dices[c]) if dices[c] else None,
            "report_f1": f1_score(t[:, c], r[:, c]),
        }
        for c, key in enumerate(keys)
    }
    all_dice = [d for ds in dices for d in ds]
    metrics: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "model": {"name": card.name, "version": card.version, "sha256": card.checkpoint_sha256},
        "cases": args.cases,
        "seeds": [seeds.start, seeds.stop - 1],
        "grid": args.grid,
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
            "bleu4": corpus_bleu(refs, hyps),
            "rouge_l": float(np.mean(rouges)),
            "clinical_efficacy_f1_micro": f1_score(t.ravel(), r.ravel()),
            "clinical_efficacy_f1_macro": _nanmean([v["report_f1"] for v in per_class.values()]),
        },
        "fusion_attention": {
            "order": ["classification", "segmentation", "report"],
            "mean": np.mean(np.stack(attention), axis=0).round(4).tolist(),
        },
        "per_class": per_class,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
