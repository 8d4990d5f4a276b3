"""Key images with the overlay burned in: Secondary Capture (PS3.3 A.8.1) for viewers without SEG.

Many PACS viewers show neither SEG nor TID 1500 SR (OHIF 3.13 shows the SEG but not our
SR). For them the node can add a small series of Secondary Capture images: for each
present finding with a mask, the source slice where its mask is largest (slices shared by
several findings are written once), in a lung window, each finding of that slice blended
in its model-card colour with its outline, and the list of every present finding with
its probability, the report text, and the research-use statement drawn on the image.

The images carry no patient identifier in their pixels (Burned In Annotation ``NO``:
PS3.3 C.7.6.1.1.1 asks whether the pixels identify the patient; the burned-in text is
the findings). Each references its CT slice (Source Image Sequence), so a viewer can go
from the key image to the slice. Small source images are enlarged by an integer factor
(nearest neighbour) so that the text stays legible.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import DA, TM

from model.card import ModelCard
from service.findings import AnalysisResult, FindingResult
from service.outputs.charset import output_character_set
from service.outputs.identity import contributing_equipment
from service.outputs.seg import segmented_findings
from service.preview import LUNG_WINDOW
from service.volume import SourceVolume

logger = logging.getLogger(__name__)

#: Key images are at least this many pixels wide (integer enlargement of the source).
MIN_WIDTH = 512
#: Opacity of the burned-in masks.
ALPHA = 0.4
#: Purpose of Reference of the Source Image Sequence (CID 7202).
SOURCE_IMAGE_PURPOSE = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
_LPS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


@dataclass(frozen=True)
class KeySlice:
    """One key image to write: a source slice and the findings drawn on it."""

    index: int
    findings: tuple[FindingResult, ...]


def key_slices(analysis: AnalysisResult, max_images: int) -> tuple[KeySlice, ...]:
    """For each segmented finding the slice of its largest mask area, once, in slice order.

    Parameters
    ----------
    analysis
        Findings with masks on the source grid.
    max_images
        At most this many slices (the findings with the largest masks win).
    """
    findings = sorted(
        segmented_findings(analysis),
        key=lambda f: -int(f.mask.sum()) if f.mask is not None else 0,
    )
    chosen: list[int] = []
    for finding in findings:
        assert finding.mask is not None
        index = int(finding.mask.sum(axis=(1, 2)).argmax())
        if index not in chosen:
            chosen.append(index)
        if len(chosen) >= max_images:
            break
    slices = []
    for index in sorted(chosen):
        on_slice = tuple(
            f for f in segmented_findings(analysis) if f.mask is not None and f.mask[index].any()
        )
        slices.append(KeySlice(index, on_slice))
    return tuple(slices)


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The mask's boundary pixels (in the mask, with a 4-neighbour outside it)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def render_key_image(
    volume: SourceVolume, analysis: AnalysisResult, key: KeySlice, card: ModelCard
) -> npt.NDArray[np.uint8]:
    """The ``(rows, columns, 3)`` RGB key image of one slice, enlarged, with text."""
    lo, hi = LUNG_WINDOW
    grey = np.clip((volume.hu[key.index] - lo) / (hi - lo), 0.0, 1.0) * 255.0
    factor = max(1, math.ceil(MIN_WIDTH / grey.shape[1]))
    grey = np.kron(grey, np.ones((factor, factor)))
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for finding in key.findings:
        assert finding.mask is not None
        mask = np.kron(finding.mask[key.index], np.ones((factor, factor), dtype=bool))
        colour = np.array(finding.abnormality.color_rgb, dtype=np.float64)
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colour
        rgb[_outline(mask)] = colour
    image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    size = max(12, image.width // 40)
    font = ImageFont.load_default(size=size)
    line = size + 4
    y = 6
    for finding in analysis.present:
        on_slice = finding in key.findings
        draw.rectangle((6, y + 2, 6 + size - 4, y + size - 2), fill=finding.abnormality.color_rgb)
        text = f"{finding.abnormality.name}  p={finding.probability:.2f}"
        if finding.mask is None or not finding.mask.any():
            text += "  (no region segmented)"
        elif not on_slice:
            text += "  (not on this slice)"
        draw.text((10 + size, y), text, fill=(255, 255, 255), font=font)
        y += line
    if not analysis.present:
        draw.text((6, y), "No abnormality found", fill=(255, 255, 255), font=font)
        y += line
    width_chars = max(20, int(image.width / (size * 0.6)))
    footer = textwrap.wrap(analysis.report_text.strip(), width_chars)
    if len(footer) > 4:  # the full text is in the SR; say that this is cut
        footer = [*footer[:3], footer[3][: width_chars - 3] + "..."]
    footer += textwrap.wrap(
        f"slice {key.index + 1}/{volume.hu.shape[0]}  {card.name} {card.version}  "
        f"{card.clinical_use}",
        width_chars,
    )[:3]
    y = image.height - 6 - line * len(footer)
    for text in footer:
        draw.text((6, y), text, fill=(255, 255, 0), font=font)
        y += line
    return np.asarray(image, dtype=np.uint8)


def _patient_orientation(dataset: Dataset) -> tuple[str, str]:
    """Patient Orientation (PS3.3 C.7.6.1.1.1) of the rows and columns of an axial slice."""
    cosines = [float(v) for v in dataset.ImageOrientationPatient]
    letters = []
    for direction in (cosines[:3], cosines[3:]):
        axis = int(np.argmax(np.abs(direction)))
        letters.append(_LPS_LETTERS[axis][0 if direction[axis] > 0 else 1])
    return letters[0], letters[1]


def _source_image(dataset: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = dataset.SOPClassUID
    item.ReferencedSOPInstanceUID = dataset.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = DicomSequence([SOURCE_IMAGE_PURPOSE])
    return item


def build_key_images(
    volume: SourceVolume,
    analysis: AnalysisResult,
    card: ModelCard,
    *,
    series_number: int,
    series_description: str,
    max_images: int = 5,
    series_instance_uid: str | None = None,
    sop_instance_uids: Sequence[str] | None = None,
) -> list[hd.sc.SCImage]:
    """Build the key-image Secondary Capture series of an analysis.

    Parameters
    ----------
    volume
        The source series (patient, study, and the slices drawn).
    analysis
        Findings with masks, probabilities and the report text.
    card
        Colours, names and the research-use statement.
    series_number, series_description
        Of the new SC series.
    max_images
        At most this many key images.
    series_instance_uid, sop_instance_uids
        UIDs to use (``sop_instance_uids`` needs at least ``max_images`` entries, taken in
        order); new ones when ``None``.

    Returns
    -------
    list[highdicom.sc.SCImage]
        One image per key slice; empty when no present finding has a mask.

    Raises
    ------
    ValueError
        If ``max_images`` is below 1 or fewer SOP Instance UIDs than images are given.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    keys = key_slices(analysis, max_images)
    if sop_instance_uids is not None and len(sop_instance_uids) < len(keys):
        raise ValueError(f"{len(keys)} key images need as many SOP Instance UIDs")
    series_uid = series_instance_uid or hd.UID()
    now = dt.datetime.now()
    images: list[hd.sc.SCImage] = []
    for number, key in enumerate(keys, start=1):
        source = volume.datasets[key.index]
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=render_key_image(volume, analysis, key, card),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=(
                sop_instance_uids[number - 1] if sop_instance_uids is not None else hd.UID()
            ),
            instance_number=number,
            manufacturer=card.manufacturer,
            patient_orientation=_patient_orientation(source),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            contributing_equipment=[
                contributing_equipment(card, "Key images with the findings burned in")
            ],
        )
        charset = output_character_set(source)
        if charset is not None:
            image.SpecificCharacterSet = charset
        image.SeriesDescription = series_description
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.ContentDate = image.SeriesDate = DA(now.date())
        image.ContentTime = image.SeriesTime = TM(now.time().replace(microsecond=0))
        image.BurnedInAnnotation = "NO"
        # General Series Laterality is Type 2C (paired body parts); the chest is not one,
        # but dciodvfy asks for the element whenever no Image Laterality is sent: empty.
        image.Laterality = source.get("Laterality", "")
        image.DerivationDescription = (
            f"{card.name} {card.version} findings burned in on source slice {key.index + 1}"
        )[:1024]
        image.ImageComments = ", ".join(f.abnormality.name for f in key.findings)[:10240]
        image.SourceImageSequence = DicomSequence([_source_image(source)])
        images.append(image)
    logger.info("built %d key image(s) for series %s", len(images), volume.series_instance_uid)
    return images
