"""``unict-node train``: train UniCT on phantoms or real datasets, resumable, and export a bundle.

Without ``--data`` the cases are generated phantoms (``--train-seeds``, ``--val-seeds``).
With ``--data rexgroundingct:DIR`` and/or ``--data ctrate:DIR`` they are the datasets'
scans, split by patient as in the paper (5 folds of 70/15/15, ``--fold``; the split is
written to ``RUN_DIR/split.json`` and into the exported bundle): training on the fold's
training part, thresholds tuned on its validation part, its test part left to
``unict-node evaluate --data``. ``--phantom-ratio R`` mixes phantoms into the real
training cases (a share ``R`` of the samples drawn). Labels a source does not assert
(CT-RATE) and masks it lacks are left out of the losses, not taken as absent.

The run directory holds ``last.pt`` (model, optimiser, schedule, step, RNG states) written
every ``--checkpoint-every`` steps, so ``--resume`` continues where a run stopped. At the
end, per-class thresholds are tuned on the validation cases (maximum F1) and the bundle
(weights in float16, model card, tokenizer) is written to ``--export``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from model.bundle import CARD_FILE, sha256_of
from model.card import ModelCard, default_labels
from model.config import CONFIGS, UniCTConfig, get_config
from model.datasets.splits import FOLDS, SPLIT_FILE
from model.labels import LABEL_KEYS
from model.network import UniCT
from model.tokenizer import Tokenizer
from model.training.data import GENERATOR_CHOICES, CaseDataset, build_cache
from model.training.losses import LossWeights, multitask_loss
from model.training.metrics import auroc, dice, f1_score
from model.training.real_data import (
    TRAINABLE_KINDS,
    DataSpec,
    build_real_cache,
    fold_splits,
    load_splits,
    parse_data_spec,
    save_splits,
)

logger = logging.getLogger(__name__)

TRAINING_DATA = (
    "Synthetic chest-CT phantoms from this project's generator (model.phantom): body wall, "
    "lungs with vessels and airways, heart, aorta, spine and ribs in HU, with the 10 "
    "abnormalities inserted with voxel masks and template reports. No patient data."
)
INTENDED_USE = (
    "Demonstration and integration testing of the UniCT Node DICOM pipeline on synthetic "
    "data; a site trains the full configuration on its own data with the same command."
)


def parse_seed_range(text: str) -> range:
    """``"START:COUNT"`` -> ``range(START, START + COUNT)``."""
    try:
        start, count = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:COUNT, got {text!r}") from None
    return range(start, start + count)


def parse_class_weights(text: str) -> tuple[float, ...]:
    """``"1,1,2,..."`` -> one positive factor per abnormality."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if len(values) != len(LABEL_KEYS) or min(values) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected {len(LABEL_KEYS)} positive factors (label order: {', '.join(LABEL_KEYS)})"
        )
    return values


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``unict-node train``."""
    parser.add_argument(
        "--config",
        default="small",
        choices=list(CONFIGS),
        help="model configuration (tiny: smoke runs and CI only)",
    )
    parser.add_argument(
        "--data",
        type=parse_data_spec,
        action="append",
        default=[],
        metavar="KIND:DIR",
        help="train on a real dataset instead of phantoms: rexgroundingct:DIR or ctrate:DIR "
        "(repeatable, each kind once); split by patient, 5 folds of 70/15/15",
    )
    parser.add_argument(
        "--fold", type=int, default=0, help="with --data: the fold (0-4) to train on"
    )
    parser.add_argument(
        "--split-seed", type=int, default=0, help="with --data: seed of the patient shuffle"
    )
    parser.add_argument(
        "--phantom-ratio",
        type=float,
        default=0.0,
        help="with --data: share of training samples drawn from phantoms (--train-seeds); "
        "0: real data only",
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/small"), help="checkpoints and logs"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("runs/cache"), help="generated cases (reused)"
    )
    parser.add_argument(
        "--train-seeds",
        type=parse_seed_range,
        default=parse_seed_range("0:600"),
        help="START:COUNT",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATOR_CHOICES,
        default="1",
        help="phantom generator: 1 (original), 2 (scanner realism: kernels, partial volume, "
        "vessels, fissures, mediastinum; model.phantom.realism) or mix (even seeds 2, odd 1); "
        "validation phantoms use the same choice",
    )
    parser.add_argument(
        "--val-seeds",
        type=parse_seed_range,
        default=parse_seed_range("900000:48"),
        help="START:COUNT",
    )
    parser.add_argument(
        "--steps", type=int, default=3000, help="optimisation steps (the training budget)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine decay)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--lambda-cls", type=float, default=1.0)
    parser.add_argument("--lambda-seg", type=float, default=1.0)
    parser.add_argument("--lambda-rep", type=float, default=1.0)
    parser.add_argument(
        "--seg-pos-weight",
        type=float,
        default=1.0,
        help="foreground weight of the segmentation BCE",
    )
    parser.add_argument(
        "--findings-teacher",
        type=float,
        default=0.5,
        help="share of batches whose report is conditioned on the true findings rather than "
        "the predicted ones",
    )
    parser.add_argument(
        "--seg-class-weights",
        type=parse_class_weights,
        default=(),
        help="comma-separated factors, one per abnormality in label order, on the "
        "segmentation foreground weight and Dice term (default: all 1)",
    )
    parser.add_argument(
        "--seg-triplets",
        type=int,
        default=0,
        help="decode and supervise only this many slice triplets per volume and step, half "
        "of them among the triplets with a finding (0: all triplets)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 autocast for the forward pass (CPUs with AVX-512 BF16 or AMX; GPUs)",
    )
    parser.add_argument("--no-fusion", action="store_true", help="ablation: no multi-task fusion")
    parser.add_argument(
        "--no-modulation", action="store_true", help="ablation: no segmentation-conditioned FiLM"
    )
    parser.add_argument(
        "--no-cls-supervision", action="store_true", help="ablation: no classification loss"
    )
    parser.add_argument(
        "--no-seg-supervision", action="store_true", help="ablation: no segmentation loss"
    )
    parser.add_argument(
        "--no-report-supervision", action="store_true", help="ablation: no report loss"
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation and sampling seed")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--workers", type=int, default=2, help="processes generating phantoms")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument(
        "--val-every",
        type=int,
        default=0,
        help="every N steps, log validation macro AUROC and Dice per class to train_log.jsonl "
        "(0: only at the end)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of another run's last.pt (fresh optimiser and schedule; "
        "parameters that run lacks keep their initialisation) and reuse its tokenizer",
    )
    parser.add_argument(
        "--export", type=Path, default=None, help="write the bundle (weights, card, tokenizer) here"
    )
    parser.add_argument(
        "--init-exclude",
        default="",
        help="with --init-from: comma-separated parameter name prefixes not to take over (they keep "
        "their fresh initialisation)",
    )
    parser.add_argument("--version", default="0.1.0", help="model version recorded in the card")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> UniCTConfig:
    """The configuration with the ablation switches of the command line."""
    return get_config(args.config).with_ablation(
        fusion=not args.no_fusion,
        modulation=not args.no_modulation,
        classification_supervision=not args.no_cls_supervision,
        segmentation_supervision=not args.no_seg_supervision,
        report_supervision=not args.no_report_supervision,
    )


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    run_dir: Path
    steps: int
    seconds: float
    final_loss: float
    thresholds: tuple[float, ...]
    bundle_dir: Path | None


def _lr_at(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def tune_thresholds(
    probs: np.ndarray[Any, Any],
    present: np.ndarray[Any, Any],
    known: np.ndarray[Any, Any] | None = None,
) -> tuple[float, ...]:
    """Per-class threshold maximising F1 on validation (0.5 for a class without positives),
    over the cases whose source asserts the class (``known``; all when ``None``)."""
    grid = np.round(np.arange(0.05, 0.96, 0.05), 2)
    out = []
    for c in range(probs.shape[1]):
        rows = slice(None) if known is None else known[:, c].astype(bool)
        truth, scores_c = present[rows, c], probs[rows, c]
        if not truth.any():
            out.append(0.5)
            continue
        scores = [f1_score(truth, scores_c >= t) for t in grid]
        best = max(scores)
        # Among equally good thresholds take the middle one: less brittle than the first.
        ties = [t for t, s in zip(grid, scores, strict=True) if s >= best - 1e-9]
        out.append(float(ties[len(ties) // 2]))
    return tuple(out)


#: Voxel thresholds tried for each class's mask (:func:`tune_mask_thresholds`).
MASK_THRESHOLD_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@torch.no_grad()
def tune_mask_thresholds(model: UniCT, dataset: CaseDataset) -> tuple[float, ...]:
    """Per-class voxel threshold maximising the mean Dice over present findings on
    validation (0.5 for a class never present), from :data:`MASK_THRESHOLD_GRID`.

    The foreground weight of the segmentation loss shifts the probabilities a model
    gives, so 0.5 is not the best cut for every class; like the decision thresholds,
    these are chosen on validation and carried in the card.
    """
    model.eval()
    scores: list[list[list[float]]] = [[] for _ in range(model.cfg.num_labels)]
    for i in range(len(dataset)):
        item = dataset[i]
        if "has_masks" in item and float(item["has_masks"]) < 0.5:
            continue  # a real case without masks (CT-RATE)
        prob = torch.sigmoid(model(item["image"][None]).seg_logits[0].float()).numpy()
        masks = item["masks"].numpy() > 0.5
        for c in np.flatnonzero(item["present"].numpy() > 0.5):
            if masks[c].any():
                scores[c].append([dice(prob[c] > t, masks[c]) for t in MASK_THRESHOLD_GRID])
    model.train()
    out = []
    for per_case in scores:
        if not per_case:
            out.append(0.5)
            continue
        mean = np.mean(per_case, axis=0)
        out.append(float(MASK_THRESHOLD_GRID[int(np.argmax(mean))]))
    return tuple(out)


def _real_cases(
    args: argparse.Namespace, cfg: UniCTConfig, run_dir: Path, cache: Path
) -> tuple[list[Path], list[Path]]:
    """Training and validation cases of the fold of every ``--data`` dataset; the split is
    written beside the run (and read back from there on ``--resume``)."""
    specs: list[DataSpec] = list(args.data)
    for spec in specs:
        if spec.kind not in TRAINABLE_KINDS:
            raise ValueError(
                f"--data {spec}: {spec.kind} is an external test set (labels only); "
                f"train on {' or '.join(TRAINABLE_KINDS)} and evaluate on it"
            )
    split_path = run_dir / SPLIT_FILE
    if args.resume and split_path.exists():
        saved = load_splits(split_path)
        if set(saved) != {s.kind for s in specs} or any(
            sp.fold != args.fold for sp in saved.values()
        ):
            raise ValueError(
                f"{split_path} is fold {next(iter(saved.values())).fold} of "
                f"{', '.join(sorted(saved))}; --resume needs the same --data and --fold"
            )
        splits = [(spec, saved[spec.kind]) for spec in specs]
    else:
        splits = fold_splits(specs, args.fold, folds=FOLDS, seed=args.split_seed)
        save_splits(split_path, args.fold, splits)
    train_paths: list[Path] = []
    val_paths: list[Path] = []
    for spec, split in splits:
        logger.info(
            "%s fold %d: %d training, %d validation, %d test scans",
            spec,
            split.fold,
            len(split.train),
            len(split.val),
            len(split.test),
        )
        train_paths += build_real_cache(spec, split.train, cfg.preprocess, cache)
        val_paths += build_real_cache(spec, split.val, cfg.preprocess, cache)
    return train_paths, val_paths


def train(args: argparse.Namespace) -> TrainResult:
    """Run (or resume) a training run as described by parsed ``train`` arguments."""
    cfg = config_from_args(args)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = args.cache_dir / cfg.name
    progress = not args.no_progress and sys.stderr.isatty()
    data: list[DataSpec] = list(getattr(args, "data", []) or [])
    ratio = float(getattr(args, "phantom_ratio", 0.0) or 0.0)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--phantom-ratio must be in [0, 1), got {ratio}")

    started = time.perf_counter()
    real_train: list[Path] = []
    phantom_train: list[Path] = []
    if data:
        real_train, val_paths = _real_cases(args, cfg, run_dir, cache)
    if not data or ratio > 0:
        logger.info("generating %d training phantoms in %s", len(args.train_seeds), cache)
        phantom_train = list(
            tqdm(
                build_cache(
                    args.train_seeds,
                    cfg.preprocess,
                    cache,
                    workers=args.workers,
                    generator=getattr(args, "generator", "1"),
                ),
                total=len(args.train_seeds),
                desc="phantoms",
                disable=not progress,
            )
        )
    if not data:
        val_paths = list(
            build_cache(
                args.val_seeds,
                cfg.preprocess,
                cache,
                workers=args.workers,
                generator=getattr(args, "generator", "1"),
            )
        )
    train_paths = real_train + phantom_train
    logger.info("cases ready in %.0f s", time.perf_counter() - started)

    tokenizer_path = run_dir / "tokenizer.json"
    if args.init_from is not None and not (args.resume and tokenizer_path.exists()):
        Tokenizer.load(args.init_from.parent / "tokenizer.json").save(tokenizer_path)
    if tokenizer_path.exists() and (args.resume or args.init_from is not None):
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        reports = [str(np.load(p)["report"]) for p in train_paths]
        tokenizer = Tokenizer.train(reports)
        tokenizer.save(tokenizer_path)
    train_set = CaseDataset(train_paths, tokenizer, cfg.max_report_tokens, augment=True)
    val_set = CaseDataset(val_paths, tokenizer, cfg.max_report_tokens)
    sample_weights = None
    if real_train and phantom_train:
        # A share `ratio` of the samples drawn are phantoms, whatever the two counts.
        sample_weights = [(1.0 - ratio) / len(real_train)] * len(real_train) + [
            ratio / len(phantom_train)
        ] * len(phantom_train)

    model = UniCT(cfg, len(tokenizer))
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: _lr_at(s, args.steps, args.warmup)
    )
    weights = LossWeights(
        args.lambda_cls,
        args.lambda_seg,
        args.lambda_rep,
        args.seg_pos_weight,
        args.seg_class_weights,
    ).under(cfg.ablation)
    step = 0
    last = run_dir / "last.pt"
    if args.init_from is not None and not (args.resume and last.exists()):
        init = torch.load(args.init_from, map_location="cpu", weights_only=False)
        excluded = tuple(p for p in args.init_exclude.split(",") if p)
        weights_in = {
            k: v for k, v in init["model"].items() if not (excluded and k.startswith(excluded))
        }
        missing, unexpected = model.load_state_dict(weights_in, strict=False)
        if unexpected:
            raise ValueError(f"{args.init_from} has parameters this model lacks: {unexpected}")
        logger.info(
            "initialised from %s (step %s); new parameters: %s",
            args.init_from,
            init.get("step"),
            missing,
        )
    fresh = args.init_from is None and not (args.resume and last.exists())
    if fresh:
        calibrate_initial_biases(model, train_set)
    if args.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed %s at step %d", last, step)

    generator = torch.Generator().manual_seed(args.seed + step)
    loader: DataLoader[dict[str, torch.Tensor]]
    if sample_weights is not None:
        sampler = WeightedRandomSampler(
            sample_weights, len(sample_weights), replacement=True, generator=generator
        )
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    else:
        loader = DataLoader(
            train_set,
            batch_size=min(args.batch_size, len(train_set)),
            shuffle=True,
            drop_last=True,
            generator=generator,
        )
    # channels_last runs the 2D convolutions of the triplet ResNet and decoder about 1.2x
    # faster on CPU (oneDNN); the weights are saved contiguous (export_bundle).
    # (4D weights only: the 3D convolutions of the triplet context keep their layout).
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    triplet_rng = np.random.default_rng(args.seed + step)
    model.train()
    bar = tqdm(total=args.steps, initial=step, desc="train", disable=not progress)
    running = 0.0
    log = (run_dir / "train_log.jsonl").open("a", encoding="utf-8")
    t0 = time.perf_counter()
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            teacher = weights.report and random.random() < args.findings_teacher
            masks = batch["masks"]
            triplets = None
            if args.seg_triplets and weights.segmentation:
                triplets = sample_triplets(masks, args.seg_triplets, triplet_rng)
                masks = gather_triplets(masks, triplets)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = model(
                    batch["image"],
                    full_resolution_seg=False,
                    with_segmentation=bool(weights.segmentation),
                    findings=batch["present"] if teacher else None,
                    seg_triplets=triplets,
                )
                rep_logits = (
                    model.report_logits(batch["tokens"][:, :-1], out.memory)
                    if weights.report
                    else None
                )
            masks = F.avg_pool3d(masks, kernel_size=(1, 2, 2))
            loss, parts = multitask_loss(
                out.cls_logits,
                out.seg_logits,
                rep_logits,
                batch["present"],
                masks,
                batch["tokens"],
                tokenizer.pad_id,
                weights,
                known=batch["known"],
                has_masks=batch["has_masks"],
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            step += 1
            value = float(loss.detach())
            running = 0.98 * running + 0.02 * value if step > 1 else value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
            if step % 20 == 0 or step == args.steps:
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": value,
                            **parts,
                            "lr": schedule.get_last_lr()[0],
                            "elapsed_s": round(time.perf_counter() - t0, 1),
                        }
                    )
                    + "\n"
                )
                log.flush()
            if step % args.checkpoint_every == 0 or step == args.steps:
                _save_state(last, model, optimiser, schedule, step)
            if args.val_every and step % args.val_every == 0:
                summary = validation_summary(model, val_set)
                logger.info(
                    "step %d: validation macro AUROC %.3f, mean Dice %.3f",
                    step,
                    summary["macro_auroc"],
                    summary["mean_dice"],
                )
                log.write(json.dumps({"step": step, "validation": summary}) + "\n")
                log.flush()
    bar.close()
    log.close()
    seconds = time.perf_counter() - t0

    thresholds = tune_thresholds(*_predict(model, val_set), known=_known(val_set))
    bundle_dir = None
    if args.export is not None:
        mask_thresholds = (
            tune_mask_thresholds(model, val_set) if cfg.ablation.segmentation_supervision else None
        )
        bundle_dir = export_bundle(
            model, cfg, tokenizer, thresholds, args.export, args, mask_thresholds
        )
        if (run_dir / SPLIT_FILE).exists():
            (bundle_dir / SPLIT_FILE).write_bytes((run_dir / SPLIT_FILE).read_bytes())
    return TrainResult(run_dir, step, seconds, running, thresholds, bundle_dir)


@torch.no_grad()
def calibrate_initial_biases(model: UniCT, dataset: CaseDataset, cases: int = 4) -> None:
    """Data-dependent start of the classification path.

    The classifier's output bias starts at the training prevalence of each abnormality,
    and the segmentation-evidence bias cancels the evidence of an untrained decoder, so
    that the first logits are the prior instead of a large offset that Adam would take
    thousands of steps (one learning rate per step) to remove.
    """
    present = np.stack([item["present"] for item in dataset.items]).astype(np.float64)
    known = np.stack(
        [item.get("known", np.ones_like(item["present"])) for item in dataset.items]
    ).astype(np.float64)
    rate = np.clip((present * known).sum(axis=0) / np.maximum(known.sum(axis=0), 1.0), 0.02, 0.98)
    head = model.classifier.net[-1]
    assert isinstance(head, torch.nn.Linear) and head.bias is not None
    head.bias.copy_(torch.from_numpy(np.log(rate / (1 - rate))).to(head.bias.dtype))
    model.eval()
    images = torch.stack([dataset[i]["image"] for i in range(min(cases, len(dataset)))])
    seg = model(images, full_resolution_seg=False).seg_logits
    evidence = model.segmentation_evidence(seg, full_resolution=False).mean(dim=0)
    model.seg_evidence_bias.copy_(-model.seg_evidence_scale * evidence)
    model.train()


def sample_triplets(masks: torch.Tensor, k: int, rng: np.random.Generator) -> torch.Tensor:
    """``(B, K)`` triplet indices per volume: up to ``K // 2`` of the triplets holding a
    finding, the rest drawn from the others, sorted.

    ``masks`` is ``(B, L, D, H, W)`` with ``D = 3 T``. Like the foreground oversampling of
    patch-based segmentation trainers, this keeps lesions in every dense step while the
    decoder still sees empty lung.
    """
    b, _, d, _, _ = masks.shape
    t = d // 3
    k = min(k, t)
    has = masks.reshape(b, -1, t, 3, *masks.shape[-2:]).amax(dim=(1, 3, 4, 5)).numpy() > 0
    out = np.empty((b, k), dtype=np.int64)
    for i in range(b):
        positive = np.flatnonzero(has[i])
        n_pos = min(len(positive), k // 2)
        chosen = rng.choice(positive, n_pos, replace=False) if n_pos else positive[:0]
        rest = np.setdiff1d(np.arange(t), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, k - n_pos, replace=False)])
        out[i] = np.sort(chosen)
    return torch.from_numpy(out)


def gather_triplets(volumes: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
    """``(B, L, D, H, W)`` -> ``(B, L, 3 K, H, W)``: the slices of the chosen triplets."""
    b, c, d, h, w = volumes.shape
    t = d // 3
    k = triplets.shape[1]
    grouped = volumes.reshape(b, c, t, 3 * h * w)
    index = triplets[:, None, :, None].expand(b, c, k, 3 * h * w)
    return torch.gather(grouped, 2, index).reshape(b, c, 3 * k, h, w)


def _save_state(
    path: Path, model: UniCT, optimiser: torch.optim.Optimizer, schedule: Any, step: int
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "config": model.cfg.to_dict(),
        },
        tmp,
    )
    tmp.replace(path)


@torch.no_grad()
def _predict(
    model: UniCT, dataset: CaseDataset, dice_out: list[list[float]] | None = None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Class probabilities and truth over ``dataset``; with ``dice_out`` (one list per
    class), also the Dice of every present finding on the model grid."""
    model.eval()
    probs, present = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        out = model(item["image"][None], with_segmentation=True)
        probs.append(torch.sigmoid(out.cls_logits)[0].numpy())
        truth = item["present"].numpy() > 0.5
        present.append(truth)
        if dice_out is not None and out.seg_logits.numel() and float(item["has_masks"]) > 0.5:
            masks = item["masks"].numpy() > 0.5
            pred = (out.seg_logits[0] > 0).numpy()
            for c in np.flatnonzero(truth):
                dice_out[c].append(dice(pred[c], masks[c]))
    model.train()
    return np.stack(probs), np.stack(present)


def _known(dataset: CaseDataset) -> np.ndarray[Any, Any]:
    """``(N, L)`` which labels each case's source asserts."""
    return np.stack([np.asarray(item["known"], dtype=bool) for item in dataset.items])


def validation_summary(model: UniCT, dataset: CaseDataset) -> dict[str, Any]:
    """Macro AUROC, mean Dice over present findings and both per class, on ``dataset``."""
    dices: list[list[float]] = [[] for _ in range(model.cfg.num_labels)]
    probs, present = _predict(model, dataset, dices)
    known = _known(dataset)
    aurocs = [auroc(present[known[:, c], c], probs[known[:, c], c]) for c in range(probs.shape[1])]
    finite = [a for a in aurocs if a == a]
    every = [d for ds in dices for d in ds]
    return {
        "macro_auroc": float(np.mean(finite)) if finite else float("nan"),
        "mean_dice": float(np.mean(every)) if every else float("nan"),
        "auroc": [round(a, 3) for a in aurocs],
        "dice": [round(float(np.mean(ds)), 3) if ds else None for ds in dices],
    }


def training_data_text(args: argparse.Namespace) -> str:
    """What the model card says the model was trained on."""
    data: list[DataSpec] = list(getattr(args, "data", []) or [])
    generator = str(getattr(args, "generator", "1"))
    seeds = f"seeds {args.train_seeds.start}-{args.train_seeds.stop - 1}" + (
        "" if generator == "1" else f" (generator {generator})"
    )
    if not data:
        return (
            TRAINING_DATA + f" Training {seeds}, validation seeds "
            f"{args.val_seeds.start}-{args.val_seeds.stop - 1}, {args.steps} steps."
        )
    ratio = float(getattr(args, "phantom_ratio", 0.0) or 0.0)
    mixed = f", with phantoms ({seeds}) as {ratio:.0%} of the samples" if ratio else ""
    return (
        f"{' and '.join(spec.kind for spec in data)}: fold {args.fold} of {FOLDS} "
        f"(patient-level 70/15/15, split seed {args.split_seed}; the split is split.json "
        f"beside the weights){mixed}; thresholds tuned on the fold's validation part; "
        f"{args.steps} steps."
    )


def export_bundle(
    model: UniCT,
    cfg: UniCTConfig,
    tokenizer: Tokenizer,
    thresholds: tuple[float, ...],
    directory: Path,
    args: argparse.Namespace,
    mask_thresholds: tuple[float, ...] | None = None,
) -> Path:
    """Write weights (float16), tokenizer and model card into ``directory``; the card's
    mask thresholds are ``mask_thresholds``, or 0.5 for every class when ``None``."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"unict-{cfg.name}.pt"
    state = {
        k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save({"model": state}, weights)
    tokenizer.save(directory / "tokenizer.json")
    masks = mask_thresholds or (0.5,) * len(thresholds)
    labels = tuple(
        replace(lc, threshold=t, mask_threshold=m)
        for lc, t, m in zip(default_labels(), thresholds, masks, strict=True)
    )
    argv = list(getattr(args, "argv", []))
    command = "unict-node " + " ".join(
        shlex.quote(a) for a in (argv if "train" in argv else ["train", *argv])
    )
    card = ModelCard(
        name=f"UniCT-{cfg.name}",
        version=args.version,
        config=cfg,
        labels=labels,
        training_data=training_data_text(args),
        intended_use=INTENDED_USE,
        training_command=command.strip(),
        checkpoint_file=weights.name,
        checkpoint_sha256=sha256_of(weights),
    )
    card.save(directory / CARD_FILE)
    (directory / "MODEL_CARD.md").write_text(card.to_markdown(), encoding="utf-8")
    return directory
