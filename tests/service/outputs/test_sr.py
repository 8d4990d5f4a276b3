"""build_sr: a TID 1500 report with every abnormality, every lesion and the report text."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from model.card import ModelCard
from model.labels import label_index
from service.outputs.identity import PROCESSING_ALGORITHM, device_uid
from service.outputs.seg import build_seg
from service.outputs.sr import (
    ABSENT,
    EXTENT,
    FINDING,
    LAA_950,
    LONG_AXIS,
    NUMBER_OF_LESIONS,
    PRESENT,
    PROBABILITY,
    THRESHOLD,
    build_sr,
)
from tests.service.dicom_fixtures import (
    DCIODVFY,
    DSRDUMP,
    TID1500READER,
    AnalysedPhantom,
    Sphere,
    analysed_phantom,
    dciodvfy,
    report_of,
    save,
    write_and_read,
)

NODULE = Sphere((-40.0, 10.0, 0.0), 18.0, label_index("nodule"))
SECOND_NODULE = Sphere((50.0, 0.0, 10.0), 10.0, label_index("nodule"))
GGO = Sphere((45.0, -5.0, -20.0), 12.0, label_index("ground_glass_opacity"))
#: Lobe codes of service.lung_field as the SR's (anatomic location, laterality).
LOBE_SITE = {
    1: (codes.SCT.UpperLobeOfLung, codes.SCT.Right),
    2: (codes.SCT.MiddleLobeOfRightLung, codes.SCT.Right),
    3: (codes.SCT.LowerLobeOfLung, codes.SCT.Right),
    4: (codes.SCT.UpperLobeOfLung, codes.SCT.Left),
    5: (codes.SCT.LowerLobeOfLung, codes.SCT.Left),
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> AnalysedPhantom:
    return analysed_phantom(tmp_path_factory.mktemp("sr"), (NODULE, SECOND_NODULE, GGO))


@pytest.fixture(scope="module")
def seg(phantom: AnalysedPhantom) -> Dataset:
    built = build_seg(
        phantom.volume, phantom.analysis, phantom.card, series_number=301, series_description="SEG"
    )
    assert built is not None
    return write_and_read(built)


@pytest.fixture(scope="module")
def sr(phantom: AnalysedPhantom, seg: Dataset) -> Dataset:
    built = build_sr(
        phantom.volume,
        phantom.analysis,
        seg,
        phantom.card,
        series_number=302,
        series_description="UniCT SR",
    )
    return write_and_read(built)


def _value(
    group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
    name: hd.sr.CodedConcept | Code,
) -> float:
    (measurement,) = group.get_measurements(name=name)
    return float(measurement.value)


def test_document(sr: Dataset, seg: Dataset, phantom: AnalysedPhantom) -> None:
    volume, card = phantom.volume, phantom.card
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR" and sr.SeriesNumber == 302 and sr.SeriesDescription == "UniCT SR"
    assert sr.StudyInstanceUID == volume.study_instance_uid
    assert sr.PatientID == volume.datasets[0].PatientID
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert sr.Manufacturer == card.manufacturer and sr.ManufacturerModelName == card.name
    assert_ihe_air_algorithm(sr, card)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {ds.SOPInstanceUID for ds in volume.datasets} | {seg.SOPInstanceUID}
    root = sr.ContentTemplateSequence[0]
    assert root.TemplateIdentifier == "1500"


def assert_ihe_air_algorithm(dataset: Dataset, card: ModelCard) -> None:
    """IHE AI Results: exactly one Contributing Equipment item is the algorithm, with its
    Purpose of Reference, manufacturer, model name, software version and Device UID (the
    other items are the source's acquisition equipment and highdicom, the library)."""
    algorithms = [
        e
        for e in dataset.ContributingEquipmentSequence
        if e.PurposeOfReferenceCodeSequence[0].CodeValue == PROCESSING_ALGORITHM.value
    ]
    (equipment,) = algorithms
    (purpose,) = equipment.PurposeOfReferenceCodeSequence
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert (equipment.ManufacturerModelName, equipment.SoftwareVersions) == (
        card.name,
        card.version,
    )
    assert equipment.Manufacturer == card.manufacturer
    assert equipment.DeviceUID == device_uid(card)


def test_observer_is_the_model(sr: Dataset, phantom: AnalysedPhantom) -> None:
    report = report_of(sr)
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.name == phantom.card.name
    assert attributes.model_name == phantom.card.version
    assert attributes.manufacturer_name == phantom.card.manufacturer
    assert attributes.uid == device_uid(phantom.card)


def test_device_uid_changes_with_the_weights(phantom: AnalysedPhantom) -> None:
    card = phantom.card
    retrained = dataclasses.replace(card, checkpoint_sha256="0" * 64)
    again = dataclasses.replace(card, checkpoint_sha256="0" * 64)
    assert device_uid(retrained) != device_uid(card)
    assert device_uid(retrained) == device_uid(again)


def _container(sr: Dataset, code_value: str) -> Dataset:
    (container,) = [
        item
        for item in sr.ContentSequence
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]
    return container


def test_every_abnormality_in_qualitative_evaluations(
    sr: Dataset, phantom: AnalysedPhantom
) -> None:
    """TID 1500 row 13, one CODE per abnormality: present or absent, name, probability and
    threshold."""
    evaluations = [
        hd.sr.CodeContentItem.from_dataset(item)
        for item in _container(sr, "C0034375").ContentSequence
        if item.ValueType == "CODE"
    ]
    assert len(evaluations) == len(phantom.analysis.findings) == 10
    for evaluation, finding in zip(evaluations, phantom.analysis.findings, strict=True):
        concept = finding.abnormality.concept
        assert evaluation.name == hd.sr.CodedConcept(concept.value, concept.scheme, concept.meaning)
        assert evaluation.value == (PRESENT if finding.present else ABSENT)
        assert evaluation.relationship_type == hd.sr.RelationshipTypeValues.CONTAINS
        properties = {
            item.ConceptNameCodeSequence[0].CodeValue: item for item in evaluation.ContentSequence
        }
        assert {str(item.RelationshipType) for item in properties.values()} == {"HAS PROPERTIES"}
        assert properties[FINDING.value].TextValue == finding.abnormality.name
        probability = hd.sr.NumContentItem.from_dataset(properties[PROBABILITY.value])
        threshold = hd.sr.NumContentItem.from_dataset(properties[THRESHOLD.value])
        assert probability.value == pytest.approx(finding.probability, abs=1e-6)
        assert threshold.value == pytest.approx(finding.threshold)
        assert probability.unit.value == threshold.unit.value == "1"


def _lesion_groups(
    sr: Dataset,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    return [
        g
        for g in report_of(sr).get_planar_roi_measurement_groups()
        if isinstance(g.roi, hd.sr.ImageRegion)
        and g.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    ]


def _extent_groups(
    sr: Dataset,
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    return [
        g
        for g in report_of(sr).get_planar_roi_measurement_groups()
        if isinstance(g.roi, hd.sr.ImageRegion)
        and g.roi.graphic_type == hd.sr.GraphicTypeValues.POINT
    ]


def test_no_measurement_group_without_image_coordinates(sr: Dataset) -> None:
    """Every group is a planar ROI (SCOORD) or, for the same lesion, a volumetric ROI: OHIF
    cannot open a report with TID 1501 groups (no image coordinates)."""
    report = report_of(sr)
    assert report.get_image_measurement_groups() == []
    planar = {g.tracking_uid for g in report.get_planar_roi_measurement_groups()}
    volumetric = {g.tracking_uid for g in report.get_volumetric_roi_measurement_groups()}
    # Two nodules (a planar and a volumetric group each) and the ground-glass extent.
    assert volumetric < planar and len(volumetric) == 2 and len(planar) == 3


def test_one_planar_group_per_lesion(sr: Dataset, phantom: AnalysedPhantom) -> None:
    """TID 1410: the long axis as a POLYLINE on the lesion's key slice, in its lobe."""
    volume = phantom.volume
    groups = _lesion_groups(sr)
    lesions = [(f, lesion) for f in phantom.analysis.findings for lesion in f.lesions]
    assert len(groups) == len(lesions) == 2
    for group, (finding, lesion) in zip(groups, lesions, strict=True):
        assert (
            group.tracking_identifier == f"{finding.abnormality.name} lesion {lesion.lesion_number}"
        )
        assert group.finding_type is not None
        assert group.finding_type.value == finding.abnormality.concept.value
        (site,) = group.finding_sites
        assert lesion.lobe in LOBE_SITE
        assert (site.value, site.laterality) == LOBE_SITE[lesion.lobe]
        region = group.roi
        assert isinstance(region, hd.sr.ImageRegion)
        source = volume.datasets[lesion.long_axis.slice_index]
        assert region.ContentSequence[0].referenced_sop_instance_uid == source.SOPInstanceUID
        assert region.ContentSequence[0].referenced_sop_class_uid == source.SOPClassUID
        # (column, row), the top left corner of the top left pixel at (0, 0).
        points = np.asarray(region.value)
        axis = lesion.long_axis
        expected = np.array([axis.start[::-1], axis.end[::-1]]) + 0.5
        np.testing.assert_allclose(points, expected, atol=1e-4)
        length = np.linalg.norm((points[1] - points[0]) * (volume.spacing[2], volume.spacing[1]))
        assert _value(group, LONG_AXIS) == pytest.approx(length, abs=0.01)
        assert _value(group, LONG_AXIS) == pytest.approx(lesion.longest_axial_diameter_mm, abs=0.01)


def test_a_diffuse_finding_is_one_extent_group(sr: Dataset, phantom: AnalysedPhantom) -> None:
    """TID 1410 with a POINT inside the finding on its key slice: volume and percent of each
    lung, the lobes involved as finding sites; never one group per component."""
    ggo = phantom.analysis.findings[GGO.label_index]
    assert ggo.extent is not None and ggo.lesions == () and ggo.mask is not None
    (group,) = _extent_groups(sr)
    assert group.tracking_identifier == "Ground-glass opacity extent"
    region = group.roi
    assert isinstance(region, hd.sr.ImageRegion)
    (point,) = np.asarray(region.value)
    key = phantom.volume.datasets[ggo.extent.key_slice]
    assert region.ContentSequence[0].referenced_sop_instance_uid == key.SOPInstanceUID
    column, row = np.floor(point).astype(int)
    assert ggo.mask[ggo.extent.key_slice, row, column]
    assert _value(group, codes.SCT.Volume) == pytest.approx(ggo.extent.volume_ml, abs=0.01)
    assert _value(group, codes.SCT.Volume) == pytest.approx(GGO.volume_ml, rel=0.15)
    extents = {
        m.finding_sites[0].laterality.value: float(m.value)
        for m in group.get_measurements(name=EXTENT)
    }
    assert extents[codes.SCT.Left.value] == pytest.approx(ggo.extent.percent_of_lung["left"], abs=0.01)
    assert extents[codes.SCT.Right.value] == 0.0
    sites = {(s.value, s.laterality) for s in group.finding_sites}
    assert sites == {LOBE_SITE[code] for code in ggo.extent.lobes}
    assert all(laterality == codes.SCT.Left for _, laterality in sites)


def test_lesion_counts_and_the_emphysema_index(sr: Dataset, phantom: AnalysedPhantom) -> None:
    """A focal finding says how many lesions it has; emphysema carries LAA-950 and its method."""
    items = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item
        for item in _container(sr, "C0034375").ContentSequence
        if item.ValueType == "CODE"
    }
    nodule = {
        p.ConceptNameCodeSequence[0].CodeValue: p
        for p in items["Nodule"].ContentSequence
    }
    count = hd.sr.NumContentItem.from_dataset(nodule[NUMBER_OF_LESIONS.value])
    assert count.value == 2
    emphysema = {
        p.ConceptNameCodeSequence[0].CodeValue: p
        for p in items["Pulmonary emphysema"].ContentSequence
    }
    laa = hd.sr.NumContentItem.from_dataset(emphysema[LAA_950.value])
    assert phantom.analysis.lungs is not None
    assert laa.value == pytest.approx(phantom.analysis.lungs.laa950_percent, abs=0.01)
    assert laa.unit.value == "%"
    method = emphysema[codes.DCM.Comment.value] if "121106" not in emphysema else emphysema["121106"]
    assert "below -950 HU" in method.TextValue and "lung field" in method.TextValue


def test_one_volumetric_group_per_lesion(
    sr: Dataset, seg: Dataset, phantom: AnalysedPhantom
) -> None:
    report = report_of(sr)
    groups = report.get_volumetric_roi_measurement_groups()
    planar = report.get_planar_roi_measurement_groups()
    lesions = [(f, lesion) for f in phantom.analysis.findings for lesion in f.lesions]
    assert len(groups) == len(lesions) == 2
    # The same lesion as the planar group: OHIF shows both groups' values on its line.
    assert [g.tracking_uid for g in groups] == [
        g.tracking_uid for g in planar if g.tracking_uid in {v.tracking_uid for v in groups}
    ]
    segment_of = {NODULE.label_index: 2, GGO.label_index: 1}  # card order: GGO (7), nodule (8)
    for group, (finding, lesion) in zip(groups, lesions, strict=True):
        assert (
            group.tracking_identifier == f"{finding.abnormality.name} lesion {lesion.lesion_number}"
        )
        assert group.finding_type is not None
        assert group.finding_type.value == finding.abnormality.concept.value
        (site,) = group.finding_sites
        assert (site.value, site.laterality) == LOBE_SITE[lesion.lobe]
        assert site.laterality == (
            codes.SCT.Right if lesion.laterality == "right" else codes.SCT.Left
        )
        reference = group.referenced_segment
        assert reference is not None
        segment_item = reference[0]
        assert segment_item.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert segment_item.referenced_sop_class_uid == seg.SOPClassUID
        assert (
            segment_item.ReferencedSOPSequence[0].ReferencedSegmentNumber
            == segment_of[finding.index]
        )
        assert reference[1].value == phantom.volume.series_instance_uid
        assert _value(group, codes.SCT.Volume) == pytest.approx(lesion.volume_ml, abs=1e-3)
        assert _value(group, codes.SCT.LongAxis) == pytest.approx(
            lesion.longest_axial_diameter_mm, abs=0.01
        )
        # Referenced Frame Number may not accompany Referenced Segment Number.
        assert "ReferencedFrameNumber" not in segment_item.ReferencedSOPSequence[0]


def test_report_text_in_qualitative_evaluations(sr: Dataset, phantom: AnalysedPhantom) -> None:
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in _container(sr, "C0034375").ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Findings"] == phantom.analysis.report_text
    assert "NOT FOR CLINICAL USE" in texts["Comment"]


def test_without_seg_planar_groups_only(phantom: AnalysedPhantom) -> None:
    sr = write_and_read(
        build_sr(
            phantom.volume,
            phantom.analysis,
            None,
            phantom.card,
            series_number=2,
            series_description="x",
        )
    )
    report = report_of(sr)
    assert len(report.get_planar_roi_measurement_groups()) == 3  # two lesions, one extent
    assert report.get_volumetric_roi_measurement_groups() == []
    codes_ = [i for i in _container(sr, "C0034375").ContentSequence if i.ValueType == "CODE"]
    assert len(codes_) == 10


@pytest.fixture(scope="module")
def normal_sr(phantom: AnalysedPhantom) -> Dataset:
    """The report of a study where nothing was found: no lesion, so no measurement group."""
    findings = tuple(
        dataclasses.replace(f, present=False, mask=None, lesions=(), lesion_count=0, extent=None)
        for f in phantom.analysis.findings
    )
    normal = dataclasses.replace(phantom.analysis, findings=findings)
    return write_and_read(
        build_sr(
            phantom.volume, normal, None, phantom.card, series_number=2, series_description="x"
        )
    )


def test_nothing_found_has_evaluations_but_no_imaging_measurements(normal_sr: Dataset) -> None:
    report = report_of(normal_sr)
    assert report.get_planar_roi_measurement_groups() == []
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in normal_sr.ContentSequence]
    assert codes.DCM.ImagingMeasurements.value not in names
    assert codes.DCM.ProcedureReported.value in names
    evaluations = [
        item
        for item in _container(normal_sr, "C0034375").ContentSequence
        if item.ValueType == "CODE"
    ]
    assert [item.ConceptCodeSequence[0].CodeValue for item in evaluations] == [ABSENT.value] * 10
    assert normal_sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_seg_of_another_analysis_is_refused(phantom: AnalysedPhantom, seg: Dataset) -> None:
    findings = list(phantom.analysis.findings)
    findings[NODULE.label_index] = dataclasses.replace(
        findings[NODULE.label_index], mask=None, lesions=(), lesion_count=0
    )
    other = dataclasses.replace(phantom.analysis, findings=tuple(findings))
    other_seg = build_seg(
        phantom.volume, other, phantom.card, series_number=5, series_description="x"
    )
    with pytest.raises(ValueError, match="not of this analysis"):
        build_sr(
            phantom.volume,
            phantom.analysis,
            other_seg,
            phantom.card,
            series_number=6,
            series_description="x",
        )


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("which", ["sr", "normal_sr"])
def test_dciodvfy_finds_no_errors(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    result = dciodvfy(save(request.getfixturevalue(which), tmp_path / "sr.dcm"))
    assert not result.errors, result.output
    assert result.returncode == 0, result.output


@pytest.mark.skipif(DSRDUMP is None, reason="dsrdump (DCMTK) is not installed")
def test_dsrdump_prints_the_tree(sr: Dataset, tmp_path: Path, phantom: AnalysedPhantom) -> None:
    assert DSRDUMP is not None
    proc = subprocess.run(
        [DSRDUMP, str(save(sr, tmp_path / "sr.dcm"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Imaging Measurement Report" in proc.stdout
    assert "Referenced Segment" in proc.stdout
    assert "SCOORD" in proc.stdout and "POLYLINE" in proc.stdout
    assert "Qualitative Evaluations" in proc.stdout
    assert phantom.analysis.report_text[:20] in proc.stdout


@pytest.mark.skipif(TID1500READER is None, reason="dcmqi is not installed (pip install dcmqi)")
def test_dcmqi_tid1500reader_parses(sr: Dataset, seg: Dataset, tmp_path: Path) -> None:
    assert TID1500READER is not None
    out = tmp_path / "sr.json"
    proc = subprocess.run(
        [
            TID1500READER,
            "--inputDICOM",
            str(save(sr, tmp_path / "sr.dcm")),
            "--outputMetadata",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metadata = json.loads(out.read_text())
    measurements = metadata["Measurements"]
    # Per lesion the planar and the volumetric group; the ground-glass extent's group.
    assert len(measurements) == 5
    volumetric = [m for m in measurements if "ReferencedSegment" in m]
    assert sorted(m["ReferencedSegment"] for m in volumetric) == [2, 2]
    for group in volumetric:
        quantities = {item["quantity"]["CodeMeaning"] for item in group["measurementItems"]}
        assert quantities == {"Volume", "Long axis"}
    assert {m["segmentationSOPInstanceUID"] for m in volumetric} == {seg.SOPInstanceUID}
    assert metadata["procedureReported"]["CodeValue"] == "24627-2"
    assert metadata["observerContext"]["ObserverType"] == "DEVICE"
