"""Spool files acknowledged but not yet recorded: found and recorded at start.

The Storage SCP answers success once an instance's file is durable in the spool and leaves
its job-store row to :class:`~service.ingest_recorder.BatchRecorder`. A crash (``kill -9``,
power) between the two leaves a complete file without a row. Before the listener opens,
:func:`recover_spool` walks the spool's ``study/series/*.dcm`` files, asks the job store
which it knows, and records the others through the same checks as a received instance
(the calling AE title is the file meta's Source Application Entity Title, which the SCP
writes). A file that fails the checks was cut short by the crash before its success went
back (the sender resends it, and an identical resend rewrites it under the same name), or
is being written right now by another receiver sharing the spool: it is left alone and
goes with its study's folder (retention).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from service.instance_handler import InstanceHandler
from service.store import JobStore

__all__ = ["RecoveryReport", "recover_spool"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`recover_spool` found."""

    recorded: int
    """Complete files without a row, now recorded."""
    incomplete: int
    """Files cut short (never acknowledged) or still being written, left alone."""


def _source_ae(path: Path) -> str:
    try:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
        return str(meta.get("SourceApplicationEntityTitle", "") or "").strip()
    except Exception:  # an unreadable file is refused by the handler's own checks
        return ""


def recover_spool(spool_dir: Path, store: JobStore, handler: InstanceHandler) -> RecoveryReport:
    """Record the spool's unrecorded complete files."""
    files = sorted(spool_dir.glob("*/*/*.dcm"))
    if not files:
        return RecoveryReport(0, 0)
    known = store.recorded_paths(files)
    recorded = incomplete = 0
    for path in files:
        if path in known:
            continue
        result = handler.store_file(path, caller=_source_ae(path), connection=0)
        if result.ok:
            recorded += 1
            logger.warning("spool recovery: sop %s recorded", result.sop_instance_uid)
        else:
            incomplete += 1
            logger.warning("spool recovery: %s not recorded (%s)", path.name, result.reason)
    if recorded and handler.listener is not None:
        # Nothing is still delivering these series: the quiet period may close them.
        handler.listener.association_ended(0, released=False)
    if recorded or incomplete:
        logger.warning(
            "spool recovery: %d acknowledged instances recorded, %d incomplete files left",
            recorded,
            incomplete,
        )
    return RecoveryReport(recorded, incomplete)
