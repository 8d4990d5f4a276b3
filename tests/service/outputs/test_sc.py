"""build_key_images: Secondary Capture key images with the findings burned in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from model.labels import label_index
from service.outputs.sc import build_key_images, key_slices
from tests.service.dicom_fixtures import (
    DCIODVFY,
    AnalysedPhantom,
    Sphere,
    analysed_phantom,
    dciodvfy,
    save,
    write_and_read,
)

NODULE = Sphere((-40.0, 10.0, 0.0), 18.0, label_index("nodule"))
GGO = Sphere((45.0, -5.0, -20.0), 12.0, label_index("ground_glass_opacity"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> AnalysedPhantom:
    return analysed_phantom(tmp_path_factory.mktemp("sc"), (NODULE, GGO))


def _build(phantom: AnalysedPhantom, **kwargs: object) -> list[Dataset]:
    options: dict[str, object] = {"series_number": 9903, "series_description": "UniCT key images"}
    options.update(kwargs)
    return [
        write_and_read(image)
        for image in build_key_images(phantom.volume, phantom.analysis, phantom.card, **options)  # type: ignore[arg-type]
    ]


def test_one_key_image_per_finding_on_its_largest_slice(phantom: AnalysedPhantom) -> None:
    images = _build(phantom)
    volume = phantom.volume
    segmented = [f for f in phantom.analysis.findings if f.present and f.mask is not None]
    expected = sorted(
        {int(f.mask.sum(axis=(1, 2)).argmax()) for f in segmented if f.mask is not None}
    )
    assert len(images) == len(expected) == 2
    by_uid = {str(ds.SOPInstanceUID): i for i, ds in enumerate(volume.datasets)}
    sources = [by_uid[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)] for ds in images]
    assert sources == expected
    for number, ds in enumerate(images, start=1):
        assert ds.SOPClassUID == SecondaryCaptureImageStorage
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.PatientID == volume.datasets[0].PatientID
        assert ds.SeriesNumber == 9903 and ds.SeriesDescription == "UniCT key images"
        assert ds.InstanceNumber == number
        assert ds.SeriesInstanceUID == images[0].SeriesInstanceUID
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.Columns >= 512 and ds.Columns % volume.hu.shape[2] == 0
        assert ds.BurnedInAnnotation == "NO"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert list(ds.PatientOrientation) == ["L", "P"]
        assert "ContentDate" in ds and "ContentTime" in ds


def test_overlay_is_burned_in_where_the_mask_is(phantom: AnalysedPhantom) -> None:
    images = _build(phantom)
    finding = next(f for f in phantom.analysis.findings if f.abnormality.key == "nodule")
    assert finding.mask is not None
    index = int(finding.mask.sum(axis=(1, 2)).argmax())
    uid = str(phantom.volume.datasets[index].SOPInstanceUID)
    (ds,) = [d for d in images if str(d.SourceImageSequence[0].ReferencedSOPInstanceUID) == uid]
    pixels = ds.pixel_array.astype(np.int32)
    factor = ds.Columns // phantom.volume.hu.shape[2]
    mask = np.kron(finding.mask[index], np.ones((factor, factor), dtype=bool))
    colour = np.array(finding.abnormality.color_rgb)
    # Inside the mask the colour pulls the grey towards the finding's colour; the legend
    # and footer are drawn away from the lungs, so compare the mask with the rest.
    red_bias = pixels[..., 0] - pixels[..., 1:].mean(axis=-1)
    assert colour[0] > colour[1]
    assert red_bias[mask].mean() > 40
    assert np.median(red_bias[~mask]) == pytest.approx(0, abs=2)


def test_max_images_and_uids(phantom: AnalysedPhantom) -> None:
    assert len(key_slices(phantom.analysis, 1)) == 1
    uids = ["1.2.3.4.5.1", "1.2.3.4.5.2"]
    images = _build(phantom, max_images=2, series_instance_uid="1.2.3.4.5", sop_instance_uids=uids)
    assert [str(ds.SOPInstanceUID) for ds in images] == uids
    assert {str(ds.SeriesInstanceUID) for ds in images} == {"1.2.3.4.5"}
    with pytest.raises(ValueError, match="max_images"):
        _build(phantom, max_images=0)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_dciodvfy_has_no_errors(phantom: AnalysedPhantom, tmp_path: Path) -> None:
    for i, image in enumerate(_build(phantom)):
        result = dciodvfy(save(image, tmp_path / f"sc{i}.dcm"))
        assert not result.errors, result.output


def test_pipeline_adds_key_images_when_enabled(tmp_path: Path) -> None:
    from service.config import OutputsSettings, ScOutputSettings
    from service.pipeline import OutputOptions, OutputUIDs, analyse_series
    from tests.service.dicom_fixtures import make_card
    from tests.service.test_pipeline import FakeEngine, write_fake_engine_series

    series = write_fake_engine_series(tmp_path)
    card = make_card()
    off = analyse_series(series, FakeEngine(card), card, OutputOptions())
    assert off.sc == ()
    uids = OutputUIDs.for_result("1.2.3", "1.2.3.4", 1, card)
    key_images = ScOutputSettings(enabled=True, series_number=9903, max_images=3)
    options = OutputOptions(OutputsSettings(sc=key_images))
    on = analyse_series(series, FakeEngine(card), card, options, uids=uids)
    again = analyse_series(series, FakeEngine(card), card, options, uids=uids)
    assert len(on.sc) == 1  # the one finding, on its largest slice
    (image,) = on.sc
    assert image.SeriesNumber == 9903 and image.SeriesInstanceUID == uids.sc_series
    # A job run again writes the same UIDs (no duplicate in the PACS).
    assert [d.SOPInstanceUID for d in again.sc] == [d.SOPInstanceUID for d in on.sc]
    assert image.SOPInstanceUID == uids.sc_instances(3)[0]
    with pytest.raises(ValueError, match="already the SEG's"):
        OutputsSettings(sc=ScOutputSettings(enabled=True, series_number=9901))
