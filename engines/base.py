"""The engine interface every backend implements, and what inference returns."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, exactly what is missing."""

    available: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class InferenceResult:
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
        ``(3, 3)`` task-by-task attention of the fusion module, averaged over heads
        (rows/columns: classification, segmentation, report).
    engine
        Name of the backend that produced it.
    """

    probabilities: npt.NDArray[np.float32]
    segmentation: npt.NDArray[np.float32]
    report_tokens: tuple[int, ...]
    report_text: str
    fusion_attention: npt.NDArray[np.float32]
    engine: str


class Engine(abc.ABC):
    """An inference backend for UniCT.

    Subclasses set :attr:`name`, answer :meth:`is_available` without side effects, and
    run the whole model in :meth:`infer` on one preprocessed volume.
    """

    name: str = "abstract"

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> Availability:
        """Whether this backend can run on this machine, with the reason when not."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load weights / build or deserialise the engine. Idempotent."""

    @abc.abstractmethod
    def infer(self, image: npt.NDArray[np.float32]) -> InferenceResult:
        """Run UniCT on a ``(D, H, W)`` preprocessed volume (see :mod:`model.transforms`)."""

    @property
    def loaded(self) -> bool:
        """True once :meth:`load` has succeeded."""
        return getattr(self, "_loaded", False)
