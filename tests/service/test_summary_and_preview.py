"""What a job records about its result (summary JSON) and the PNG preview."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.pipeline import OutputOptions, analyse_series
from service.preview import best_slice, write_preview
from service.summary import summarize
from tests.service.dicom_fixtures import make_card
from tests.service.test_pipeline import NODULE, FakeEngine, write_fake_engine_series


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    series = write_fake_engine_series(tmp_path_factory.mktemp("summary"))
    card = make_card()
    return analyse_series(series, FakeEngine(card), card, OutputOptions())


def test_summary_lists_every_finding_without_patient_data(result) -> None:  # type: ignore[no-untyped-def]
    summary = summarize(result, preview="/tmp/x.png")
    assert len(summary["findings"]) == 10
    nodule = summary["findings"][NODULE]
    assert nodule["present"] and nodule["probability"] == pytest.approx(0.95)
    assert nodule["lesions"][0]["volume_ml"] > 0
    assert nodule["lesions"][0]["lobe"].startswith("right ")
    assert nodule["lesion_count"] == 1 and nodule["localised"]
    assert summary["lungs"]["found"] and summary["lungs"]["laa950_percent"] == 0.0
    assert re.match(r"A 4\d mm nodule in the right ", summary["report_text"])
    assert summary["model_report_text"] == "A 40 mm nodule in the left upper lobe."
    assert sum(f["present"] for f in summary["findings"]) == 1
    assert summary["sr_sop_instance_uid"] == str(result.sr.SOPInstanceUID)
    assert summary["seg_sop_instance_uid"] == str(result.seg.SOPInstanceUID)
    text = json.dumps(summary)
    assert str(result.sr.PatientID) not in text
    assert str(result.sr.PatientName) not in text


def test_preview_shows_the_lesion_in_its_colour(result, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    finding = result.analysis.findings[NODULE]
    index = best_slice(result.analysis, result.volume.hu.shape[0])
    assert finding.mask is not None and finding.mask[index].any()
    path = write_preview(result.volume, result.analysis, tmp_path / "p.png")
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape[:2] == result.volume.hu.shape[1:]
    rows, cols = np.nonzero(finding.mask[index])
    pixel = image[int(rows.mean()), int(cols.mean())]
    colour = np.array(finding.abnormality.color_rgb)
    # Blended with alpha 0.45 over grey: the finding's colour dominates the pixel's hue.
    assert np.argmax(pixel) == np.argmax(colour)
