"""The DICOM listener: a pynetdicom Storage SCP for CT that spools and records instances.

The C-STORE handler does only what must happen before the status goes back to the sender
(so that a success status means the instance is safe on disk and recorded): check the disk, read the header, write the file atomically into the spool
(temporary file in the target folder, ``fsync``, ``rename``), record it in the job store,
and tell the assembler. It never decodes pixel data or runs the pipeline.

Statuses (PS3.4 Annex B.2.3, as pynetdicom names them):

- ``0x0000`` stored (a duplicate of a stored instance is a success too);
- ``0xA700`` out of resources: spool space below ``storage.min_free_mb``, a disk error, or
  the job store unreachable; the sender may try again later;
- ``0xA900`` the dataset does not match the SOP class (or instance) of the request;
- ``0xC210`` cannot understand: not decodable, or UIDs missing or invalid;
- ``0x0122`` SOP class not supported.

Associations are accepted only from ``dicom.allowed_callers`` (and ``allowed_hosts`` when
set): others get an A-ASSOCIATE-RJ, permanent, "calling AE title not recognised".

With a :class:`~service.metrics.NodeMetrics`, stored instances and bytes, refused
C-STOREs (by status) and rejected associations (by reason) are counted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from service.config import DicomSettings, StorageSettings, TlsSettings
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
    "SUPPORTED_TRANSFER_SYNTAXES",
    "AssociationListener",
    "Receiver",
    "SeriesRef",
    "make_ssl_context",
]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

SUPPORTED_SOP_CLASSES = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE)

# Lossless compressed syntaxes a CT may arrive in; each is offered only when a pixel data
# decoder of the node's ``decoders`` extra is installed (pip install 'unict-node[decoders]':
# pylibjpeg-libjpeg for JPEG Lossless, pyjpegls or pylibjpeg-libjpeg for JPEG-LS,
# pylibjpeg-openjpeg for JPEG 2000; RLE is pydicom's own). Without it, such a syntax is
# refused at association and the sender transcodes or reports it. Lossy syntaxes are never
# offered: a PACS then transcodes to one of these.
_COMPRESSED_LOSSLESS = (
    JPEGLosslessSV1,
    JPEGLosslessP14,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
)


#: pydicom decoder plugins that count: the ``decoders`` extra, pydicom's own (RLE) and GDCM.
#: Pillow's JPEG 2000 support depends on how Pillow was built (it is a dependency for the
#: previews, not a decoder the node promises), so it does not make a syntax offered.
DECODER_PLUGINS = frozenset({"pylibjpeg", "pyjpegls", "pydicom", "gdcm"})


def _decodable(syntax: UID) -> bool:
    try:
        return bool(DECODER_PLUGINS & set(get_decoder(syntax).available_plugins))
    except NotImplementedError:
        return False


# The uncompressed syntaxes, then the compressed ones the pipeline can decode here: nothing
# is accepted that the pipeline cannot load.
SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *(s for s in _COMPRESSED_LOSSLESS if _decodable(s)),
)

# (Result Source, Diagnostic) of an A-ASSOCIATE-RJ (PS3.8 §9.3.4) -> metrics label.
_REJECT_REASONS: dict[tuple[int | None, int | None], str] = {
    (0x01, 0x03): "calling_ae",
    (0x01, 0x07): "called_ae",
    (0x03, 0x02): "busy",
}


@dataclass(frozen=True)
class SeriesRef:
    """The series version an instance was recorded in."""

    series_id: int
    version: int
    job_id: int
    study_instance_uid: str
    series_instance_uid: str
    calling_ae: str


# DUL states of an association with nothing left to abort: idle, awaiting the close.
_ENDED_STATES = frozenset({"Sta1", "Sta13"})


class AssociationListener(Protocol):
    """Told about instances as they are stored, and about associations ending.

    Both methods are called from association threads: they must be quick and thread-safe.
    """

    def instance_received(self, association_id: int, series: SeriesRef) -> None:
        """An instance of `series` was stored on association `association_id`."""

    def association_ended(self, association_id: int, *, released: bool) -> None:
        """The association ended: released normally, or aborted/dropped."""


def make_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """Server-side TLS context from the ``dicom.tls`` settings (TLS 1.2 or later)."""
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError("dicom.tls needs cert_file and key_file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


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


class Receiver:
    """The Storage SCP.

    Parameters
    ----------
    dicom
        Listener settings: AE title, address, accepted callers, limits, TLS.
    storage
        Spool folder and free-space floor.
    store
        Where instances are recorded.
    listener
        Told about stored instances and ended associations (the assembler).
    metrics
        Where instances, bytes and refusals are counted (none when ``None``).
    """

    def __init__(
        self,
        dicom: DicomSettings,
        storage: StorageSettings,
        store: JobStore,
        *,
        listener: AssociationListener | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.dicom = dicom
        self.metrics = metrics
        self.storage = storage
        self.store = store
        self.listener = listener
        self.spool_dir = storage.spool_dir
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._ae: AE | None = None
        self._ended: set[int] = set()
        self._lock = threading.Lock()
        self._hosts = (
            None
            if dicom.allowed_hosts is None
            else tuple(ipaddress.ip_network(h, strict=False) for h in dicom.allowed_hosts)
        )

    # ------------------------------------------------------------ lifecycle

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.dicom.ae_title)
        for sop_class in SUPPORTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(SUPPORTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        if not self.dicom.allow_any_caller:
            ae.require_calling_aet = list(self.dicom.allowed_callers)
        ae.maximum_associations = self.dicom.max_associations
        # The ARTIM wait for an A-ASSOCIATE-RQ (PS3.8 §9.1.5); a connection closed before
        # sending one keeps its slot until it runs out.
        ae.acse_timeout = self.dicom.acse_timeout_s
        ae.maximum_pdu_size = self.dicom.max_pdu
        return ae

    def start(self) -> None:
        """Bind the listener and serve in background threads.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, bad interface).
        """
        if self._server is not None:
            raise RuntimeError("the receiver is already running")
        # Stream each dataset to a temporary file instead of decoding it in memory
        # (event.dataset_path); process-wide, and only affects C-STORE as SCP.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        ssl_context = make_ssl_context(self.dicom.tls) if self.dicom.tls.enabled else None
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        before = set(threading.enumerate())
        self._ae = self._make_ae()
        self._server = self._ae.start_server(
            (self.dicom.bind_address, self.dicom.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=ssl_context,
        )
        # pynetdicom does not keep the serving thread on the server; find it for is_bound.
        self._thread = next(
            (
                t
                for t in threading.enumerate()
                if t not in before and t.name.startswith("AcceptorServer")
            ),
            None,
        )
        logger.info(
            "DICOM listener %s on %s:%d%s",
            self.dicom.ae_title,
            *self.address,
            " (TLS)" if ssl_context else "",
        )

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let open associations end for up to `grace` seconds, abort the rest.

        An association that has just been released or rejected waits for its peer to close
        the connection (state Sta13); pynetdicom's state machine has no A-ABORT for that
        state and its reactor thread dies on one (a CI failure at a test's teardown). So the
        server stops accepting first, the associations get their grace period to finish,
        and only those still open after it are aborted (an instance not yet acknowledged is
        then resent by its peer); idle and closing ones are left to end by themselves.
        """
        server, self._server = self._server, None
        if server is None or self._ae is None:
            return
        server.shutdown()  # no new associations; the open ones keep their threads
        deadline = time.monotonic() + grace
        while (open_ := self._open_associations()) and time.monotonic() < deadline:
            open_[0].join(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        for assoc in self._open_associations():
            logger.warning("aborting an association still open after %.1f s", grace)
            assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None
        logger.info("DICOM listener stopped")

    def _open_associations(self) -> list[Association]:
        """Associations with something to end: not idle (Sta1, the thread only finishing its
        handlers) and not closing (Sta13, released or rejected and awaiting the close)."""
        if self._ae is None:
            return []
        return [
            assoc
            for assoc in self._ae.active_associations
            if assoc.dul.state_machine.current_state not in _ENDED_STATES
        ]

    @property
    def address(self) -> tuple[str, int]:
        """The bound address and port (the real port when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the receiver is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return self.address[1]

    @property
    def is_bound(self) -> bool:
        """Whether the listening socket is open and its server thread alive."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return False
        sock = server.socket
        return sock is not None and sock.fileno() >= 0 and thread.is_alive()

    # ------------------------------------------------------------ association events

    def _on_requested(self, event: Event) -> None:
        if self._hosts is None:
            return
        address = event.assoc.requestor.address
        try:
            allowed = any(ipaddress.ip_address(address) in net for net in self._hosts)
        except ValueError:
            allowed = False
        if not allowed:
            logger.warning(
                "association from %s (%s) refused: host not in allowed_hosts",
                address,
                event.assoc.requestor.primitive.calling_ae_title,  # type: ignore[union-attr]
            )
            # Rejected permanent, by the service user, calling AE title not recognised
            # (PS3.8 §7.1.1.9).
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            # pynetdicom sends no EVT_REJECTED for a rejection made in EVT_REQUESTED.
            if self.metrics is not None:
                self.metrics.associations_refused.labels(reason="host").inc()
            # As pynetdicom does for its own rejections: wait until the DUL has sent the
            # A-ASSOCIATE-RJ and gone idle, or the socket closes before the PDU leaves.
            event.assoc.kill()

    def _on_rejected(self, event: Event) -> None:
        """pynetdicom rejected an association: unknown caller, wrong called AE, too many."""
        if self.metrics is None:
            return
        # send_reject leaves the A-ASSOCIATE-RJ it sent on the acceptor.
        primitive = event.assoc.acceptor.primitive
        source = getattr(primitive, "result_source", None)
        diagnostic = getattr(primitive, "diagnostic", None)
        reason = _REJECT_REASONS.get((source, diagnostic), "other")
        self.metrics.associations_refused.labels(reason=reason).inc()

    def _end(self, event: Event, *, released: bool) -> None:
        key = id(event.assoc)
        with self._lock:
            if key in self._ended:
                return
            self._ended.add(key)
        if self.listener is not None:
            self.listener.association_ended(key, released=released)

    def _on_released(self, event: Event) -> None:
        self._end(event, released=True)

    def _on_aborted(self, event: Event) -> None:
        self._end(event, released=False)

    def _on_closed(self, event: Event) -> None:
        self._end(event, released=False)
        with self._lock:
            self._ended.discard(id(event.assoc))

    # ------------------------------------------------------------ C-STORE

    def _on_store(self, event: Event) -> int:
        status = self._store_instance(event)
        if status != STATUS_SUCCESS and self.metrics is not None:
            self.metrics.instances_refused.labels(status=f"0x{status:04X}").inc()
        return status

    def _store_instance(self, event: Event) -> int:
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
