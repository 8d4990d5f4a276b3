"""A phantom case: its grid-independent specification and its rendered form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model.labels import LABEL_KEYS
from model.phantom.anatomy import Anatomy, sample_anatomy
from model.phantom.findings import Lesion, sample_lesions
from model.phantom.grid import Grid
from model.phantom.realism import Realism, adjust_nodules, sample_realism

#: Probability that each abnormality is chosen in a non-normal case.
FINDING_PROBABILITY = 0.38


@dataclass(frozen=True)
class CaseSpec:
    """Every random choice of a case, in mm and HU, independent of any grid.

    Parameters
    ----------
    seed
        The seed the case was drawn from.
    anatomy
        Body, lungs, mediastinum and the seed of their fine structure.
    lesions
        The inserted findings.
    noise_sigma_ref
        Noise standard deviation (HU) of a 1 mm^3 voxel; it scales as
        ``1 / sqrt(voxel volume)``.
    noise_seed
        Seed of the noise realisation.
    realism
        Generator 2's scanner and patient choices (:mod:`model.phantom.realism`);
        ``None`` for generator 1.
    """

    seed: int
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    noise_sigma_ref: float
    noise_seed: int
    realism: Realism | None = None

    @property
    def generator(self) -> int:
        """1 (the original generator) or 2 (:mod:`model.phantom.realism`)."""
        return 1 if self.realism is None else 2

    @property
    def present(self) -> npt.NDArray[np.bool_]:
        """``(10,)`` which abnormalities have at least one lesion (label order)."""
        labels = {lesion.label for lesion in self.lesions}
        return np.array([key in labels for key in LABEL_KEYS], dtype=np.bool_)


@dataclass(frozen=True, eq=False)
class Phantom:
    """A rendered case.

    Attributes
    ----------
    spec
        The case specification.
    grid
        The voxel grid.
    hu
        ``(D, H, W)`` int16 Hounsfield units; -1024 outside the body and table.
    masks
        ``(10, D, H, W)`` uint8 binary masks in :data:`model.labels.DEFAULT_LABELS` order.
    present
        ``(10,)`` bool, equal to ``masks.any(axis=(1, 2, 3))``.
    lesions
        The inserted lesions.
    report
        Free-text findings report.
    """

    spec: CaseSpec
    grid: Grid
    hu: npt.NDArray[np.int16]
    masks: npt.NDArray[np.uint8]
    present: npt.NDArray[np.bool_]
    lesions: tuple[Lesion, ...]
    report: str

    @property
    def affine_lps(self) -> npt.NDArray[np.float64]:
        """4x4 voxel index -> LPS (mm) of :attr:`hu` and :attr:`masks`."""
        return self.grid.affine_lps


def sample_case(
    seed: int, *, p_normal: float = 0.15, max_findings: int = 5, generator: int = 1
) -> CaseSpec:
    """Draw a case: anatomy, which abnormalities are present, their lesions, the noise level.

    Parameters
    ----------
    seed
        Seed; the same seed gives the same case.
    p_normal
        Probability of a case with no abnormality.
    max_findings
        Largest number of distinct abnormalities in one case.
    generator
        1: the original generator; 2: the same anatomy and findings with the scanner and
        patient realism of :mod:`model.phantom.realism` (some nodules moved to the pleura
        or a vessel, some subsolid).
    """
    if generator not in (1, 2):
        raise ValueError(f"generator must be 1 or 2, got {generator!r}")
    rng = np.random.default_rng([seed, 0x50A7])
    anatomy = sample_anatomy(rng)
    labels: tuple[str, ...] = ()
    if rng.random() >= p_normal and max_findings > 0:
        chosen = [key for key in LABEL_KEYS if rng.random() < FINDING_PROBABILITY]
        if not chosen:
            chosen = [LABEL_KEYS[int(rng.integers(len(LABEL_KEYS)))]]
        if len(chosen) > max_findings:
            keep = rng.choice(len(chosen), size=max_findings, replace=False)
            chosen = [chosen[i] for i in sorted(keep)]
        labels = tuple(chosen)
    lesions = sample_lesions(anatomy, rng, labels)
    spec = CaseSpec(
        seed=seed,
        anatomy=anatomy,
        lesions=lesions,
        noise_sigma_ref=float(rng.uniform(25.0, 45.0)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    if generator == 1:
        return spec
    realism = sample_realism(seed)
    return CaseSpec(
        seed=spec.seed,
        anatomy=anatomy,
        lesions=adjust_nodules(anatomy, lesions, realism),
        noise_sigma_ref=spec.noise_sigma_ref,
        noise_seed=spec.noise_seed,
        realism=realism,
    )
