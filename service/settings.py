"""The node's settings, section by section: frozen pydantic models that forbid unknown keys.

:func:`service.config.load_settings` reads ``config.yaml`` and the environment into one
:class:`Settings`; a typo fails at start-up instead of being ignored, and a bad value is
reported with its dotted key and the file's line. Types that several sections share
(:data:`AETitle`, :data:`Port`) carry their own check, so it holds wherever they are used.
"""

from __future__ import annotations

import ipaddress
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url

from service.dicomweb.settings import DicomwebDestination, DicomwebSettings
from service.errors import ConfigError
from service.output_settings import (
    OutputsSettings,
    ScOutputSettings,
    SegOutputSettings,
    SrOutputSettings,
)
from service.settings_types import (
    AETitle,
    Port,
    Section,
    SettingError,
    is_loopback,
    is_placeholder_secret,
)

__all__ = [
    "DESTINATION_TAGS",
    "AETitle",
    "AssemblySettings",
    "DatabaseSettings",
    "Destination",
    "DicomSettings",
    "DicomwebDestination",
    "DicomwebSettings",
    "EngineName",
    "HttpSettings",
    "LoggingSettings",
    "ModelSettings",
    "OutputDestination",
    "OutputsSettings",
    "Port",
    "QueryPeer",
    "QueueSettings",
    "RetentionSettings",
    "ScOutputSettings",
    "SegOutputSettings",
    "SelectionSettings",
    "SenderSettings",
    "SettingError",
    "Settings",
    "SrOutputSettings",
    "StorageSettings",
    "TlsSettings",
    "WorkersSettings",
    "is_loopback",
    "is_placeholder_secret",
]

_Section = Section


class TlsSettings(_Section):
    """TLS of a listener: DICOM TLS (``dicom.tls``, PS3.15 Annex B, the Basic TLS Secure
    Transport profile) or HTTPS (``http.tls``)."""

    enabled: bool = False
    cert_file: Path | None = Field(default=None, validate_default=True)
    key_file: Path | None = Field(default=None, validate_default=True)
    ca_file: Path | None = Field(default=None, validate_default=True)
    require_client_cert: bool = False

    @field_validator("cert_file", "key_file")
    @classmethod
    def _needed_when_enabled(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None and info.data.get("enabled"):
            raise ValueError("required when tls.enabled is true")
        return value

    @field_validator("require_client_cert")
    @classmethod
    def _ca_for_clients(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("ca_file") is None:
            raise ValueError("require_client_cert needs tls.ca_file to verify clients against")
        return value


class DicomSettings(_Section):
    """The DICOM listener (Storage SCP)."""

    ae_title: AETitle = "UNICT"
    port: Port = 11112
    bind_address: str = "127.0.0.1"
    allow_any_caller: bool = False
    allowed_callers: tuple[AETitle, ...] = Field(default=(), validate_default=True)
    allowed_hosts: tuple[str, ...] | None = None
    max_associations: int = Field(default=10, ge=1)
    max_pdu: int = Field(default=65536, ge=0)
    acse_timeout_s: float = Field(default=10.0, gt=0)
    """How long a connection may go without an association request (or release reply):
    the ARTIM timer (PS3.8 §9.1.5); also the TLS handshake's limit."""
    network_timeout_s: float = Field(default=60.0, gt=0)
    """An established association with no PDU for this long is aborted."""
    listener_processes: int = Field(default=1, ge=1, le=64)
    """Processes serving associations: the node's process accepts each connection and
    passes it to the least busy one, so that concurrent senders use more than one core
    (:mod:`service.listener_process`); ``max_associations`` counts over all of them."""
    tls: TlsSettings = TlsSettings()

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not value and not info.data.get("allow_any_caller"):
            raise ValueError("list the calling AE titles to accept (or set allow_any_caller: true)")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError as exc:
                raise ValueError(f"{host!r} is not an IP address or network") from exc
        return value


class QueryPeer(_Section):
    """Where to send a C-FIND to ask a sender how many instances a series has."""

    host: str
    port: Port
    ae_title: AETitle | None = None
    """The peer's AE title; defaults to the calling AE title the series came from."""


class AssemblySettings(_Section):
    """When a series counts as complete."""

    quiet_period_s: float = Field(default=10.0, gt=0)
    poll_interval_s: float = Field(default=1.0, gt=0)
    query_sender_for_count: bool = False
    query_timeout_s: float = Field(default=10.0, gt=0)
    sender_query: dict[str, QueryPeer] = Field(default_factory=dict)


class SelectionSettings(_Section):
    """Declarative rules a series must pass to be analysed."""

    modalities: tuple[str, ...] = ("CT",)
    exclude_image_types: tuple[str, ...] = ("LOCALIZER",)
    max_obliquity_deg: float = Field(default=10.0, ge=0, le=90)
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)
    min_slices: int = Field(default=40, ge=1)
    series_description_exclude: tuple[str, ...] = ()
    series_description_include: tuple[str, ...] = ()

    @field_validator("slice_thickness_mm")
    @classmethod
    def _range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"need 0 < min <= max, got [{low}, {high}]")
        return value

    @field_validator("series_description_exclude", "series_description_include")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return value


class Destination(_Section):
    """A C-STORE destination for the outputs (usually the PACS that sent the series)."""

    type: Literal["dicom"] = "dicom"
    name: str = Field(min_length=1)
    ae_title: AETitle
    host: str
    port: Port

    @property
    def address(self) -> str:
        """Where it is, for job records and logs."""
        return f"{self.ae_title}@{self.host}:{self.port}"


def _destination_type(value: Any) -> str:
    kind = value.get("type", "dicom") if isinstance(value, dict) else getattr(value, "type", None)
    return str(kind or "dicom")


#: The union's tags, which are not keys of the file (dropped from error locations).
DESTINATION_TAGS = frozenset({"dicom", "dicomweb"})

OutputDestination = Annotated[
    Annotated[Destination, Tag("dicom")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(_destination_type),
]
"""A destination: ``type: dicom`` (C-STORE, the default) or ``type: dicomweb`` (STOW-RS)."""


class SenderSettings(_Section):
    """C-STORE SCU retries and timeouts."""

    max_attempts: int = Field(default=3, ge=1)
    backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)
    timeout_s: float = Field(default=30.0, gt=0)


class StorageSettings(_Section):
    """Where received instances are spooled."""

    spool_dir: Path = Path("var/spool")
    min_free_mb: int = Field(default=1024, ge=0)
    results_dir: Path = Path("var/results")
    """Per-job previews (PNG overlay) for admins and the demo."""


class RetentionSettings(_Section):
    """When received instances leave the spool (never before every job using them ended).

    A study's files are removed once every job of the study has ended (``DONE``,
    ``REJECTED`` or ``FAILED``) and the last of them ended ``keep_done_hours`` ago
    (``keep_failed_hours`` if one of them FAILED, so an admin can still retry it). Below
    ``emergency_free_mb`` of free spool space the ended studies go at once, oldest first,
    whatever their age. A file that a job not yet ended refers to is never removed.
    """

    enabled: bool = True
    keep_done_hours: float = Field(default=24.0, ge=0)
    keep_failed_hours: float = Field(default=168.0, ge=0)
    emergency_free_mb: int = Field(default=2048, ge=0)
    interval_s: float = Field(default=300.0, gt=0)
    partial_max_age_s: float = Field(default=3600.0, gt=0)
    """Temporary ``.part`` files older than this are left over from a crash mid-write."""


class DatabaseSettings(_Section):
    """The job store."""

    url: str = "sqlite:///var/unict.db"
    migrate_on_start: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except Exception as exc:  # sqlalchemy raises ArgumentError, but be sure to name the key
            raise ValueError(f"not a database URL: {exc}") from exc
        if url.get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        return value


class HttpSettings(_Section):
    """The admin/health HTTP API."""

    host: str = "127.0.0.1"
    port: Port = 8080
    token: SecretStr = Field(default=SecretStr(""), validate_default=True)
    tls: TlsSettings = TlsSettings()
    """HTTPS; with ``ca_file`` client certificates are verified (STOW-RS ``cert_cn``)."""

    @field_validator("token")
    @classmethod
    def _token(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        host = info.data.get("host")
        if (
            host is not None
            and not is_loopback(host)
            and is_placeholder_secret(value.get_secret_value())
        ):
            raise ValueError(f"a real token is required when http.host ({host}) is not loopback")
        return value

    @property
    def token_required(self) -> bool:
        """Whether the job endpoints ask for the bearer token.

        Always off loopback; on loopback only when a real (non-placeholder) token is set.
        """
        return not is_loopback(self.host) or not is_placeholder_secret(
            self.token.get_secret_value()
        )


EngineName = Literal["tensorrt", "onnxruntime", "pytorch", "triton"]


class ModelSettings(_Section):
    """The model and the inference engines."""

    checkpoint_dir: Path | None = None
    engines: tuple[EngineName, ...] = Field(
        default=("tensorrt", "onnxruntime", "pytorch"), min_length=1
    )
    plan_dir: Path = Path("var/plans")
    threads: int | None = Field(default=None, ge=1)

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint folder: the configured one, or the bundled ``model/checkpoints/small``."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        spec = find_spec("model")  # locates the package without importing it (and torch)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "model.checkpoint_dir: null, and the bundled model package is missing"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "checkpoints" / "small"


class WorkersSettings(_Section):
    """In-process worker threads."""

    count: int = Field(default=1, ge=1)
    lease_s: float = Field(default=120.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=30.0, ge=0)
    max_retry_backoff_s: float = Field(default=3600.0, ge=0)
    poll_interval_s: float = Field(default=1.0, gt=0)
    memory_limit_mb: int | None = Field(default=6144, ge=256)
    """A series whose analysis would take the process over this is refused (FAILED at
    load, naming this key) before it is loaded; ``null`` for no bound."""


class QueueSettings(_Section):
    """How queued jobs reach workers.

    ``embedded``: in-process worker threads poll the job store (one node). ``procrastinate``:
    a series completion also defers a procrastinate job in the same transaction, and
    ``unict-node worker`` processes on any machine run it; ``serve`` then only receives.
    """

    backend: Literal["embedded", "procrastinate"] = "embedded"
    name: str = Field(default="unict", min_length=1, max_length=60)
    """The procrastinate queue the node defers to and its workers listen on."""
    heartbeat_s: float = Field(default=10.0, gt=0)
    """How often a worker process tells PostgreSQL it is alive."""
    stalled_after_s: float = Field(default=30.0, gt=0)
    """A worker silent this long is presumed lost; its procrastinate jobs are retried."""
    maintenance_interval_s: float = Field(default=5.0, gt=0)
    """How often a worker process retries stalled jobs and takes back expired leases."""

    @model_validator(mode="after")
    def _heartbeat_shorter(self) -> QueueSettings:
        if self.stalled_after_s <= self.heartbeat_s:
            raise ValueError("stalled_after_s must be longer than heartbeat_s")
        return self


class LoggingSettings(_Section):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    json_lines: bool = Field(default=False, alias="json")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(_Section):
    """All of the node's settings, validated once at start-up."""

    dicom: DicomSettings
    assembly: AssemblySettings = AssemblySettings()
    selection: SelectionSettings = SelectionSettings()
    destinations: tuple[OutputDestination, ...] = ()
    sender: SenderSettings = SenderSettings()
    storage: StorageSettings = StorageSettings()
    retention: RetentionSettings = RetentionSettings()
    database: DatabaseSettings = DatabaseSettings()
    http: HttpSettings = HttpSettings()
    dicomweb: DicomwebSettings = DicomwebSettings()
    model: ModelSettings = ModelSettings()
    outputs: OutputsSettings = OutputsSettings()
    workers: WorkersSettings = WorkersSettings()
    queue: QueueSettings = QueueSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _queue_needs_postgres(self) -> Settings:
        if (
            self.queue.backend == "procrastinate"
            and make_url(self.database.url).get_backend_name() != "postgresql"
        ):
            raise ValueError(
                "queue.backend: procrastinate needs a postgresql+psycopg:// database.url"
            )
        return self

    @field_validator("destinations")
    @classmethod
    def _unique_names(
        cls, value: tuple[Destination | DicomwebDestination, ...]
    ) -> tuple[Destination | DicomwebDestination, ...]:
        names = [d.name for d in value]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"destination names must be unique: {', '.join(duplicated)}")
        return value
