"""What a job found, as JSON for the job record, ``/jobs/{id}`` and ``unict-node jobs``.

Only findings, measurements, UIDs and the generated text: no patient identifiers.
"""

from __future__ import annotations

from typing import Any

from service.pipeline import PipelineResult


def summarize(result: PipelineResult, preview: str | None = None) -> dict[str, Any]:
    """JSON-ready summary of an analysed series."""
    analysis = result.analysis
    return {
        "engine": analysis.engine,
        "report_text": analysis.report_text,
        "findings": [
            {
                "code": f.abnormality.code,
                "key": f.abnormality.key,
                "name": f.abnormality.name,
                "probability": round(float(f.probability), 4),
                "threshold": round(float(f.threshold), 4),
                "present": bool(f.present),
                "lesions": [
                    {
                        "number": les.lesion_number,
                        "volume_ml": round(les.volume_ml, 2),
                        "longest_axial_diameter_mm": round(les.longest_axial_diameter_mm, 1),
                        "centroid_lps": [round(c, 1) for c in les.centroid_lps],
                        "laterality": str(les.laterality),
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
