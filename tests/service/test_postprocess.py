"""postprocess: decisions, masks on the source grid, lesions measured against spheres."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from model.labels import LABEL_KEYS, label_index
from model.transforms import ModelInput, preprocess, to_source_grid
from service.postprocess import AnalysisResult, postprocess
from service.volume import SourceVolume, load_series
from tests.service.dicom_fixtures import (
    Sphere,
    axial_affine,
    fake_result,
    make_card,
    oblique_affine,
    voxel_centres_lps,
    write_phantom_series,
)

SHAPE = (40, 128, 128)
NODULE = Sphere((-40.0, 10.0, 0.0), 18.0, label_index("nodule"))  # patient's right (x < 0)
GGO = Sphere((45.0, -5.0, -5.0), 15.0, label_index("ground_glass_opacity"))  # left
CARD = make_card()


def _load(tmp: Path, affine: npt.NDArray[np.float64]) -> tuple[SourceVolume, ModelInput]:
    paths = write_phantom_series(tmp, SHAPE, affine, (NODULE, GGO))
    volume = load_series(paths)
    return volume, preprocess(volume.hu, volume.affine_lps, CARD.config.preprocess)


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> tuple[SourceVolume, ModelInput]:
    return _load(tmp_path_factory.mktemp("axial"), axial_affine())


@pytest.fixture(scope="module")
def analysis(axial: tuple[SourceVolume, ModelInput]) -> AnalysisResult:
    volume, model_input = axial
    return postprocess(fake_result(model_input, (NODULE, GGO)), model_input, volume, CARD)


def _sphere_mask(volume: SourceVolume, sphere: Sphere) -> npt.NDArray[np.bool_]:
    lps = voxel_centres_lps(volume.shape, volume.affine_lps)
    return np.asarray(
        np.linalg.norm(lps - np.array(sphere.centre_lps), axis=-1) <= sphere.radius_mm
    )


def test_all_findings_in_card_order(analysis: AnalysisResult) -> None:
    assert [f.abnormality.key for f in analysis.findings] == list(LABEL_KEYS)
    assert [f.index for f in analysis.findings] == list(range(10))
    assert {f.index for f in analysis.present} == {NODULE.label_index, GGO.label_index}
    for finding in analysis.findings:
        assert finding.threshold == 0.5
        if not finding.present:
            assert finding.mask is None and finding.lesions == ()
    assert analysis.report_text.startswith("Synthetic report")
    assert analysis.engine == "fake"
    assert analysis.model_input_shape == CARD.config.preprocess.size
    assert analysis.fusion_attention.shape == (3, 3)


@pytest.mark.parametrize("sphere", [NODULE, GGO], ids=["nodule", "ggo"])
def test_lesion_matches_the_analytic_sphere(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput], sphere: Sphere
) -> None:
    volume, _ = axial
    finding = analysis.findings[sphere.label_index]
    assert finding.mask is not None and finding.mask.shape == volume.shape
    (lesion,) = finding.lesions
    assert lesion.label_index == sphere.label_index and lesion.lesion_number == 1
    assert lesion.volume_ml == pytest.approx(sphere.volume_ml, rel=0.05)
    assert lesion.voxel_count == int(finding.mask.sum())
    in_plane_voxel = max(volume.spacing[1:])
    assert abs(lesion.longest_axial_diameter_mm - sphere.diameter_mm) <= in_plane_voxel
    np.testing.assert_allclose(lesion.centroid_lps, sphere.centre_lps, atol=max(volume.spacing) / 2)
    assert lesion.laterality == ("right" if sphere.centre_lps[0] < 0 else "left")
    centre_slice = round((sphere.centre_lps[2] - volume.affine_lps[2, 3]) / volume.spacing[0])
    assert lesion.slice_range[0] <= centre_slice <= lesion.slice_range[1]
    # The mask agrees with the voxelised sphere except for a shell of boundary voxels.
    truth = _sphere_mask(volume, sphere)
    dice = 2 * np.sum(truth & finding.mask) / (truth.sum() + finding.mask.sum())
    assert dice > 0.9


@pytest.mark.parametrize("sphere", [NODULE, GGO], ids=["nodule", "ggo"])
def test_long_axis_is_drawn_where_it_was_measured(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput], sphere: Sphere
) -> None:
    """The key slice and end points give a segment as long as the reported diameter."""
    volume, _ = axial
    finding = analysis.findings[sphere.label_index]
    assert finding.mask is not None
    (lesion,) = finding.lesions
    axis = lesion.long_axis
    assert lesion.slice_range[0] <= axis.slice_index <= lesion.slice_range[1]
    row_mm, col_mm = volume.spacing[1], volume.spacing[2]
    delta = np.subtract(axis.end, axis.start) * (row_mm, col_mm)
    assert float(np.linalg.norm(delta)) == pytest.approx(lesion.longest_axial_diameter_mm)
    plane = finding.mask[axis.slice_index]
    # Half a pixel inwards from each end lies the pixel centre of a lesion pixel.
    inwards = delta / np.linalg.norm(delta) * (row_mm + col_mm) / 4 / (row_mm, col_mm)
    for point, sign in ((axis.start, 1), (axis.end, -1)):
        row, col = np.rint(np.add(point, sign * inwards)).astype(int)
        assert plane[row, col], (point, sign)
    # The key slice is one where the lesion's section is widest: near the sphere's centre.
    centre_slice = (sphere.centre_lps[2] - volume.affine_lps[2, 3]) / volume.spacing[0]
    assert abs(axis.slice_index - centre_slice) <= sphere.radius_mm / volume.spacing[0] / 2


def test_cropped_resampling_equals_a_full_resample(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput]
) -> None:
    volume, model_input = axial
    probability = fake_result(model_input, (NODULE,)).segmentation[NODULE.label_index]
    full = to_source_grid(
        probability[None], model_input.affine_ras, volume.affine_lps, volume.shape
    )[0]
    np.testing.assert_array_equal(analysis.findings[NODULE.label_index].mask, full > 0.5)


def test_oblique_source_grid(tmp_path: Path) -> None:
    volume, model_input = _load(tmp_path, oblique_affine(SHAPE, degrees=20.0, flip_rows=True))
    result = postprocess(fake_result(model_input, (NODULE,)), model_input, volume, CARD)
    (lesion,) = result.findings[NODULE.label_index].lesions
    assert lesion.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    np.testing.assert_allclose(lesion.centroid_lps, NODULE.centre_lps, atol=1.5)


def test_probability_equal_to_threshold_is_present(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,), present_probability=0.5)
    analysis = postprocess(result, model_input, volume, CARD)
    assert analysis.findings[NODULE.label_index].present


def test_present_without_segmentation_has_no_mask(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,))
    result = dataclasses.replace(result, segmentation=np.zeros_like(result.segmentation))
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert finding.present and finding.mask is None and finding.lesions == ()


def test_absent_finding_ignores_its_segmentation(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,), present_probability=0.2)
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert not finding.present and finding.mask is None


def test_small_components_are_dropped(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE, GGO))
    analysis = postprocess(result, model_input, volume, CARD, min_lesion_ml=20.0)
    assert analysis.findings[NODULE.label_index].lesions  # 24 mL
    ggo = analysis.findings[GGO.label_index]  # 14 mL
    assert ggo.present and ggo.lesions == () and ggo.mask is None


def test_two_lesions_of_one_finding_largest_first(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    small = dataclasses.replace(GGO, label_index=NODULE.label_index)
    result = fake_result(model_input, (NODULE, small))
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert [lesion.lesion_number for lesion in finding.lesions] == [1, 2]
    first, second = finding.lesions
    assert first.volume_ml > second.volume_ml
    assert first.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    assert second.volume_ml == pytest.approx(GGO.volume_ml, rel=0.05)
    assert finding.mask is not None
    assert int(finding.mask.sum()) == first.voxel_count + second.voxel_count


def test_shapes_must_match_the_card(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,))
    with pytest.raises(ValueError, match="probabilities"):
        postprocess(
            dataclasses.replace(result, probabilities=result.probabilities[:5]),
            model_input,
            volume,
            CARD,
        )
    with pytest.raises(ValueError, match="segmentation shape"):
        postprocess(
            dataclasses.replace(result, segmentation=result.segmentation[:, :3]),
            model_input,
            volume,
            CARD,
        )


def test_masks_follow_the_cards_per_class_mask_threshold(
    axial: tuple[SourceVolume, ModelInput],
) -> None:
    """A card's mask threshold for one class cuts that class's mask there (the others keep
    theirs); an explicit ``mask_threshold`` overrides every class."""
    volume, model_input = axial
    labels = tuple(
        dataclasses.replace(lc, mask_threshold=0.75) if i == NODULE.label_index else lc
        for i, lc in enumerate(CARD.labels)
    )
    card = dataclasses.replace(CARD, labels=labels)
    assert card.mask_thresholds[NODULE.label_index] == 0.75
    result = fake_result(model_input, (NODULE, GGO))
    tuned = postprocess(result, model_input, volume, card)
    default = postprocess(result, model_input, volume, CARD)
    overridden = postprocess(result, model_input, volume, card, mask_threshold=0.5)

    def volume_ml(analysis: AnalysisResult, index: int) -> float:
        return sum(lesion.volume_ml for lesion in analysis.findings[index].lesions)

    # The test head's probability is 0.5 on the sphere's surface and rises inwards.
    assert volume_ml(tuned, NODULE.label_index) < 0.8 * volume_ml(default, NODULE.label_index)
    assert volume_ml(tuned, GGO.label_index) == volume_ml(default, GGO.label_index)
    assert volume_ml(overridden, NODULE.label_index) == volume_ml(default, NODULE.label_index)
