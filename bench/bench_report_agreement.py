"""Does the report text agree with the SEG? The model's own text against the reconciled one.

Usage: python -m bench.bench_report_agreement [--seed 8000000] [--cases 48] [--grid training]

For each unseen phantom (seeds never used in training, as ``unict-node evaluate`` uses
them) the bundled model runs on the phantom's CT; the node's post-processing gates,
measures and locates the findings and reconciles the text (``service.report_text``).
Every sentence that states a finding is checked against the SEG: the finding must be in
the SEG and every side and lobe word must be where the SEG puts it
(:func:`service.report_text.location_agreement`). Printed: that agreement for the model's
text ("before") and the node's text ("after"), and how many sentences were removed,
corrected or added. Phantoms only: the figure says nothing of real CTs, where the real
case (``bench_realct``) is the check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from engines.pytorch import PyTorchEngine
from model.bundle import DEFAULT_CHECKPOINT_DIR, load_bundle
from model.phantom import generate
from model.transforms import preprocess
from service.postprocess import postprocess
from service.report_text import location_agreement
from service.volume import SourceVolume


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=8_000_000)
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--grid", choices=("training", "realistic"), default="training")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bundle = load_bundle(args.checkpoint)
    engine = PyTorchEngine(bundle, device="cpu")
    engine.load()
    card = bundle.card
    totals = {"before": [0, 0], "after": [0, 0]}
    changed = {"removed": 0, "added": 0, "corrected": 0}
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        phantom = generate(seed, args.grid)
        spacing = tuple(float(np.linalg.norm(phantom.affine_lps[:3, i])) for i in range(3))
        volume = SourceVolume(
            hu=phantom.hu.astype(np.float32),
            affine_lps=phantom.affine_lps,
            datasets=(),
            study_instance_uid="",
            series_instance_uid="",
            frame_of_reference_uid="",
            slice_thickness=spacing[0],
            spacing=spacing,  # type: ignore[arg-type]
        )
        model_input = preprocess(volume.hu, volume.affine_lps, card.config.preprocess)
        analysis = postprocess(engine.infer(model_input.image), model_input, volume, card)
        before = location_agreement(analysis.model_report_text, analysis.findings)
        after = location_agreement(analysis.report_text, analysis.findings)
        for key, agreement in (("before", before), ("after", after)):
            totals[key][0] += agreement.agreeing
            totals[key][1] += agreement.sentences
        old = {s.strip() for s in analysis.model_report_text.split(".") if s.strip()}
        new = {s.strip() for s in analysis.report_text.split(".") if s.strip()}
        changed["removed"] += max(len(old - new) - max(len(new - old), 0), 0)
        changed["added"] += max(len(new - old) - len(old - new), 0)
        changed["corrected"] += min(len(old - new), len(new - old))
        print(
            f"seed {seed}: before {before.agreeing}/{before.sentences}, "
            f"after {after.agreeing}/{after.sentences}",
            flush=True,
        )
    rate = {k: (a / n if n else 1.0) for k, (a, n) in totals.items()}
    print(
        f"\n{args.cases} unseen phantoms (seeds {args.seed}-{args.seed + args.cases - 1}, "
        f"{args.grid} grid), {card.name} {card.version}, {time.perf_counter() - started:.0f} s"
    )
    for key in ("before", "after"):
        agreeing, sentences = totals[key]
        print(
            f"  {key:<7} {agreeing}/{sentences} sentences stating a finding agree with the SEG "
            f"({100 * rate[key]:.1f}%)"
        )
    print(f"  sentences changed: {changed}")
    if args.json:
        args.json.write_text(json.dumps({"totals": totals, "rate": rate, "changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
