"""Time UniCT ``small`` on a 300-slice 512x512 chest CT on this CPU: preprocess, forward, report.

Usage: python -m bench.bench_model [--slices 300] [--repeats 5] [--threads 0]

The series is a realistic-grid phantom (512x512, 0.6-0.9 mm pixels) rendered with
exactly ``--slices`` slices; the bundled checkpoint is used when present, else a seeded
random initialisation (same cost). Prints a table of medians and p95 over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from model.bundle import DEFAULT_CHECKPOINT_DIR, load_bundle
from model.config import SMALL
from model.network import UniCT
from model.transforms import preprocess


def realistic_volume(slices: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A realistic-grid phantom (512x512) with exactly ``slices`` slices: (HU, LPS affine)."""
    from model.phantom import realistic_grid, render, sample_case

    spec = sample_case(seed)
    grid = realistic_grid(spec, np.random.default_rng(seed))
    thickness = min(max(grid.slice_spacing, 0.625), 2.5)
    height = slices * thickness
    centre = grid.origin_lps[2] + grid.shape[0] * grid.slice_spacing / 2
    grid = dataclasses.replace(
        grid,
        shape=(slices, 512, 512),
        slice_spacing=thickness,
        slice_thickness=thickness,
        origin_lps=(grid.origin_lps[0], grid.origin_lps[1], centre - height / 2),
    )
    ph = render(spec, grid)
    return ph.hu, ph.affine_lps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hu, affine = realistic_volume(args.slices, args.seed)
    if (DEFAULT_CHECKPOINT_DIR / "model_card.json").exists():
        bundle = load_bundle()
        model, bos, eos, source = (
            bundle.build(),
            bundle.tokenizer.bos_id,
            bundle.tokenizer.eos_id,
            "bundled checkpoint",
        )
    else:
        torch.manual_seed(0)
        model, bos, eos, source = UniCT(SMALL, 400).eval(), 1, 2, "random init (no bundle yet)"
    times: dict[str, list[float]] = {"preprocess": [], "forward": [], "report": []}
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        mi = preprocess(hu, affine, SMALL.preprocess)
        t1 = time.perf_counter()
        with torch.inference_mode():
            out = model(torch.from_numpy(mi.image)[None])
            t2 = time.perf_counter()
            model.generate_report(out.memory, bos, eos)
            t3 = time.perf_counter()
        if i:  # first run is warm-up
            times["preprocess"].append(t1 - t0)
            times["forward"].append(t2 - t1)
            times["report"].append(t3 - t2)
    print(
        f"UniCT small on {hu.shape[0]}x{hu.shape[1]}x{hu.shape[2]} ({source}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print(f"{'stage':<12}{'median s':>10}{'p95 s':>10}")
    for k, v in times.items():
        p95 = sorted(v)[max(0, round(0.95 * len(v)) - 1)]
        print(f"{k:<12}{statistics.median(v):>10.3f}{p95:>10.3f}")


if __name__ == "__main__":
    main()
