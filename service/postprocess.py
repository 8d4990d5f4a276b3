"""From model outputs to findings on the source grid, as a radiologist reports them.

A finding is *present* when its probability reaches the model card's threshold. Only
present findings get a mask: the model-grid segmentation probability is resampled onto
the source voxels (:func:`model.transforms.to_source_grid`) inside the bounding box of
its above-threshold region and thresholded. Then anatomy and practice decide what of it
is reported (the lung field comes from :mod:`service.lung_field`):

- **Where it can be.** A finding of the lungs keeps only voxels in the lung field or
  within :attr:`PostprocessOptions.lung_tolerance_mm` of it (juxtapleural lesions); a
  pleural finding only voxels of the pleural zone. The masks, volumes, SEG and SR all
  follow from the gated masks. When no lung field is found (not a chest CT as expected),
  nothing is gated and the analysis says so.
- **Diffuse or focal** (the card's ``pattern``). A diffuse finding (emphysema,
  ground-glass, septal thickening, micronodules, bronchial wall thickening,
  bronchiectasis) is one :class:`Extent`: volume, percent of each lung, lobes involved.
  A focal finding (nodule, consolidation, linear opacity, effusion) is split into
  lesions (26-connected components). A lesion of the lungs must lie mostly in the lung
  field itself (not only in the tolerance band), its boundary is moved onto its own
  tissue within a model voxel (:func:`service.lesion_shape.refine_to_tissue`), and a
  nodule must be blob-like (:func:`service.lesion_shape.blob_ratio`: vessels and
  fissures are not). Lesions under the card's minimum size are dropped; the largest
  :attr:`PostprocessOptions.max_lesions` are itemised and the rest counted.
- Without a lung field (a series that is not a chest CT as expected) none of this
  applies: the model's masks are reported as they are, and the SR says the lung field
  was not found.
- Each lesion is measured the way a reader would: volume, longest diameter in the image
  plane (axial for an axial series), centroid in patient coordinates, and the lobe that
  holds most of it (geometric lobes, :mod:`service.lung_field`).

The report text is then made to agree with these findings (:mod:`service.report_text`).
"""


from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt

from engines.base import InferenceResult
from model.card import LabelCard, ModelCard
from model.transforms import ModelInput
from service.extents import diffuse_extent
from service.findings import (
    AnalysisResult,
    BoolArray,
    Extent,
    FindingResult,
    LesionMeasurement,
    LongAxis,
    LungSummary,
    PostprocessOptions,
)
from service.gating import AnalysisContext
from service.lesions import BLOB_FINDINGS, focal_lesions
from service.lung_field import LungField, lung_field
from service.report_text import reconcile_report
from service.resample import probability_on_source, stride
from service.volume import SourceVolume

__all__ = [
    "AnalysisResult",
    "Extent",
    "FindingResult",
    "LesionMeasurement",
    "LongAxis",
    "LungSummary",
    "PostprocessOptions",
    "postprocess",
]

logger = logging.getLogger(__name__)


def _finding(
    index: int,
    label: LabelCard,
    probability: float,
    segmentation: npt.NDArray[np.float32],
    model_input: ModelInput,
    ctx: AnalysisContext,
    nodules: BoolArray | None = None,
) -> FindingResult:
    abnormality = label.abnormality
    present = probability >= label.threshold
    mask: BoolArray | None = None
    lesions: tuple[LesionMeasurement, ...] = ()
    count = 0
    extent: Extent | None = None
    removed_ml = 0.0
    if present:
        options = ctx.options
        voxel_threshold = (
            label.mask_threshold if options.mask_threshold is None else options.mask_threshold
        )
        # Lesions' boundaries are refined on the CT afterwards, extents are coarse anyway:
        # half the model grid's spacing is all the resampling needs.
        step = stride(model_input, ctx.volume)
        resampled = probability_on_source(
            segmentation, model_input, ctx.volume, voxel_threshold, step
        )
        if resampled is not None:
            box, probability_box = resampled
            raw = probability_box > voxel_threshold
            if abnormality.pattern == "diffuse":
                mask, extent = diffuse_extent(box, raw, abnormality, ctx)
            else:
                mask, lesions, count = focal_lesions(index, abnormality, box, raw, ctx, nodules)
            kept = int(mask.sum()) if mask is not None else 0
            removed_ml = max(int(raw.sum()) - kept, 0) * ctx.volume.voxel_volume_ml
        logger.info(
            "finding %s present (p=%.3f >= %.3f): %s; %.1f mL removed",
            abnormality.key,
            probability,
            label.threshold,
            f"extent {extent.volume_ml:.1f} mL" if extent else f"{count} lesion(s)",
            removed_ml,
        )
    return FindingResult(
        index=index,
        abnormality=abnormality,
        probability=probability,
        threshold=float(label.threshold),
        present=present,
        mask=mask,
        lesions=lesions,
        lesion_count=count,
        extent=extent,
        removed_ml=removed_ml,
    )


def postprocess(
    result: InferenceResult,
    model_input: ModelInput,
    volume: SourceVolume,
    card: ModelCard,
    options: PostprocessOptions | None = None,
    *,
    lungs: LungField | None = None,
) -> AnalysisResult:
    """Decide, gate, segment and measure every abnormality of the card.

    Parameters
    ----------
    result
        The engine's output for ``model_input``.
    model_input
        The preprocessed volume (its affine maps the model grid to patient space).
    volume
        The source volume the masks are produced on.
    card
        Labels, concepts, thresholds, patterns and sites.
    options
        See :class:`PostprocessOptions` (its defaults when ``None``).
    lungs
        The series' lung field, when already computed; computed here otherwise (when
        ``options.anatomy``).

    Returns
    -------
    AnalysisResult
        All findings in card order, and the report text made to agree with them.

    Raises
    ------
    ValueError
        If the result's shapes do not match the card or the model input.
    """
    options = options or PostprocessOptions()
    n = len(card.labels)
    probabilities = np.asarray(result.probabilities, dtype=np.float64).reshape(-1)
    if probabilities.shape != (n,):
        raise ValueError(
            f"engine returned {probabilities.size} probabilities; the model card has {n} labels"
        )
    segmentation = np.asarray(result.segmentation)
    if segmentation.shape != (n, *model_input.image.shape):
        raise ValueError(
            f"segmentation shape {segmentation.shape} does not match {n} labels on the model grid {model_input.image.shape}"
        )
    summary: LungSummary | None = None
    field_used: LungField | None = None
    if options.anatomy:
        if lungs is None:
            lungs = lung_field(volume.hu, volume.affine_lps)
        summary = LungSummary(lungs.found, dict(lungs.volume_ml), lungs.laa950_percent)
        if lungs.found:
            field_used = lungs
        else:
            logger.warning("no lung field found: findings are not restricted to the lungs")
    ctx = AnalysisContext(volume=volume, options=options, lungs=field_used)
    # Nodules first: another focal finding's lesion that is a nodule is not reported twice.
    order = sorted(range(n), key=lambda i: card.labels[i].abnormality.key not in BLOB_FINDINGS)
    done: dict[int, FindingResult] = {}
    nodules: BoolArray | None = None
    for index in order:
        label = card.labels[index]
        finding = _finding(
            index,
            label,
            float(probabilities[index]),
            segmentation[index],
            model_input,
            ctx,
            nodules if label.abnormality.key not in BLOB_FINDINGS else None,
        )
        if label.abnormality.key in BLOB_FINDINGS and finding.mask is not None:
            nodules = finding.mask if nodules is None else nodules | finding.mask
        done[index] = finding
    findings = tuple(done[i] for i in range(n))
    return AnalysisResult(
        findings=findings,
        report_text=reconcile_report(result.report_text, findings),
        fusion_attention=np.asarray(result.fusion_attention, dtype=np.float32),
        engine=result.engine,
        model_input_shape=tuple(int(s) for s in model_input.image.shape),
        model_report_text=result.report_text,
        lungs=summary,
    )
