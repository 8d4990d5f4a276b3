"""What a DICOM UID looks like: digits and dots, at most 64 characters (PS3.5 §9.1).

A UID becomes a spool path component and a query filter, so anything else is refused
outright; the HTTP API's documented pattern is this one.
"""

from __future__ import annotations

import re

__all__ = ["UID_MAX_LENGTH", "UID_PATTERN", "is_uid"]

UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
UID_MAX_LENGTH = 64

_UID = re.compile(UID_PATTERN)


def is_uid(value: str) -> bool:
    """Whether `value` is a well-formed UID."""
    return len(value) <= UID_MAX_LENGTH and _UID.match(value) is not None
