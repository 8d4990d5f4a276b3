"""postprocess: decisions, masks on the source grid gated by anatomy, lesions and extents
measured against known spheres, and what is not reported (outside the lungs, vessels,
specks, duplicates)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from model.labels import LABEL_KEYS, label_index
from model.phantom.dicom_series import write_ct_series
from model.transforms import ModelInput, preprocess, to_source_grid
from service.lung_field import LEFT_LOBES, RIGHT_LOBES
from service.postprocess import (
    AnalysisResult,
    PostprocessOptions,
    postprocess,
)
from service.resample import probability_on_source
from service.volume import SourceVolume, load_series
from tests.service.dicom_fixtures import (
    LESION_HU,
    Sphere,
    axial_affine,
    fake_result,
    make_card,
    oblique_affine,
    sphere_phantom,
    voxel_centres_lps,
    write_phantom_series,
)

SHAPE = (40, 128, 128)
NODULE = Sphere((-40.0, 10.0, 0.0), 18.0, label_index("nodule"))  # right lung (x < 0)
GGO = Sphere((45.0, -5.0, -5.0), 15.0, label_index("ground_glass_opacity"))  # left lung
CARD = make_card()
NO_ANATOMY = PostprocessOptions(anatomy=False)


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


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return float(2 * np.sum(a & b) / (a.sum() + b.sum()))


def test_all_findings_in_card_order(analysis: AnalysisResult) -> None:
    assert [f.abnormality.key for f in analysis.findings] == list(LABEL_KEYS)
    assert [f.index for f in analysis.findings] == list(range(10))
    assert {f.index for f in analysis.present} == {NODULE.label_index, GGO.label_index}
    for finding in analysis.findings:
        assert finding.threshold == 0.5
        if not finding.present:
            assert finding.mask is None and finding.lesions == () and finding.extent is None
    assert analysis.model_report_text == "Synthetic report: a nodule in the right lung."
    # The text states what the SEG shows, where it shows it.
    assert analysis.report_text.startswith("Ground-glass opacity in the left ")
    assert "nodule in the right " in analysis.report_text
    assert analysis.engine == "fake"
    assert analysis.model_input_shape == CARD.config.preprocess.size
    assert analysis.fusion_attention.shape == (3, 3)
    assert analysis.lungs is not None and analysis.lungs.found


def test_a_nodule_is_a_lesion_that_matches_the_sphere(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput]
) -> None:
    volume, _ = axial
    finding = analysis.findings[NODULE.label_index]
    assert finding.pattern == "focal" and finding.extent is None
    assert finding.mask is not None and finding.mask.shape == volume.shape
    (lesion,) = finding.lesions
    assert finding.lesion_count == 1
    assert lesion.label_index == NODULE.label_index and lesion.lesion_number == 1
    assert lesion.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    assert lesion.voxel_count == int(finding.mask.sum())
    in_plane_voxel = max(volume.spacing[1:])
    assert abs(lesion.longest_axial_diameter_mm - NODULE.diameter_mm) <= in_plane_voxel
    np.testing.assert_allclose(lesion.centroid_lps, NODULE.centre_lps, atol=max(volume.spacing) / 2)
    assert lesion.laterality == "right" and lesion.lobe in RIGHT_LOBES
    centre_slice = round((NODULE.centre_lps[2] - volume.affine_lps[2, 3]) / volume.spacing[0])
    assert lesion.slice_range[0] <= centre_slice <= lesion.slice_range[1]
    # Refined onto the lesion's own tissue: the voxelised sphere.
    assert _dice(_sphere_mask(volume, NODULE), finding.mask) > 0.95


def test_a_diffuse_finding_is_one_extent(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput]
) -> None:
    volume, _ = axial
    finding = analysis.findings[GGO.label_index]
    assert finding.pattern == "diffuse"
    assert finding.lesions == () and finding.lesion_count == 0
    assert finding.mask is not None and finding.extent is not None
    extent = finding.extent
    assert extent.volume_ml == pytest.approx(GGO.volume_ml, rel=0.1)
    assert extent.volume_ml == pytest.approx(finding.mask.sum() * volume.voxel_volume_ml)
    assert analysis.lungs is not None
    left = analysis.lungs.volume_ml["left"]
    assert extent.percent_of_lung["left"] == pytest.approx(100 * extent.volume_ml / left, rel=0.02)
    assert extent.percent_of_lung["right"] == 0.0
    assert extent.lobes and set(extent.lobes) <= set(LEFT_LOBES)
    assert extent.sides == ("left",)
    row, column = (round(v) for v in extent.key_point)
    assert finding.mask[extent.key_slice, row, column]
    assert _dice(_sphere_mask(volume, GGO), finding.mask) > 0.9


def test_long_axis_is_drawn_where_it_was_measured(
    analysis: AnalysisResult, axial: tuple[SourceVolume, ModelInput]
) -> None:
    """The key slice and end points give a segment as long as the reported diameter."""
    volume, _ = axial
    finding = analysis.findings[NODULE.label_index]
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
    centre_slice = (NODULE.centre_lps[2] - volume.affine_lps[2, 3]) / volume.spacing[0]
    assert abs(axis.slice_index - centre_slice) <= NODULE.radius_mm / volume.spacing[0] / 2


def test_without_anatomy_the_model_mask_is_reported_as_it_is(
    axial: tuple[SourceVolume, ModelInput],
) -> None:
    volume, model_input = axial
    probability = fake_result(model_input, (NODULE,)).segmentation[NODULE.label_index]
    full = to_source_grid(
        probability[None], model_input.affine_ras, volume.affine_lps, volume.shape
    )[0]
    analysis = postprocess(
        fake_result(model_input, (NODULE,)), model_input, volume, CARD, NO_ANATOMY
    )
    assert analysis.lungs is None
    np.testing.assert_array_equal(analysis.findings[NODULE.label_index].mask, full > 0.5)


def test_cropped_and_strided_resampling_equal_a_full_resample(
    axial: tuple[SourceVolume, ModelInput],
) -> None:
    """The crop is exact; a stride repeats each sample over its block (a voxel or so off)."""
    volume, model_input = axial
    probability = fake_result(model_input, (NODULE,)).segmentation[NODULE.label_index]
    full = to_source_grid(
        probability[None], model_input.affine_ras, volume.affine_lps, volume.shape
    )[0]
    resampled = probability_on_source(probability, model_input, volume, 0.5)
    assert resampled is not None
    box, crop = resampled
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = crop > 0.5
    np.testing.assert_array_equal(mask, full > 0.5)
    strided = probability_on_source(probability, model_input, volume, 0.5, stride=(1, 2, 2))
    assert strided is not None
    box, crop = strided
    coarse = np.zeros(volume.shape, dtype=bool)
    coarse[box] = crop > 0.5
    assert _dice(coarse, full > 0.5) > 0.95


def test_oblique_source_grid(tmp_path: Path) -> None:
    volume, model_input = _load(tmp_path, oblique_affine(SHAPE, degrees=20.0, flip_rows=True))
    result = postprocess(fake_result(model_input, (NODULE,)), model_input, volume, CARD)
    (lesion,) = result.findings[NODULE.label_index].lesions
    assert lesion.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    np.testing.assert_allclose(lesion.centroid_lps, NODULE.centre_lps, atol=1.5)
    assert lesion.laterality == "right"


def test_probability_equal_to_threshold_is_present(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,), present_probability=0.5)
    analysis = postprocess(result, model_input, volume, CARD)
    assert analysis.findings[NODULE.label_index].present


def test_present_without_segmentation_has_no_mask(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,))
    result = dataclasses.replace(result, segmentation=np.zeros_like(result.segmentation))
    analysis = postprocess(result, model_input, volume, CARD)
    finding = analysis.findings[NODULE.label_index]
    assert finding.present and finding.mask is None and finding.lesions == ()
    # The model's sentence about it goes: the SEG does not show it.
    assert "nodule" not in analysis.report_text.lower()


def test_absent_finding_ignores_its_segmentation(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE,), present_probability=0.2)
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert not finding.present and finding.mask is None


def test_small_components_are_dropped(axial: tuple[SourceVolume, ModelInput]) -> None:
    volume, model_input = axial
    result = fake_result(model_input, (NODULE, GGO))
    options = PostprocessOptions(min_lesion_ml=20.0)
    analysis = postprocess(result, model_input, volume, CARD, options)
    assert analysis.findings[NODULE.label_index].lesions  # 24 mL
    ggo = analysis.findings[GGO.label_index]  # 14 mL
    assert ggo.present and ggo.extent is None and ggo.mask is None


def test_lesions_largest_first_itemised_up_to_the_bound_and_counted(
    axial: tuple[SourceVolume, ModelInput],
) -> None:
    volume, model_input = axial
    small = dataclasses.replace(GGO, label_index=NODULE.label_index)
    result = fake_result(model_input, (NODULE, small))
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert [lesion.lesion_number for lesion in finding.lesions] == [1, 2]
    first, second = finding.lesions
    assert first.volume_ml > second.volume_ml
    assert first.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    assert second.volume_ml == pytest.approx(GGO.volume_ml, rel=0.05)
    assert (first.laterality, second.laterality) == ("right", "left")
    assert finding.mask is not None
    assert int(finding.mask.sum()) == first.voxel_count + second.voxel_count
    bounded = postprocess(
        result, model_input, volume, CARD, PostprocessOptions(max_lesions=1)
    ).findings[NODULE.label_index]
    (only,) = bounded.lesions
    assert only.volume_ml == first.volume_ml and bounded.lesion_count == 2
    # The SEG keeps every lesion; the SR itemises the largest and counts the rest.
    assert bounded.mask is not None and int(bounded.mask.sum()) == int(finding.mask.sum())


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
    theirs); an explicit ``mask_threshold`` overrides every class. Without anatomy, so the
    masks are the model's."""
    volume, model_input = axial
    labels = tuple(
        dataclasses.replace(lc, mask_threshold=0.75) if i == NODULE.label_index else lc
        for i, lc in enumerate(CARD.labels)
    )
    card = dataclasses.replace(CARD, labels=labels)
    assert card.mask_thresholds[NODULE.label_index] == 0.75
    result = fake_result(model_input, (NODULE, GGO))
    tuned = postprocess(result, model_input, volume, card, NO_ANATOMY)
    default = postprocess(result, model_input, volume, CARD, NO_ANATOMY)
    overridden = postprocess(
        result,
        model_input,
        volume,
        card,
        dataclasses.replace(NO_ANATOMY, mask_threshold=0.5),
    )

    def voxels(analysis: AnalysisResult, index: int) -> int:
        mask = analysis.findings[index].mask
        return 0 if mask is None else int(mask.sum())

    # The test head's probability is 0.5 on the sphere's surface and rises inwards.
    assert voxels(tuned, NODULE.label_index) < 0.8 * voxels(default, NODULE.label_index)
    assert voxels(tuned, GGO.label_index) == voxels(default, GGO.label_index)
    assert voxels(overridden, NODULE.label_index) == voxels(default, NODULE.label_index)


# ---------------------------------------------------------------- what is not reported


def _chest(
    tmp: Path, spheres: tuple[Sphere, ...], vessel_x: float | None = None
) -> tuple[SourceVolume, ModelInput]:
    """The test chest with soft-tissue spheres and, optionally, a vessel: a soft-tissue tube
    of 6 mm radius running through every slice at ``(vessel_x, 20)`` mm."""
    affine = axial_affine()
    hu = sphere_phantom(SHAPE, affine, spheres)
    if vessel_x is not None:
        lps = voxel_centres_lps(SHAPE, affine)
        hu[np.hypot(lps[..., 0] - vessel_x, lps[..., 1] - 20.0) <= 6.0] = LESION_HU
    volume = load_series(write_ct_series(hu, affine, tmp, patient_name="T^T", patient_id="T"))
    return volume, preprocess(volume.hu, volume.affine_lps, CARD.config.preprocess)


def test_findings_outside_the_lungs_are_not_reported(tmp_path: Path) -> None:
    """A 'nodule' in the mediastinum and one in the chest wall: nothing of them is left,
    though the model called the finding present; the lung nodule beside them stays."""
    mediastinal = Sphere((0.0, 0.0, 0.0), 8.0, NODULE.label_index)
    wall = Sphere((0.0, -85.0, 10.0), 5.0, NODULE.label_index)
    volume, model_input = _chest(tmp_path, (NODULE, mediastinal, wall))
    analysis = postprocess(
        fake_result(model_input, (NODULE, mediastinal, wall)), model_input, volume, CARD
    )
    finding = analysis.findings[NODULE.label_index]
    (lesion,) = finding.lesions
    assert lesion.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)
    assert finding.removed_ml > 0.5 * (mediastinal.volume_ml + wall.volume_ml)
    assert finding.mask is not None
    assert not finding.mask[_sphere_mask(volume, mediastinal)].any()


def test_a_vessel_is_not_a_nodule(tmp_path: Path) -> None:
    """The model's nodule mask on a tube through every slice (a vessel) is dropped; on a
    sphere of the same tissue it is kept."""
    vessel = Sphere((40.0, 20.0, 0.0), 10.0, NODULE.label_index)  # the mask on the vessel
    volume, model_input = _chest(tmp_path, (NODULE,), vessel_x=40.0)
    result = fake_result(model_input, (NODULE, vessel))
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    (lesion,) = finding.lesions
    assert lesion.laterality == "right"
    assert lesion.volume_ml == pytest.approx(NODULE.volume_ml, rel=0.05)


def test_a_nodule_under_3_mm_is_not_reported(tmp_path: Path) -> None:
    tiny = Sphere((40.0, 10.0, 0.0), 1.0, NODULE.label_index)
    volume, model_input = _chest(tmp_path, (tiny,))
    result = fake_result(model_input, (tiny,))
    # A model mask larger than the lesion: the boundary moves onto the 2 mm of tissue.
    result.segmentation[NODULE.label_index] = fake_result(
        model_input, (dataclasses.replace(tiny, radius_mm=6.0),)
    ).segmentation[NODULE.label_index]
    finding = postprocess(result, model_input, volume, CARD).findings[NODULE.label_index]
    assert finding.present and finding.mask is None and finding.lesions == ()


def test_a_nodule_is_not_reported_again_as_consolidation(
    axial: tuple[SourceVolume, ModelInput],
) -> None:
    volume, model_input = axial
    same = dataclasses.replace(NODULE, label_index=label_index("consolidation"))
    analysis = postprocess(fake_result(model_input, (NODULE, same)), model_input, volume, CARD)
    assert analysis.findings[NODULE.label_index].lesions
    consolidation = analysis.findings[same.label_index]
    assert consolidation.present and consolidation.mask is None


def test_a_pleural_finding_keeps_only_the_pleura(tmp_path: Path) -> None:
    """An effusion at the back of the right lung is kept; the part of its mask that reaches
    into the mediastinum is not."""
    effusion_index = label_index("pleural_effusion")
    effusion = Sphere((-50.0, 70.0, 0.0), 14.0, effusion_index)
    mediastinal = Sphere((0.0, 0.0, 0.0), 6.0, effusion_index)
    volume, model_input = _chest(tmp_path, (effusion, mediastinal))
    analysis = postprocess(
        fake_result(model_input, (effusion, mediastinal)), model_input, volume, CARD
    )
    finding = analysis.findings[effusion_index]
    assert finding.mask is not None
    assert finding.mask[_sphere_mask(volume, effusion)].mean() > 0.9
    assert not finding.mask[_sphere_mask(volume, mediastinal)].any()
    (lesion,) = finding.lesions
    assert lesion.laterality == "right"


def test_a_series_without_lungs_is_not_gated(tmp_path: Path) -> None:
    """A body of water with a sphere (not a chest CT): no lung field, nothing removed."""
    affine = axial_affine()
    lps = voxel_centres_lps(SHAPE, affine)
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[np.hypot(lps[..., 0], lps[..., 1]) < 90.0] = 0
    hu[_sphere_mask_of(SHAPE, affine, NODULE)] = LESION_HU
    volume = load_series(write_ct_series(hu, affine, tmp_path, patient_name="T^T", patient_id="T"))
    model_input = preprocess(volume.hu, volume.affine_lps, CARD.config.preprocess)
    analysis = postprocess(fake_result(model_input, (NODULE,)), model_input, volume, CARD)
    assert analysis.lungs is not None and not analysis.lungs.found
    (lesion,) = analysis.findings[NODULE.label_index].lesions
    assert lesion.lobe == 0 and lesion.laterality == "right"


def _sphere_mask_of(
    shape: tuple[int, int, int], affine: npt.NDArray[np.float64], sphere: Sphere
) -> npt.NDArray[np.bool_]:
    lps = voxel_centres_lps(shape, affine)
    return np.asarray(
        np.linalg.norm(lps - np.array(sphere.centre_lps), axis=-1) <= sphere.radius_mm
    )
