"""Logging set-up: plain text or JSON lines, with job and series context fields.

Code logs through ``logger = logging.getLogger(__name__)`` and passes context with
``extra={"job_id": ..., "series_uid": ..., "stage": ...}``. Log job ids and UIDs only:
never a patient's name, ID or birth date.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from service.config import LoggingSettings

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "PlainFormatter", "setup_logging"]

CONTEXT_FIELDS = ("job_id", "series_uid", "study_uid", "sop_uid", "stage", "worker")
"""``extra`` keys copied into every formatted record that has them."""


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in CONTEXT_FIELDS if getattr(record, k, None) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, context, ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "thread": record.threadName,
        }
        out.update(_context(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    """``time level logger: message [job_id=.. series_uid=..]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = _context(record)
        if context:
            first, nl, rest = text.partition("\n")
            tags = " ".join(f"{k}={v}" for k, v in context.items())
            text = f"{first} [{tags}]{nl}{rest}"
        return text


def setup_logging(settings: LoggingSettings, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger once for the node.

    pynetdicom is held at WARNING (INFO when the level is DEBUG): at INFO it logs every
    association, and at DEBUG it dumps datasets and query identifiers, which hold patient
    data, so it never goes below INFO.

    Returns
    -------
    logging.Handler
        The installed handler (remove it to undo).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.json_lines else PlainFormatter())
    root = logging.getLogger()
    # Ours from an earlier call, and the plain stream handler of the CLI's early
    # basicConfig: either would print every line a second time. Subclasses (pytest's
    # capture handlers) stay.
    for old in [
        h for h in root.handlers if getattr(h, "_unict", False) or type(h) is logging.StreamHandler
    ]:
        root.removeHandler(old)
    handler._unict = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.getLogger("pynetdicom").setLevel(
        logging.INFO if settings.level == "DEBUG" else logging.WARNING
    )
    return handler
