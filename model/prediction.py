"""What one UniCT pass gives for one volume, whatever ran it (numpy only: the engines that
do not run PyTorch share it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Prediction:
    """What one UniCT pass gives for one volume.

    Attributes
    ----------
    probabilities
        ``(num_labels,)`` sigmoid probabilities, label order of the model card.
    segmentation
        ``(num_labels, D, H, W)`` float32 probabilities on the model grid.
    report_tokens
        Generated token ids, without BOS/EOS/padding.
    report_text
        The detokenised report.
    fusion_attention
        ``(3, 3)`` task-by-task attention of the fusion module, averaged over heads.
    """

    probabilities: npt.NDArray[np.float32]
    segmentation: npt.NDArray[np.float32]
    report_tokens: tuple[int, ...]
    report_text: str
    fusion_attention: npt.NDArray[np.float32]
