"""The DICOM listener: a pynetdicom Storage SCP for CT that spools and records instances.

Each C-STORE goes to :class:`~service.instance_handler.InstanceHandler` (spool, record,
tell the assembler; its statuses are listed there). The receiver is the server around it:
presentation contexts (the transfer syntaxes the pipeline can decode), TLS, and who may
associate.

Associations are accepted only from ``dicom.allowed_callers`` (and ``allowed_hosts`` when
set): others get an A-ASSOCIATE-RJ, permanent, "calling AE title not recognised".

With a :class:`~service.metrics.NodeMetrics`, stored instances and bytes, refused
C-STOREs (by status) and rejected associations (by reason) are counted.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from pathlib import Path
from typing import Any

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
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from service.config import DicomSettings, StorageSettings, TlsSettings
from service.instance_handler import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
    STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED,
    SUPPORTED_SOP_CLASSES,
    AssociationListener,
    InstanceHandler,
    SeriesRef,
    StoreResult,
)
from service.metrics import NodeMetrics
from service.store import JobStore

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SOP_CLASS_NOT_SUPPORTED",
    "STATUS_SUCCESS",
    "STATUS_TRANSFER_SYNTAX_NOT_SUPPORTED",
    "SUPPORTED_SOP_CLASSES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "AssociationListener",
    "Receiver",
    "SeriesRef",
    "StoreResult",
    "make_ssl_context",
]

logger = logging.getLogger(__name__)


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


# DUL states of an association with nothing left to abort: idle, awaiting the close.
_ENDED_STATES = frozenset({"Sta1", "Sta13"})


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
        self._handler = InstanceHandler(
            storage,
            store,
            listener=listener,
            metrics=metrics,
            transfer_syntaxes=SUPPORTED_TRANSFER_SYNTAXES,
        )
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
        """Store one received file (STOW-RS) the way a C-STORE is stored.

        See :meth:`InstanceHandler.store_file <service.instance_handler.InstanceHandler.store_file>`;
        refusals are counted like the C-STORE ones.
        """
        result = self._handler.store_file(
            source,
            caller=caller,
            connection=connection,
            requested_class=requested_class,
            requested_instance=requested_instance,
            study_uid=study_uid,
        )
        if not result.ok and self.metrics is not None:
            self.metrics.instances_refused.labels(status=f"0x{result.status:04X}").inc()
        return result

    def connection_ended(self, connection: int, *, released: bool) -> None:
        """A non-DIMSE connection (a STOW-RS request) that stored instances ended.

        Released (the whole body was read) lets the assembler close a series whose
        expected count is reached, as for a released association; otherwise the quiet
        period decides.
        """
        if self.listener is not None:
            self.listener.association_ended(connection, released=released)

    def _on_store(self, event: Event) -> int:
        status = self._handler(event)
        if status != STATUS_SUCCESS and self.metrics is not None:
            self.metrics.instances_refused.labels(status=f"0x{status:04X}").inc()
        return status
