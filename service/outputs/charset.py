"""The Specific Character Set of the outputs, from the source series' (PS3.3 C.12.1.1.2).

The SEG and SR copy the patient and study attributes of the source, so they must be written
in a character set that can hold them. A source with code extensions usually leaves value 1
empty (``\\ISO 2022 IR 87``: the default repertoire, then Japanese kanji), which the
standard reads as ``ISO 2022 IR 6`` but highdicom refuses; that empty value is spelt out
here. A value highdicom does not accept at all falls back to UTF-8 (``ISO_IR 192``), which
encodes every name pydicom could decode.
"""

from __future__ import annotations

import logging

import highdicom as hd
from highdicom.valuerep import _check_specific_character_set
from pydicom.dataset import Dataset

__all__ = ["UTF8", "output_character_set"]

logger = logging.getLogger(__name__)

UTF8 = "ISO_IR 192"
_DEFAULT_REPERTOIRE = hd.enum.SpecificCharacterSetValues.DEFAULT_REPERTOIRE_CODE_EXTENSIONS.value


def output_character_set(source: Dataset) -> str | list[str] | None:
    """Specific Character Set for an object derived from `source` (``None``: the default)."""
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    values = [str(v).strip() for v in value] if not isinstance(value, str) else [value.strip()]
    if len(values) > 1 and values[0] == "":
        values[0] = _DEFAULT_REPERTOIRE
    candidate: str | list[str] = values[0] if len(values) == 1 else values
    try:
        _check_specific_character_set(candidate)
    except ValueError:
        logger.warning("source SpecificCharacterSet %r not usable; outputs in UTF-8", values)
        return UTF8
    return candidate
