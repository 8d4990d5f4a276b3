"""A PNG preview of a result: the axial slice with the most segmented tissue, masks blended in.

For admins and the demo (``/jobs/{id}`` names the file); radiologists use the SEG in their
viewer. The image shows no patient identifiers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from service.findings import AnalysisResult
from service.volume import SourceVolume

LUNG_WINDOW = (-1350.0, 150.0)


def best_slice(analysis: AnalysisResult, depth: int) -> int:
    """Index of the source slice with the largest segmented area (the middle one if none)."""
    area = np.zeros(depth, dtype=np.int64)
    for finding in analysis.present:
        if finding.mask is not None:
            area += finding.mask.sum(axis=(1, 2))
    return int(area.argmax()) if area.any() else depth // 2


def write_preview(
    volume: SourceVolume, analysis: AnalysisResult, path: Path, alpha: float = 0.45
) -> Path:
    """Render the preview PNG to ``path`` and return it.

    The slice is shown in a lung window with anterior at the top and patient right on the
    image's left (radiological convention), as the source rows and columns are stored.
    """
    index = best_slice(analysis, volume.hu.shape[0])
    lo, hi = LUNG_WINDOW
    grey = np.clip((volume.hu[index] - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    legend: list[tuple[str, tuple[int, int, int]]] = []
    for finding in analysis.present:
        if finding.mask is None or not finding.mask[index].any():
            continue
        m = finding.mask[index]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(
            finding.abnormality.color_rgb, dtype=np.float64
        )
        legend.append(
            (
                f"{finding.abnormality.name} p={finding.probability:.2f}",
                finding.abnormality.color_rgb,
            )
        )
    image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for i, (text, colour) in enumerate(legend):
        draw.rectangle((6, 6 + 14 * i, 16, 16 + 14 * i), fill=colour)
        draw.text((20, 5 + 14 * i), text, fill=(255, 255, 255))
    draw.text(
        (6, image.height - 16),
        f"slice {index + 1}/{volume.hu.shape[0]}  UniCT - not for clinical use",
        fill=(255, 255, 0),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
