"""C-STORE SCU: send a job's outputs (SEG, SR, ...) to every configured destination.

A ``type: dicomweb`` destination gets them by STOW-RS (:mod:`service.dicomweb.client`)
instead, with the same attempts, backoff and per-instance results; an HTTP failure with no
response (connection refused, timeout, 5xx) counts as no status, and is retried.

Each instance's DIMSE status is checked, its category (success, warning, failure) as
pynetdicom's :func:`~pynetdicom.status.code_to_category` decides it (PS3.7 Annex C and
PS3.4 Annex B: ``0x0001``, ``0x0107``, ``0x0116`` and every ``0xBxxx`` are warnings: the
instance was stored). Transient failures (association refused or
dropped, no response, ``0xA7xx`` out of resources) are retried with exponential backoff,
re-sending only what did not succeed, up to ``sender.max_attempts``; permanent ones
(``0xA9xx`` mismatch, ``0xCxxx`` cannot understand, ``0x0122`` not supported ...) are not.
What is still unsent then raises :class:`SendFailure` (a
:class:`~service.errors.SendError`) carrying every per-instance result for the job record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from service import pynetdicom_race
from service.config import Destination, DicomwebDestination, SenderSettings
from service.errors import SendError

__all__ = ["Output", "SendFailure", "SendResult", "Sender", "is_retryable_status", "is_stored"]


pynetdicom_race.install()
logger = logging.getLogger(__name__)

Output = Dataset | Path
"""What the pipeline hands over: a dataset in memory or a DICOM file."""


def is_stored(status: int) -> bool:
    """Whether a C-STORE status means the instance was stored (success or a warning)."""
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def is_retryable_status(status: int) -> bool:
    """Whether a failed C-STORE status may succeed later (``0xA7xx`` out of resources)."""
    return 0xA700 <= status <= 0xA7FF


def _comment(comment: object) -> str:
    return f": {comment}" if comment else ""


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one instance to one destination."""

    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    ok: bool
    status: int | None
    """The DIMSE status, or ``None`` when none came back (network error, no association)."""
    detail: str
    attempts: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready; the status also as ``0xNNNN`` text."""
        out = asdict(self)
        out["status_hex"] = None if self.status is None else f"0x{self.status:04X}"
        return out


class SendFailure(SendError):
    """Some instances could not be stored at some destination after every retry.

    Attributes
    ----------
    results
        Every per-destination, per-instance result, successes included.
    """

    def __init__(self, reason: str, *, retryable: bool, results: Sequence[SendResult]) -> None:
        super().__init__(reason, retryable=retryable)
        self.results = tuple(results)


@dataclass(frozen=True)
class _Item:
    dataset: Dataset
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


def _load(output: Output) -> _Item:
    ds = dcmread(output) if isinstance(output, Path) else output
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        # A dataset built in memory without file meta: say how it is to be encoded.
        ds = ds.copy()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax = ExplicitVRLittleEndian
    return _Item(ds, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(syntax))


class Sender:
    """Sends outputs to destinations with retries.

    Parameters
    ----------
    destinations
        Where to send; every destination gets every output.
    settings
        Attempts, backoff and timeouts.
    calling_ae
        Our AE title as the calling AE.
    sleep
        Waits between attempts (injectable so tests do not wait).
    """

    def __init__(
        self,
        destinations: Sequence[Destination | DicomwebDestination],
        settings: SenderSettings,
        *,
        calling_ae: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.destinations = tuple(destinations)
        self.settings = settings
        self.calling_ae = calling_ae
        self.sleep = sleep

    def __call__(self, outputs: Sequence[Output]) -> list[SendResult]:
        """Send `outputs` everywhere; see :meth:`send`."""
        return self.send(outputs)

    def send(self, outputs: Sequence[Output]) -> list[SendResult]:
        """Send every output to every destination.

        Returns
        -------
        list of SendResult
            One per destination and instance, all successful.

        Raises
        ------
        SendFailure
            Something is still unsent after the retries; ``retryable`` says whether the
            last failure was transient; ``results`` has every result.
        """
        items = [_load(o) for o in outputs]
        results: list[SendResult] = []
        failed: list[SendResult] = []
        for destination in self.destinations:
            for result in self._send_to(destination, items):
                results.append(result)
                if not result.ok:
                    failed.append(result)
        if failed:
            retryable = any(r.status is None or is_retryable_status(r.status) for r in failed)
            first = failed[0]
            raise SendFailure(
                f"{len(failed)} of {len(results)} instance sends failed; first: "
                f"{first.destination} {first.sop_instance_uid}: {first.detail}",
                retryable=retryable,
                results=results,
            )
        return results

    def _send_to(
        self, destination: Destination | DicomwebDestination, items: Sequence[_Item]
    ) -> list[SendResult]:
        done: dict[str, SendResult] = {}
        pending = list(items)
        last: dict[str, SendResult] = {}
        for attempt in range(1, self.settings.max_attempts + 1):
            if attempt > 1:
                delay = min(
                    self.settings.backoff_s * 2 ** (attempt - 2), self.settings.max_backoff_s
                )
                logger.info(
                    "retrying %d instance(s) to %s in %.1f s (attempt %d/%d)",
                    len(pending),
                    destination.name,
                    delay,
                    attempt,
                    self.settings.max_attempts,
                )
                self.sleep(delay)
            for result in self._attempt(destination, pending, attempt):
                if result.ok:
                    done[result.sop_instance_uid] = result
                else:
                    last[result.sop_instance_uid] = result
            retry = []
            for item in pending:
                if item.sop_instance_uid in done:
                    continue
                result = last[item.sop_instance_uid]
                if result.status is None or is_retryable_status(result.status):
                    retry.append(item)
            pending = retry
            if not pending:
                break
        return [done.get(i.sop_instance_uid) or last[i.sop_instance_uid] for i in items]

    def _associate(self, destination: Destination, items: Sequence[_Item]) -> Association:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.settings.timeout_s
        contexts: dict[str, list[str]] = {}
        for item in items:
            syntaxes = contexts.setdefault(item.sop_class_uid, [])
            for syntax in (item.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if syntax not in syntaxes:
                    syntaxes.append(syntax)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        return ae.associate(destination.host, destination.port, ae_title=destination.ae_title)

    def _attempt(
        self, destination: Destination | DicomwebDestination, items: Sequence[_Item], attempt: int
    ) -> list[SendResult]:
        if isinstance(destination, DicomwebDestination):
            return self._stow_attempt(destination, items, attempt)
        return self._store_attempt(destination, items, attempt)

    def _stow_attempt(
        self, destination: DicomwebDestination, items: Sequence[_Item], attempt: int
    ) -> list[SendResult]:
        from service.dicomweb.client import stow

        outcomes = stow(destination, [i.dataset for i in items], timeout_s=self.settings.timeout_s)
        return [
            SendResult(
                destination.name,
                item.sop_instance_uid,
                item.sop_class_uid,
                outcome.ok,
                outcome.status,
                outcome.detail,
                attempt,
            )
            for item, outcome in zip(items, outcomes, strict=True)
        ]

    def _store_attempt(
        self, destination: Destination, items: Sequence[_Item], attempt: int
    ) -> list[SendResult]:
        def result(item: _Item, ok: bool, status: int | None, detail: str) -> SendResult:
            return SendResult(
                destination.name,
                item.sop_instance_uid,
                item.sop_class_uid,
                ok,
                status,
                detail,
                attempt,
            )

        try:
            assoc = self._associate(destination, items)
        except (OSError, RuntimeError) as exc:
            return [result(i, False, None, f"cannot associate: {exc}") for i in items]
        if not assoc.is_established:
            # pynetdicom reports a refused or timed-out connection as an abort too.
            why = (
                f"association rejected by {destination.ae_title}"
                if assoc.is_rejected
                else "no association (connection refused, timed out or aborted)"
            )
            logger.warning(
                "send to %s (%s:%d): %s", destination.name, destination.host, destination.port, why
            )
            return [result(i, False, None, why) for i in items]
        out: list[SendResult] = []
        try:
            for item in items:
                if not assoc.is_established:
                    out.append(result(item, False, None, "association lost"))
                    continue
                try:
                    status_ds = assoc.send_c_store(item.dataset)
                except (ValueError, RuntimeError) as exc:  # no accepted context for it
                    out.append(result(item, False, 0x0122, f"not sent: {exc}"))
                    continue
                status = getattr(status_ds, "Status", None) if status_ds else None
                if status is None:
                    out.append(result(item, False, None, "no response (timeout or abort)"))
                elif status == 0x0000:
                    out.append(result(item, True, 0, "stored"))
                elif is_stored(int(status)):
                    comment = status_ds.get("ErrorComment", "")
                    detail = f"stored, warning 0x{int(status):04X}"
                    out.append(result(item, True, int(status), detail + _comment(comment)))
                    logger.info(
                        "send %s to %s: %s", item.sop_instance_uid, destination.name, detail
                    )
                else:
                    comment = status_ds.get("ErrorComment", "")
                    out.append(
                        result(
                            item,
                            False,
                            int(status),
                            f"status 0x{int(status):04X}{_comment(comment)}",
                        )
                    )
                    logger.warning(
                        "send %s to %s: status 0x%04X",
                        item.sop_instance_uid,
                        destination.name,
                        int(status),
                    )
        finally:
            if assoc.is_established:
                assoc.release()
        return out
