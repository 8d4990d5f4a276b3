"""What a job found, as JSON for the job record, ``/jobs/{id}`` and ``unict-node jobs``.

Only findings, measurements, UIDs and the generated text: no patient identifiers.
"""

from __future__ import annotations

from typing import Any

from service.lung_field import LOBE_NAMES
from service.pipeline import PipelineResult


def summarize(result: PipelineResult, preview: str | None = None) -> dict[str, Any]:
    """JSON-ready summary of an analysed series."""
    analysis = result.analysis
    lungs = analysis.lungs
    return {
        "engine": analysis.engine,
        "report_text": analysis.report_text,
        "model_report_text": analysis.model_report_text,
        "lungs": None
        if lungs is None
        else {
            "found": lungs.found,
            "volume_ml": {side: round(v, 1) for side, v in lungs.volume_ml.items()},
            "laa950_percent": round(lungs.laa950_percent, 2),
        },
        "findings": [
            {
                "code": f.abnormality.code,
                "key": f.abnormality.key,
                "name": f.abnormality.name,
                "probability": round(float(f.probability), 4),
                "threshold": round(float(f.threshold), 4),
                "present": bool(f.present),
                "pattern": f.pattern,
                "localised": f.mask is not None,
                "lesion_count": f.lesion_count,
                "removed_ml": round(f.removed_ml, 2),
                "extent": None
                if f.extent is None
                else {
                    "volume_ml": round(f.extent.volume_ml, 2),
                    "percent_of_lung": {
                        side: round(v, 2) for side, v in f.extent.percent_of_lung.items()
                    },
                    "lobes": [LOBE_NAMES[c] for c in f.extent.lobes],
                },
                "lesions": [
                    {
                        "number": les.lesion_number,
                        "volume_ml": round(les.volume_ml, 2),
                        "longest_axial_diameter_mm": round(les.longest_axial_diameter_mm, 1),
                        "centroid_lps": [round(c, 1) for c in les.centroid_lps],
                        "laterality": str(les.laterality),
                        "lobe": les.lobe_name,
                    }
                    for les in f.lesions
                ],
            }
            for f in analysis.findings
        ],
        "fusion_attention": [
            [round(float(v), 4) for v in row] for row in analysis.fusion_attention
        ],
        "seg_sop_instance_uid": str(result.seg.SOPInstanceUID) if result.seg is not None else None,
        "sr_sop_instance_uid": str(result.sr.SOPInstanceUID),
        "preview_png": preview,
    }
