"""The node's settings: ``config.yaml`` validated into one immutable :class:`Settings`.

Every section is a frozen pydantic model that forbids unknown keys, so a typo fails at
start-up instead of being ignored. :func:`load_settings` reports a bad key with its dotted
name and the line of the YAML file it is on (or the environment variable that set it).

Environment variables ``UNICT_<SECTION>__<KEY>`` (``__`` between levels, e.g.
``UNICT_DATABASE__URL``, ``UNICT_DICOM__TLS__ENABLED``) override the file; their values are
read as YAML scalars or flow collections (``true``, ``5``, ``[A, B]``).

Relative paths (spool, SQLite file, checkpoint and plan folders, TLS files) are resolved
against the folder of the configuration file, not the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from service.errors import ConfigError
from service.settings import (
    DESTINATION_TAGS,
    AETitle,
    AssemblySettings,
    DatabaseSettings,
    Destination,
    DicomSettings,
    DicomwebDestination,
    DicomwebSettings,
    EngineName,
    HttpSettings,
    LoggingSettings,
    ModelSettings,
    OutputDestination,
    OutputsSettings,
    Port,
    QueryPeer,
    QueueSettings,
    RetentionSettings,
    ScOutputSettings,
    SegOutputSettings,
    SelectionSettings,
    SenderSettings,
    SettingError,
    Settings,
    SrOutputSettings,
    StorageSettings,
    TlsSettings,
    WorkersSettings,
    is_loopback,
    is_placeholder_secret,
)

__all__ = [
    "ENV_PREFIX",
    "ENV_SEPARATOR",
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
    "load_settings",
]

ENV_PREFIX = "UNICT_"
ENV_SEPARATOR = "__"


class _Located:
    """The composed YAML tree, to find the line of a dotted key."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def exists(self, loc: tuple[str | int, ...]) -> bool:
        """Whether the file itself has the key at `loc`."""
        node = self.root
        for step in loc:
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == str(step)), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
                node = node.value[step] if 0 <= step < len(node.value) else None
            else:
                return False
            if node is None:
                return False
        return True

    def node(self, loc: tuple[str | int, ...]) -> yaml.Node | None:
        """Return the deepest node along `loc` (the key's node for the last step)."""
        node = self.root
        found = node
        for step in loc:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if isinstance(key, yaml.ScalarNode) and key.value == str(step):
                        # Point at the key itself when it is the last step (extra or bad key).
                        found = key if step == loc[-1] else value
                        node = value
                        break
                else:
                    return found
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
                if 0 <= step < len(node.value):
                    node = node.value[step]
                    found = node
                else:
                    return found
            else:
                return found
        return found


def _check_duplicate_keys(node: yaml.Node | None, source: str, path: str = "") -> None:
    # PyYAML keeps the last of two equal keys silently; an operator who wrote one twice
    # meant something else.
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            dotted = f"{path}.{name}" if path else name
            if name in seen:
                raise ConfigError(
                    f"{source}:{key.start_mark.line + 1}: {dotted}: duplicate key "
                    f"(first at line {seen[name]})"
                )
            seen[name] = key.start_mark.line + 1
            _check_duplicate_keys(value, source, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, source, f"{path}[{i}]")


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for step in loc:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply ``UNICT_SECTION__KEY`` overrides to `data`; return which paths came from where."""
    applied: dict[tuple[str, ...], str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue  # e.g. UNICT_TEST_POSTGRES_URL is not a settings override
        path = tuple(p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_SEPARATOR))
        if any(not p for p in path):
            raise ConfigError(f"environment variable {name}: empty key between '__'")
        raw = env[name]
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {name}: not a YAML value: {exc}") from exc
        target = data
        for depth, step in enumerate(path[:-1]):
            child = target.get(step)
            if child is None:
                child = target[step] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"environment variable {name}: {'.'.join(path[: depth + 1])} is not a section"
                )
            target = child
        target[path[-1]] = value
        applied[path] = name
    return applied


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path)


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    url = make_url(settings.database.url)
    database = settings.database
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db_file = _resolve(Path(url.database), base)
        database = database.model_copy(
            update={"url": url.set(database=str(db_file)).render_as_string(hide_password=False)}
        )
    def resolved_tls(tls: TlsSettings) -> TlsSettings:
        return tls.model_copy(
            update={
                "cert_file": _resolve(tls.cert_file, base),
                "key_file": _resolve(tls.key_file, base),
                "ca_file": _resolve(tls.ca_file, base),
            }
        )

    tls = resolved_tls(settings.dicom.tls)
    http = settings.http.model_copy(update={"tls": resolved_tls(settings.http.tls)})
    model = settings.model.model_copy(
        update={
            "checkpoint_dir": _resolve(settings.model.checkpoint_dir, base),
            "plan_dir": _resolve(settings.model.plan_dir, base),
        }
    )
    storage = settings.storage.model_copy(
        update={
            "spool_dir": _resolve(settings.storage.spool_dir, base),
            "results_dir": _resolve(settings.storage.results_dir, base),
        }
    )
    return settings.model_copy(
        update={
            "database": database,
            "dicom": settings.dicom.model_copy(update={"tls": tls}),
            "http": http,
            "model": model,
            "storage": storage,
        }
    )


def load_settings(path: Path, env: Mapping[str, str] = os.environ) -> Settings:
    """Read, override and validate the node's settings.

    Parameters
    ----------
    path
        The YAML configuration file. Relative paths inside it are resolved against its folder.
    env
        Environment; ``UNICT_<SECTION>__<KEY>`` variables override the file.

    Returns
    -------
    Settings
        The immutable, validated settings.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or a key is unknown or invalid; the message names
        the dotted key and the file's line (or the environment variable).
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the configuration: {exc.strerror}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}:1: the configuration must be a mapping of sections")
    _check_duplicate_keys(root, source)
    from_env = _apply_env(data, env)
    located = _Located(root)

    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            if loc[:1] == ("destinations",) and len(loc) > 2 and loc[2] in DESTINATION_TAGS:
                loc = loc[:2] + loc[3:]  # the union's tag is not a key of the file
            message = error["msg"]
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, SettingError):
                # A section's validator about one of its keys: that key's line and name.
                loc = (*loc, cause.key)
                message = str(cause).removeprefix(f"{cause.key}: ")
            env_name = next((name for p, name in from_env.items() if loc[: len(p)] == p), None)
            if env_name is None and not located.exists(loc):
                # e.g. an unknown section that only an environment variable introduced
                env_name = next(
                    (name for p, name in from_env.items() if p[: len(loc)] == loc), None
                )
            if env_name is not None:
                where = f"environment variable {env_name}"
            else:
                node = located.node(loc)
                line = node.start_mark.line + 1 if node is not None else 1
                where = f"{source}:{line}"
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            lines.append(f"{where}: {_dotted(loc) or '<root>'}: {message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    return _resolve_paths(settings, path.resolve().parent)
