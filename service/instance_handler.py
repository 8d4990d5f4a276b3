"""The C-STORE handler: what happens to one received instance before its status goes back.

Only what must happen before the sender hears "stored" (so that a success status means the
instance is safe on disk and recorded): check the disk, read the header, write the file
atomically into the spool (temporary file in the target folder, ``fsync``, ``rename``),
record it in the job store, and tell the assembler. It never decodes pixel data or runs
the pipeline. :mod:`service.receiver` is the server around it (associations, contexts, TLS).

Statuses (PS3.4 Annex B.2.3, as pynetdicom names them):

- ``0x0000`` stored (a duplicate of a stored instance is a success too);
- ``0xA700`` out of resources: spool space below ``storage.min_free_mb``, a disk error, or
  the job store unreachable; the sender may try again later;
- ``0xA900`` the dataset does not match the SOP class (or instance) of the request;
- ``0xC210`` cannot understand: not decodable, or UIDs missing or invalid;
- ``0x0122`` SOP class not supported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from sqlalchemy.exc import SQLAlchemyError

from service.config import StorageSettings
from service.metrics import NodeMetrics
from service.selection import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, InstanceHeader
from service.store import JobStore, ReceivedInstance, RecordOutcome
from service.uids import is_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "SUPPORTED_SOP_CLASSES",
    "AssociationListener",
    "InstanceHandler",
    "SeriesRef",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

SUPPORTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)


@dataclass(frozen=True)
class SeriesRef:
    """The series version an instance was recorded in."""

    series_id: int
    version: int
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str


class AssociationListener(Protocol):
    """Told about instances as they are stored, and about associations ending.

    Both methods are called from association threads: they must be quick and thread-safe.
    """

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        """An instance of `series` was stored on association `association_id`."""

    def association_ended(self, association_id: int, *, released: bool) -> None:
        """The association ended: released normally, or aborted/dropped."""


# Values longer than this are not read while checking a received file (pixel data stays on
# disk); they are only checked to end inside the file.
_DEFER_BYTES = 4096
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _incomplete(ds: Dataset, size: int) -> str | None:
    """Why a dataset read from a file of `size` bytes is cut short, or ``None``.

    A sender that drops the connection mid-object, or a router that forwards a truncated
    file, leaves a dataset whose last value ends past the end of the data; pydicom reads
    such a file with a warning only, so it is checked here, before success is answered.
    An encapsulated Pixel Data cut before its delimiter is dropped by pydicom: a missing
    Pixel Data is caught the same way.
    """
    if "PixelData" not in ds:
        return "no Pixel Data (missing, or cut before its end)"
    pixels = ds.get_item(0x7FE00010)
    if isinstance(pixels, RawDataElement) and pixels.length != _UNDEFINED_LENGTH:
        # Native (uncompressed) pixel data must hold every frame (PS3.5 §8.1.1).
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            bits = int(ds.BitsAllocated)
            samples = int(ds.get("SamplesPerPixel") or 1)
            needed = (int(ds.Rows) * int(ds.Columns) * samples * frames * bits + 7) // 8
        except (AttributeError, TypeError, ValueError):
            return "Rows, Columns or BitsAllocated missing or invalid"
        if pixels.length < needed:
            return f"Pixel Data has {pixels.length} bytes, the image needs {needed}"
    for element in ds.elements():
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        if element.value_tell + element.length > size:
            return (
                f"value of {element.tag} ends at byte {element.value_tell + element.length} "
                f"of a {size}-byte object (truncated)"
            )
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceHandler:
    """The C-STORE handler of the Storage SCP (one instance at a time, any thread).

    Parameters
    ----------
    storage
        Spool folder and free-space floor.
    store
        Where instances are recorded.
    listener
        Told about stored instances (the assembler).
    metrics
        Where instances and bytes are counted (none when ``None``).
    """

    def __init__(
        self,
        storage: StorageSettings,
        store: JobStore,
        *,
        listener: AssociationListener | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.storage = storage
        self.store = store
        self.listener = listener
        self.metrics = metrics
        self.spool_dir = storage.spool_dir

    def __call__(self, event: Event) -> int:
        """Handle one C-STORE request; return its status."""
        request = cast(C_STORE, event.request)
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        requested_class = str(request.AffectedSOPClassUID)
        requested_instance = str(request.AffectedSOPInstanceUID)
        if requested_class not in SUPPORTED_SOP_CLASSES:
            return STATUS_SOP_CLASS_NOT_SUPPORTED
        source = event.dataset_path

        try:
            free_mb = shutil.disk_usage(self.spool_dir).free / 2**20
        except OSError as exc:
            logger.error("spool %s unusable: %s", self.spool_dir, exc)
            return STATUS_OUT_OF_RESOURCES
        if free_mb < self.storage.min_free_mb:
            logger.error(
                "refusing sop %s: %.0f MB free in the spool < min_free_mb %d",
                requested_instance,
                free_mb,
                self.storage.min_free_mb,
            )
            return STATUS_OUT_OF_RESOURCES

        try:
            ds = dcmread(source, defer_size=_DEFER_BYTES)
            problem = _incomplete(ds, source.stat().st_size)
            if problem is not None:
                logger.warning("sop %s cannot be stored: %s", requested_instance, problem)
                return STATUS_CANNOT_UNDERSTAND
            header = InstanceHeader.from_dataset(ds)
            study_uid = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
        except Exception as exc:  # any decoding failure means one thing: cannot understand
            logger.warning("sop %s cannot be decoded: %s", requested_instance, exc)
            return STATUS_CANNOT_UNDERSTAND
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
        ):
            if not is_uid(uid):
                logger.warning("sop %s: invalid %s", requested_instance, name)
                return STATUS_CANNOT_UNDERSTAND
        if header.sop_class_uid != requested_class or header.sop_instance_uid != requested_instance:
            logger.warning(
                "sop %s: dataset's SOP class/instance differ from the request's",
                requested_instance,
            )
            return STATUS_DATASET_MISMATCH

        try:
            path, size, digest = self._spool(source, study_uid, series_uid, header.sop_instance_uid)
        except OSError as exc:
            logger.error("sop %s: spool write failed: %s", header.sop_instance_uid, exc)
            return STATUS_OUT_OF_RESOURCES

        try:
            result = self.store.record_instance(
                ReceivedInstance(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    path=path,
                    size=size,
                    sha256=digest,
                    calling_ae=calling_ae,
                    header=header.to_json(),
                    expected_count=header.images_in_acquisition,
                )
            )
        except SQLAlchemyError as exc:
            # The file stays in the spool; the sender retries and the record is made then.
            logger.error("sop %s: job store unavailable: %s", header.sop_instance_uid, exc)
            return STATUS_OUT_OF_RESOURCES
        if result.outcome is RecordOutcome.DUPLICATE:
            logger.debug("sop %s: duplicate, already stored", header.sop_instance_uid)
        if self.metrics is not None:
            self.metrics.instances_received.inc()
            self.metrics.bytes_received.inc(size)
        if self.listener is not None:
            self.listener.instance_received(
                id(event.assoc),
                SeriesRef(
                    series_id=result.series_id,
                    version=result.version,
                    job_id=result.job_id,
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    calling_ae=calling_ae,
                ),
            )
        return STATUS_SUCCESS

    def _spool(
        self, source: Path, study_uid: str, series_uid: str, sop_uid: str
    ) -> tuple[Path, int, str]:
        """Copy `source` into the spool atomically; return the path, size and SHA-256.

        The name carries the start of the content hash, so a changed resend never
        overwrites a file an earlier series version (maybe being analysed) points at.
        """
        directory = self.spool_dir / study_uid / series_uid
        created = not directory.is_dir()
        if created:
            directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{sop_uid}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            hexdigest = digest.hexdigest()
            final = directory / f"{sop_uid}.{hexdigest[:16]}.dcm"
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        if created:  # make the new folders themselves durable too
            _fsync_dir(directory.parent)
            _fsync_dir(directory.parent.parent)
        return final, size, hexdigest
