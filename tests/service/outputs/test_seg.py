"""build_seg: one segment per present finding, references, codes, pixels read back."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from model.labels import label_index
from model.transforms import LPS_TO_RAS
from service.outputs.seg import build_seg
from service.postprocess import AnalysisResult
from tests.service.dicom_fixtures import (
    DCIODVFY,
    SEGIMAGE2ITKIMAGE,
    AnalysedPhantom,
    Sphere,
    analysed_phantom,
    dciodvfy,
    save,
    write_and_read,
)
from tests.service.outputs.test_sr import assert_ihe_air_algorithm

LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
NODULE = Sphere((-40.0, 10.0, 0.0), 18.0, label_index("nodule"))
GGO = Sphere((45.0, -5.0, -20.0), 12.0, label_index("ground_glass_opacity"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> AnalysedPhantom:
    return analysed_phantom(tmp_path_factory.mktemp("seg"), (NODULE, GGO))


def _build(
    phantom: AnalysedPhantom, analysis: AnalysisResult | None = None, **kwargs: object
) -> Dataset:
    options: dict[str, object] = {"series_number": 301, "series_description": "UniCT SEG test"}
    options.update(kwargs)
    seg = build_seg(phantom.volume, analysis or phantom.analysis, phantom.card, **options)  # type: ignore[arg-type]
    assert seg is not None
    return seg


def _segmented(phantom: AnalysedPhantom) -> list[npt.NDArray[np.bool_]]:
    masks = [f.mask for f in phantom.analysis.findings if f.present and f.mask is not None]
    assert len(masks) == 2
    return masks


def _read_back_masks(
    seg: Dataset, phantom: AnalysedPhantom, segments: int
) -> npt.NDArray[np.bool_]:
    """``(S, D, H, W)`` masks decoded by highdicom from the written SEG."""
    parsed = hd.seg.Segmentation.from_dataset(seg)
    uids = [ds.SOPInstanceUID for ds in phantom.volume.datasets]
    pixels = parsed.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=list(range(1, segments + 1)),
        assert_missing_frames_are_empty=True,
    )
    return np.moveaxis(np.asarray(pixels) > 0, -1, 0)


def test_binary_seg_content(phantom: AnalysedPhantom) -> None:
    seg = write_and_read(_build(phantom))
    volume, card = phantom.volume, phantom.card
    assert seg.SOPClassUID == SegmentationStorage
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.SeriesInstanceUID != volume.series_instance_uid
    assert seg.SeriesNumber == 301 and seg.SeriesDescription == "UniCT SEG test"
    assert seg.PatientID == volume.datasets[0].PatientID
    assert seg.ContentDate and seg.ContentTime
    assert seg.Manufacturer == card.manufacturer
    assert seg.ManufacturerModelName == card.name and seg.SoftwareVersions == card.version
    assert seg.DeviceSerialNumber
    assert_ihe_air_algorithm(seg, card)

    # Segments: the present findings, in card order, numbered from 1.
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2]
    present = [f for f in phantom.analysis.findings if f.present]
    for item, finding in zip(seg.SegmentSequence, present, strict=True):
        assert item.SegmentLabel == finding.abnormality.name
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        concept = finding.abnormality.concept
        assert (prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning) == (
            concept.value,
            concept.scheme,
            concept.meaning,
        )
        region = item.AnatomicRegionSequence[0]
        assert (region.CodeValue, region.CodingSchemeDesignator) == (codes.SCT.Lung.value, "SCT")
        expected_lab = hd.color.CIELabColor.from_rgb(*finding.abnormality.color_rgb).value
        assert tuple(item.RecommendedDisplayCIELabValue) == tuple(expected_lab)
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == card.name and algorithm.AlgorithmVersion == card.version
        family = algorithm.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")

    # References: every source instance, and each frame its own source slice.
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in volume.datasets}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.series_instance_uid
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        expected = [float(v) for v in by_uid[source.ReferencedSOPInstanceUID].ImagePositionPatient]
        assert position == pytest.approx(expected)


def test_binary_seg_pixels_and_omitted_frames(phantom: AnalysedPhantom) -> None:
    masks = _segmented(phantom)
    seg = write_and_read(_build(phantom))
    occupied = sum(int(m.any(axis=(1, 2)).sum()) for m in masks)
    assert int(seg.NumberOfFrames) == occupied
    np.testing.assert_array_equal(_read_back_masks(seg, phantom, 2), np.stack(masks))


def test_all_frames_when_not_omitting(phantom: AnalysedPhantom) -> None:
    masks = _segmented(phantom)
    seg = write_and_read(_build(phantom, omit_empty_frames=False))
    assert int(seg.NumberOfFrames) == phantom.volume.shape[0] * len(masks)
    np.testing.assert_array_equal(_read_back_masks(seg, phantom, 2), np.stack(masks))


def test_labelmap_seg(phantom: AnalysedPhantom) -> None:
    masks = _segmented(phantom)
    seg = write_and_read(_build(phantom, segmentation_type="LABELMAP"))
    assert seg.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
    assert seg.SegmentationType == "LABELMAP"
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [0, 1, 2]  # 0: background
    np.testing.assert_array_equal(_read_back_masks(seg, phantom, 2), np.stack(masks))


def test_overlapping_findings(phantom: AnalysedPhantom) -> None:
    """A nodule inside a larger region: BINARY keeps both; LABELMAP shows the smaller."""
    findings = list(phantom.analysis.findings)
    nodule = findings[NODULE.label_index]
    ggo = findings[GGO.label_index]
    assert nodule.mask is not None and ggo.mask is not None
    findings[GGO.label_index] = dataclasses.replace(ggo, mask=ggo.mask | nodule.mask)
    analysis = dataclasses.replace(phantom.analysis, findings=tuple(findings))
    masks = [ggo.mask | nodule.mask, nodule.mask]

    binary = write_and_read(_build(phantom, analysis))
    assert binary.SegmentsOverlap == "YES"
    np.testing.assert_array_equal(_read_back_masks(binary, phantom, 2), np.stack(masks))

    labelmap = write_and_read(_build(phantom, analysis, segmentation_type="LABELMAP"))
    read = _read_back_masks(labelmap, phantom, 2)
    np.testing.assert_array_equal(read[1], nodule.mask)
    np.testing.assert_array_equal(read[0], masks[0] & ~nodule.mask)


def test_no_segment_gives_none(phantom: AnalysedPhantom) -> None:
    findings = tuple(
        dataclasses.replace(f, mask=None, lesions=()) for f in phantom.analysis.findings
    )
    analysis = dataclasses.replace(phantom.analysis, findings=findings)
    assert (
        build_seg(phantom.volume, analysis, phantom.card, series_number=1, series_description="x")
        is None
    )


def test_fractional_is_refused(phantom: AnalysedPhantom) -> None:
    with pytest.raises(ValueError, match="FRACTIONAL"):
        _build(phantom, segmentation_type="FRACTIONAL")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("omit", [True, False])
def test_dciodvfy_finds_no_errors(phantom: AnalysedPhantom, tmp_path: Path, omit: bool) -> None:
    # LABELMAP is not checked: dicom3tools 2022 (Debian) does not know its SOP class.
    result = dciodvfy(save(_build(phantom, omit_empty_frames=omit), tmp_path / "seg.dcm"))
    assert not result.errors, result.output
    assert result.returncode == 0, result.output


@pytest.mark.skipif(SEGIMAGE2ITKIMAGE is None, reason="dcmqi is not installed (pip install dcmqi)")
def test_dcmqi_reads_the_seg_back_voxel_identical(phantom: AnalysedPhantom, tmp_path: Path) -> None:
    masks = _segmented(phantom)
    path = save(_build(phantom), tmp_path / "seg.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    assert SEGIMAGE2ITKIMAGE is not None
    proc = subprocess.run(
        [
            SEGIMAGE2ITKIMAGE,
            "--inputDICOM",
            str(path),
            "--outputDirectory",
            str(out),
            "-t",
            "nifti",
            "-p",
            "seg",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    to_source = np.linalg.inv(phantom.volume.affine_lps) @ LPS_TO_RAS
    for number, mask in enumerate(masks, start=1):
        image: Any = nib.load(out / f"seg-{number}.nii.gz")
        data = np.asarray(image.dataobj)
        voxels = np.argwhere(data > 0)
        ras = image.affine @ np.c_[voxels, np.ones(len(voxels))].T
        index = to_source @ ras
        rounded = np.round(index[:3]).astype(int)
        np.testing.assert_allclose(index[:3], rounded, atol=1e-3)
        read = np.zeros_like(mask)
        read[tuple(rounded)] = True
        np.testing.assert_array_equal(read, mask)


def _boxes_analysis(
    phantom: AnalysedPhantom, *, overlap: bool
) -> tuple[AnalysisResult, list[npt.NDArray[np.bool_]]]:
    """The two present findings with hand-drawn masks: the first in two blocks with
    empty slices between them (slices 2-4 and 30-33), the second on slices 6-9, or
    on slices 3-9 across the first one's block when ``overlap``."""
    shape = phantom.volume.shape
    first = np.zeros(shape, dtype=bool)
    first[2:5, 20:40, 30:45] = True
    first[30:34, 70:90, 60:70] = True
    second = np.zeros(shape, dtype=bool)
    if overlap:
        second[3:10, 30:60, 40:80] = True
    else:
        second[6:10, 50:60, 90:110] = True
    findings = list(phantom.analysis.findings)
    present = [i for i, f in enumerate(findings) if f.present and f.mask is not None]
    assert len(present) == 2
    for i, mask in zip(present, (first, second), strict=True):
        findings[i] = dataclasses.replace(findings[i], mask=mask)
    return dataclasses.replace(phantom.analysis, findings=tuple(findings)), [first, second]


@pytest.mark.parametrize(
    ("overlap", "kind"), [(False, "BINARY"), (True, "BINARY"), (False, "LABELMAP")]
)
def test_fast_path_matches_plain_highdicom(
    phantom: AnalysedPhantom, overlap: bool, kind: str
) -> None:
    """build_seg's shortcuts (bounding-box painting, only the occupied slices given to
    highdicom as sources, references to the others added back) give the same SEG as a
    plain highdicom call on the full 4D stack with every source: same frames, pixels,
    per-frame positions and derivation references, and instance references."""
    from service.outputs.seg import segment_descriptions, segmented_findings

    analysis, masks = _boxes_analysis(phantom, overlap=overlap)
    node = _build(phantom, analysis, segmentation_type=kind)
    plain = hd.seg.Segmentation(
        source_images=list(phantom.volume.datasets),
        pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type=kind,
        segment_descriptions=segment_descriptions(segmented_findings(analysis), phantom.card),
        series_instance_uid=hd.UID(),
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="x",
        manufacturer_model_name="x",
        software_versions="x",
        device_serial_number="x",
    )
    assert int(node.NumberOfFrames) == int(plain.NumberOfFrames)
    assert node.SegmentsOverlap == plain.SegmentsOverlap
    assert node.PixelData == plain.PixelData
    assert node.PerFrameFunctionalGroupsSequence == plain.PerFrameFunctionalGroupsSequence
    assert node.SourceImageSequence == plain.SourceImageSequence
    assert node.ReferencedSeriesSequence == plain.ReferencedSeriesSequence
    read = _read_back_masks(write_and_read(node), phantom, 2)
    np.testing.assert_array_equal(read, np.stack(masks))


def test_sources_of_another_series_are_refused(phantom: AnalysedPhantom) -> None:
    from service.outputs.seg import _reference_all_sources

    seg = build_seg(
        phantom.volume, phantom.analysis, phantom.card, series_number=1, series_description="x"
    )
    assert seg is not None
    stranger = Dataset()
    stranger.update(phantom.volume.datasets[-1])
    stranger.SeriesInstanceUID = hd.UID()
    with pytest.raises(ValueError, match="same series"):
        _reference_all_sources(seg, [*phantom.volume.datasets[:-1], stranger])
