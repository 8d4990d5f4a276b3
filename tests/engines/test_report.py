"""The report generator every backend shares: it states the card's decisions."""

from __future__ import annotations

import numpy as np
import torch

from engines.pytorch import ReportGenerator
from model.bundle import load_bundle
from model.network.unict import FINDINGS_SLOT


def test_findings_token_is_made_from_the_thresholded_decisions() -> None:
    bundle = load_bundle()
    generator = ReportGenerator.from_bundle(bundle)
    assert generator.findings is not None
    seen: list[torch.Tensor] = []
    greedy = generator.decoder.greedy

    def capture(memory: torch.Tensor, bos: int, eos: int, max_len: int) -> torch.Tensor:
        seen.append(memory.clone())
        return greedy(memory, bos, eos, max_len)

    generator.decoder.greedy = capture  # type: ignore[method-assign]
    cfg = bundle.card.config
    memory = torch.randn(1, 3 + cfg.triplets, cfg.d_model)
    thresholds = np.asarray(bundle.card.thresholds, dtype=np.float32)
    below, above = thresholds - 0.01, np.minimum(thresholds + 0.01, 1.0)
    above[0] = below[0]  # the first abnormality stays under its threshold
    generator.generate(memory, below)
    generator.generate(memory, above)
    generator.generate(memory)  # no probabilities: the memory as the visual path made it
    with torch.inference_mode():
        nothing = generator.findings(torch.zeros(1, cfg.num_labels))
        decided = torch.ones(1, cfg.num_labels)
        decided[0, 0] = 0
        all_but_first = generator.findings(decided)
    assert torch.allclose(seen[0][:, FINDINGS_SLOT], nothing)
    assert torch.allclose(seen[1][:, FINDINGS_SLOT], all_but_first)
    assert torch.equal(seen[2], memory)
    # Only the findings token changes; the visual tokens are the engine's.
    assert torch.equal(seen[0][:, FINDINGS_SLOT + 1 :], memory[:, FINDINGS_SLOT + 1 :])
