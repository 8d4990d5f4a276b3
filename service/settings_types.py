"""What the settings' sections share: the section base, the AE title and port types, the
error a validator raises about one key, and the secret and loopback checks."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Secrets that are obviously not secret: refused wherever the HTTP API is reachable from
# another machine.
_PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change_me", "change-me", "secret", "password", "token", "xxx", "todo"}
)

# PS3.5 §6.2: an AE title is 1-16 characters of the default repertoire, no backslash or
# control characters, and not only spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

Port = Annotated[int, Field(ge=0, le=65535)]


class SettingError(ValueError):
    """A validator's error about one key of its section (so the loader names that key's line).

    Parameters
    ----------
    key
        The key, relative to the section whose validator raises it.
    message
        What is wrong.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def is_placeholder_secret(value: str) -> bool:
    """Return whether `value` is empty or a well-known placeholder such as ``changeme``."""
    return value.strip().lower() in _PLACEHOLDER_SECRETS


def is_loopback(host: str) -> bool:
    """Return whether `host` (an address or ``localhost``) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return value.strip()


AETitle = Annotated[str, AfterValidator(_check_ae_title)]
"""An AE title (PS3.5 §6.2), leading and trailing spaces removed; checked wherever used."""


class Section(BaseModel):
    """A section of the settings: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
