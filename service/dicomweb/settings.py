"""Settings of the DICOMweb side: the ``dicomweb`` section (STOW-RS receiver) and the
``type: dicomweb`` destinations (STOW-RS sender).

Secrets are never in the file: a client's bearer token and a destination's token or
password are read from the environment variable the file names (``token_env``), so the
configuration can be checked in and the secrets come from the deployment (a Kubernetes
Secret, a Docker secret exported as a variable).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DicomwebClient",
    "DicomwebDestination",
    "DicomwebSettings",
    "secret_from_env",
]

# A client's name is recorded as the series' "calling AE" (16 characters at most), so it
# follows the AE title rules: printable ASCII, no backslash.
_CLIENT_NAME = re.compile(r"^[\x21-\x5b\x5d-\x7e][\x20-\x5b\x5d-\x7e]{0,15}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def secret_from_env(name: str, env: Mapping[str, str] = os.environ) -> str | None:
    """The value of the environment variable `name`, ``None`` when unset or blank."""
    value = env.get(name, "").strip()
    return value or None


def _env_name(value: str | None) -> str | None:
    if value is not None and not _ENV_NAME.match(value):
        raise ValueError(f"{value!r} is not an environment variable name")
    return value


class DicomwebClient(_Section):
    """A STOW-RS sender allowed to store instances (the DICOMweb allow-list).

    A request is accepted from the client whose bearer token it carries (the value of
    the environment variable ``token_env``), or, over HTTPS with client certificates
    (``http.tls``), whose certificate's subject CN is ``cert_cn``.
    """

    name: str
    """Recorded as the series' calling AE (at most 16 characters, printable ASCII)."""
    token_env: str | None = None
    cert_cn: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _CLIENT_NAME.match(value):
            raise ValueError(
                f"{value!r}: a client name is 1-16 printable ASCII characters, no backslash"
            )
        return value.strip()

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: str | None) -> str | None:
        return _env_name(value)

    @model_validator(mode="after")
    def _some_credential(self) -> DicomwebClient:
        if self.token_env is None and self.cert_cn is None:
            raise ValueError(f"client {self.name}: give token_env or cert_cn")
        return self


class DicomwebSettings(_Section):
    """The STOW-RS receiver (``POST /studies``, ``POST /studies/{study}``)."""

    enabled: bool = False
    clients: tuple[DicomwebClient, ...] = ()
    max_request_mb: int = Field(default=2048, ge=1)
    """A request body over this is refused with 413 (before reading it when its
    Content-Length says so; at that byte otherwise)."""

    @model_validator(mode="after")
    def _clients_when_enabled(self) -> DicomwebSettings:
        if self.enabled and not self.clients:
            raise ValueError("dicomweb.enabled needs at least one entry in dicomweb.clients")
        names = [c.name for c in self.clients]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"client names must be unique: {', '.join(duplicated)}")
        return self


class DicomwebDestination(_Section):
    """A STOW-RS destination for the outputs: ``POST {url}/studies``.

    Credentials come from the environment: a bearer token (``token_env``), or HTTP basic
    authentication (``username`` and the password in ``password_env``); optionally a
    client certificate (``cert_file``, ``key_file``) and a CA bundle for the server.
    """

    type: Literal["dicomweb"]
    name: str = Field(min_length=1)
    url: str
    """The DICOMweb root, e.g. ``https://pacs.example.org/dicom-web``."""
    token_env: str | None = None
    username: str | None = None
    password_env: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    max_instances_per_request: int = Field(default=50, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("token_env", "password_env")
    @classmethod
    def _envs(cls, value: str | None) -> str | None:
        return _env_name(value)

    @model_validator(mode="after")
    def _credentials(self) -> DicomwebDestination:
        if self.token_env is not None and self.username is not None:
            raise ValueError(f"destination {self.name}: token_env or username, not both")
        if (self.username is None) != (self.password_env is None):
            raise ValueError(f"destination {self.name}: username needs password_env")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError(f"destination {self.name}: cert_file needs key_file")
        return self

    @property
    def address(self) -> str:
        """Where it is, for job records and logs."""
        return f"{self.url}/studies"
