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
- ``0x0122`` SOP class not supported;
- ``0xC122`` transfer syntax not supported (STOW-RS only: a C-STORE arrives in a syntax the
  association accepted).

C-STORE (:meth:`InstanceHandler.store_received`, from :mod:`service.storage_scp`) and
STOW-RS (:meth:`InstanceHandler.store_file`, from :mod:`service.dicomweb.stow`) go through
the same checks (:meth:`InstanceHandler._check`) and the same durable spool write.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy.exc import SQLAlchemyError

from service.config import StorageSettings
from service.header_scan import scan_header
from service.metrics import NodeMetrics
from service.selection import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, InstanceHeader
from service.spool_write import spool_write
from service.store import JobStore, ReceivedInstance, RecordOutcome
from service.uids import is_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED",
    "SUPPORTED_SOP_CLASSES",
    "AssociationListener",
    "InstanceHandler",
    "SeriesRef",
    "StoreResult",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
#: PS3.18 Table 10.5.3-3 "Referenced Transfer Syntax not supported" (STOW-RS; a C-STORE
#: cannot arrive in a syntax the association did not accept).
STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

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


@dataclass(frozen=True)
class StoreResult:
    """What became of one received file (:meth:`InstanceHandler.store_file`)."""

    status: int
    """``0x0000`` stored (a duplicate too), else the refusal's C-STORE status."""
    reason: str
    """Why it was refused ("" when stored); no patient data."""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    """The dataset's UIDs, when it could be read that far."""
    series: SeriesRef | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        """Whether it is stored."""
        return self.status == STATUS_SUCCESS


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
    pixels = ds.get_item(0x7FE00010, keep_deferred=True)  # its length, not its value
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
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts its elements)
        element = ds.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        if element.value_tell + element.length > size:
            return (
                f"value of {element.tag} ends at byte {element.value_tell + element.length} "
                f"of a {size}-byte object (truncated)"
            )
    return None


#: The Part 10 preamble and prefix (PS3.10 §7.1), put before a file that came without them.
_PREAMBLE = b"\0" * 128 + b"DICM"


class InstanceRecorder(Protocol):
    """Writes the job-store row of a durable spool file later (:mod:`service.ingest_recorder`)."""

    def submit(self, instance: ReceivedInstance, connection: int) -> None:
        """Queue `instance`, whose file is durable, for its row."""


@dataclass(frozen=True)
class _Checked:
    """A received file that passed the checks: what spooling and recording need."""

    header: InstanceHeader
    study_uid: str
    series_uid: str
    prefix: bytes
    """The Part 10 preamble when the file came without one, else empty."""

    def refused(self, status: int, reason: str) -> StoreResult:
        return StoreResult(status, reason, self.header.sop_class_uid, self.header.sop_instance_uid)


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
    transfer_syntaxes
        The transfer syntaxes a stored file may be in (the listener's); empty: any.
    """

    def __init__(
        self,
        storage: StorageSettings,
        store: JobStore,
        *,
        listener: AssociationListener | None = None,
        metrics: NodeMetrics | None = None,
        transfer_syntaxes: Collection[str] = (),
    ) -> None:
        self.storage = storage
        self.store = store
        self.listener = listener
        self.metrics = metrics
        self.spool_dir = storage.spool_dir
        self.transfer_syntaxes = frozenset(str(s) for s in transfer_syntaxes)

    def store_file(
        self,
        source: Path,
        *,
        caller: str,
        connection: int,
        requested_class: str | None = None,
        requested_instance: str | None = None,
        study_uid: str | None = None,
    ) -> StoreResult:
        """Spool and record one received DICOM file (STOW-RS; a C-STORE collected in a file).

        C-STORE (:meth:`store_received`) and STOW-RS both come through the same checks, so
        durability (written and ``fsync``-ed before success), the spool floor, the SOP
        class and transfer syntax checks, the job store record and the assembler's notice
        are the same for both.

        Parameters
        ----------
        source
            A DICOM Part 10 file (file meta included; without the preamble it is spooled
            with one) that may be removed by the caller afterwards; it is copied.
        caller
            Who sent it: the calling AE title, or the DICOMweb client's name.
        connection
            The association (or HTTP request) it came on; the assembler is told when it
            ends (:meth:`AssociationListener.association_ended`).
        requested_class, requested_instance
            The SOP Class and Instance UIDs the C-STORE request named (the dataset must
            match them); ``None`` when the transport names none (STOW-RS).
        study_uid
            The study the instance must belong to (``POST /studies/{study}``).
        """
        checked = self._check(
            source,
            label=requested_instance or source.name,
            requested_class=requested_class,
            requested_instance=requested_instance,
            study_uid=study_uid,
        )
        if isinstance(checked, StoreResult):
            return checked
        return self._spool_and_record(checked, source, caller, connection, None)

    def store_received(
        self,
        data: bytes,
        *,
        caller: str,
        connection: int,
        requested_class: str,
        requested_instance: str,
        recorder: InstanceRecorder | None = None,
        sha256: str | None = None,
    ) -> StoreResult:
        """Spool one C-STORE's dataset, received into memory as a Part 10 file.

        `data` is the whole file (preamble, file meta, dataset) as the Storage SCP built it.
        With a `recorder`, success is answered once the file is durable in the spool and
        the row is written by the recorder in a batch (the file is the write-ahead
        record; see :mod:`service.ingest_recorder`); without one the row is written here.
        """
        # A CT Image in a Little Endian syntax with native pixels: its header is scanned
        # without building the whole dataset; anything else is read by pydicom.
        scanned = scan_header(data) if requested_class == CT_IMAGE_STORAGE else None
        checked = self._check(
            data,
            label=requested_instance,
            requested_class=requested_class,
            requested_instance=requested_instance,
            study_uid=None,
            scanned=None if scanned is None else scanned.dataset,
        )
        if isinstance(checked, StoreResult):
            return checked
        return self._spool_and_record(checked, data, caller, connection, recorder, sha256)

    def _check(
        self,
        source: Path | bytes,
        *,
        label: str,
        requested_class: str | None,
        requested_instance: str | None,
        study_uid: str | None,
        scanned: Dataset | None = None,
    ) -> _Checked | StoreResult:
        """The checks before anything is written: spool floor, decodable, complete, UIDs.

        `scanned` is the header already read by :func:`service.header_scan.scan_header`
        (the C-STORE hot path); without it the file is read with pydicom.
        """
        prefix = b""
        if requested_class is not None and requested_class not in SUPPORTED_SOP_CLASSES:
            return StoreResult(
                STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {requested_class} not supported"
            )
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        fp: Path | BinaryIO = source if isinstance(source, Path) else io.BytesIO(source)

        def refused(
            status: int, reason: str, sop_class_uid: str = "", sop_instance_uid: str = ""
        ) -> StoreResult:
            return StoreResult(status, reason, sop_class_uid, sop_instance_uid)

        try:
            free_mb = shutil.disk_usage(self.spool_dir).free / 2**20
        except OSError as exc:
            logger.error("spool %s unusable: %s", self.spool_dir, exc)
            return refused(STATUS_OUT_OF_RESOURCES, "spool unusable")
        if free_mb < self.storage.min_free_mb:
            logger.error(
                "refusing sop %s: %.0f MB free in the spool < min_free_mb %d",
                label,
                free_mb,
                self.storage.min_free_mb,
            )
            return refused(STATUS_OUT_OF_RESOURCES, "spool space below storage.min_free_mb")

        try:
            try:
                ds = scanned if scanned is not None else dcmread(fp, defer_size=_DEFER_BYTES)
            except InvalidDicomError:
                # File meta without the 128-byte preamble and "DICM" (pydicom 3 writes such
                # files unless asked for the file format; dicomweb-client sends them): read
                # it when the meta names its transfer syntax, else it is not DICOM.
                if not isinstance(fp, Path):
                    fp.seek(0)
                ds = dcmread(fp, defer_size=_DEFER_BYTES, force=True)
                if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                    raise
                prefix = _PREAMBLE  # spooled as a proper Part 10 file
            sop_class = str(ds.get("SOPClassUID", ""))
            sop_instance = str(ds.get("SOPInstanceUID", ""))
            syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", ""))
        except Exception as exc:  # any decoding failure means one thing: cannot understand
            logger.warning("sop %s cannot be decoded: %s", label, exc)
            return refused(STATUS_CANNOT_UNDERSTAND, "not a readable DICOM Part 10 file")
        uids = {"sop_class_uid": sop_class, "sop_instance_uid": sop_instance}
        if requested_class is None and sop_class not in SUPPORTED_SOP_CLASSES:
            logger.warning("sop %s: SOP class %s not supported", label, sop_class)
            return refused(
                STATUS_SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} not supported", **uids
            )
        if self.transfer_syntaxes and syntax not in self.transfer_syntaxes:
            logger.warning("sop %s: transfer syntax %s not supported", label, syntax)
            return refused(
                STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
                f"transfer syntax {syntax or '(none)'} not supported",
                **uids,
            )
        try:
            problem = _incomplete(ds, size)
            if problem is not None:
                logger.warning("sop %s cannot be stored: %s", label, problem)
                return refused(STATUS_CANNOT_UNDERSTAND, problem, **uids)
            header = InstanceHeader.from_dataset(ds)
            instance_study = str(ds.StudyInstanceUID)
            series_uid = str(ds.SeriesInstanceUID)
        except Exception as exc:  # any decoding failure means one thing: cannot understand
            logger.warning("sop %s cannot be decoded: %s", label, exc)
            return refused(STATUS_CANNOT_UNDERSTAND, "header not decodable", **uids)
        for name, uid in (
            ("StudyInstanceUID", instance_study),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", header.sop_instance_uid),
        ):
            if not is_uid(uid):
                logger.warning("sop %s: invalid %s", label, name)
                return refused(STATUS_CANNOT_UNDERSTAND, f"invalid {name}", **uids)
        if requested_class is not None and (
            header.sop_class_uid != requested_class or header.sop_instance_uid != requested_instance
        ):
            logger.warning("sop %s: dataset's SOP class/instance differ from the request's", label)
            return refused(
                STATUS_DATASET_MISMATCH, "SOP class/instance differ from the request's", **uids
            )
        if study_uid is not None and instance_study != study_uid:
            logger.warning("sop %s: not of the study the request names", label)
            return refused(
                STATUS_DATASET_MISMATCH, "Study Instance UID differs from the request's", **uids
            )
        return _Checked(header, instance_study, series_uid, prefix)

    def _spool_and_record(
        self,
        checked: _Checked,
        data: bytes | Path,
        caller: str,
        connection: int,
        recorder: InstanceRecorder | None,
        sha256: str | None = None,
    ) -> StoreResult:
        header = checked.header
        try:
            path, size, digest = spool_write(
                self.spool_dir,
                data,
                checked.study_uid,
                checked.series_uid,
                header.sop_instance_uid,
                prefix=checked.prefix,
                sha256=sha256 if not checked.prefix else None,
            )
        except OSError as exc:
            logger.error("sop %s: spool write failed: %s", header.sop_instance_uid, exc)
            return checked.refused(STATUS_OUT_OF_RESOURCES, "spool write failed")
        received = ReceivedInstance(
            study_instance_uid=checked.study_uid,
            series_instance_uid=checked.series_uid,
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            path=path,
            size=size,
            sha256=digest,
            calling_ae=caller,
            header=header.to_json(),
            expected_count=header.images_in_acquisition,
        )
        if self.metrics is not None:
            self.metrics.instances_received.inc()
            self.metrics.bytes_received.inc(size)
        if recorder is not None:
            recorder.submit(received, connection)
            return StoreResult(
                status=STATUS_SUCCESS,
                reason="",
                sop_class_uid=header.sop_class_uid,
                sop_instance_uid=header.sop_instance_uid,
            )
        try:
            result = self.store.record_instance(received)
        except SQLAlchemyError as exc:
            # The file stays in the spool; the sender retries and the record is made then.
            logger.error("sop %s: job store unavailable: %s", header.sop_instance_uid, exc)
            return checked.refused(STATUS_OUT_OF_RESOURCES, "job store unavailable")
        duplicate = result.outcome is RecordOutcome.DUPLICATE
        if duplicate:
            logger.debug("sop %s: duplicate, already stored", header.sop_instance_uid)
        series = SeriesRef(
            series_id=result.series_id,
            version=result.version,
            job_id=result.job_id,
            study_instance_uid=checked.study_uid,
            series_instance_uid=checked.series_uid,
            calling_ae=caller,
        )
        if self.listener is not None:
            self.listener.instance_received(connection, series)
        return StoreResult(
            status=STATUS_SUCCESS,
            reason="",
            sop_class_uid=header.sop_class_uid,
            sop_instance_uid=header.sop_instance_uid,
            series=series,
            duplicate=duplicate,
        )
