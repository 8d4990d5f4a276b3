"""output_character_set: the source's Specific Character Set, in a form highdicom writes."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from service.outputs.charset import UTF8, output_character_set


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (None, None),
        ("ISO_IR 100", "ISO_IR 100"),
        ("ISO_IR 192", "ISO_IR 192"),
        (["", "ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
        (["ISO 2022 IR 13", "ISO 2022 IR 87"], ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        ("NOT_A_CHARSET", UTF8),
        (["ISO 2022 IR 87", "ISO 2022 IR 6"], UTF8),  # multi-byte first: not allowed
    ],
)
def test_output_character_set(source: str | list[str] | None, expected: object) -> None:
    ds = Dataset()
    if source is not None:
        ds.SpecificCharacterSet = source
    assert output_character_set(ds) == expected
