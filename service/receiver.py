"""The DICOM listener: a Storage SCP for CT that spools and records instances.

Each C-STORE goes to :class:`~service.instance_handler.InstanceHandler` (check, spool
durably; its statuses are listed there), and its job-store row to the
:class:`~service.ingest_recorder.BatchRecorder`, which tells the assembler. The receiver
is the server around them: the node's own Upper Layer acceptor
(:class:`~service.storage_scp.StorageSCP`), the transfer syntaxes the pipeline can decode,
TLS, who may associate, and the recovery of acknowledged but unrecorded spool files at
start (:mod:`service.spool_recovery`).

Associations are accepted only from ``dicom.allowed_callers`` (and ``allowed_hosts`` when
set): others get an A-ASSOCIATE-RJ, permanent, "calling AE title not recognised".

With a :class:`~service.metrics.NodeMetrics`, stored instances and bytes, refused
C-STOREs (by status) and rejected associations (by reason) are counted.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from multiprocessing.reduction import recv_handle
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

from service.config import DicomSettings, StorageSettings, TlsSettings
from service.ingest_recorder import BatchRecorder
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
from service.listener_process import (
    ID_BITS,
    ChildSpec,
    Forward,
    ForwardedMetrics,
    ListenerProcesses,
)
from service.metrics import NodeMetrics
from service.spool_recovery import recover_spool
from service.storage_scp import AssociationInfo, StorageSCP
from service.store import JobStore, RetryPolicy

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
    first_association_id
        Association ids count up from here (a child listener process's range).
    recover
        Record acknowledged but unrecorded spool files at start (the parent does it
        before child listener processes start).
    listen
        Bind the port (``False`` in a child listener process: its connections come from
        :meth:`serve_connection`).
    on_closed
        Called when a connection served here ends (a child's balance report).
    """

    def __init__(
        self,
        dicom: DicomSettings,
        storage: StorageSettings,
        store: JobStore,
        *,
        listener: AssociationListener | None = None,
        metrics: NodeMetrics | None = None,
        first_association_id: int = 0,
        recover: bool = True,
        listen: bool = True,
        on_closed: Callable[[], None] | None = None,
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
        self.first_association_id = first_association_id
        self.recover = recover
        self.listen = listen
        self.on_closed = on_closed
        self._children: ListenerProcesses | None = None
        self._scp: StorageSCP | None = None
        self._recorder: BatchRecorder | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Record what a crash left in the spool, bind the listener and serve.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, bad interface).
        """
        if self._scp is not None:
            raise RuntimeError("the receiver is already running")
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.recover:
            recover_spool(self.spool_dir, self.store, self._handler)
        ssl_context = make_ssl_context(self.dicom.tls) if self.dicom.tls.enabled else None
        recorder = BatchRecorder(self.store, self.listener)
        recorder.start()
        scp = StorageSCP(
            self._handler,
            recorder,
            sop_classes=SUPPORTED_SOP_CLASSES,
            transfer_syntaxes=[str(s) for s in SUPPORTED_TRANSFER_SYNTAXES],
            allowed_callers=None if self.dicom.allow_any_caller else self.dicom.allowed_callers,
            allowed_hosts=self.dicom.allowed_hosts,
            max_associations=self.dicom.max_associations,
            max_pdu=self.dicom.max_pdu,
            acse_timeout_s=self.dicom.acse_timeout_s,
            network_timeout_s=self.dicom.network_timeout_s,
            ssl_context=ssl_context,
            metrics=self.metrics,
            on_refused=self._count_refused,
            first_association_id=self.first_association_id,
            on_closed=self.on_closed,
        )
        address = (self.dicom.bind_address, self.dicom.port) if self.listen else None
        try:
            scp.start(address)
        except OSError:
            recorder.stop()
            raise
        self._scp, self._recorder = scp, recorder
        if self.dicom.listener_processes > 1:
            children = ListenerProcesses(
                self.dicom.listener_processes - 1,
                self.dicom,
                self.storage,
                self.store.engine.url.render_as_string(hide_password=False),
                listener=self.listener,
                metrics=self.metrics,
                child_main=serve_child_listener,
            )
            try:
                children.start()
            except BaseException:
                self.stop()
                raise
            self._children = children
            scp.open_elsewhere = children.open_connections
            scp.dispatch = lambda conn: children.dispatch(conn, scp.open_count)
        if not self.listen:
            return
        logger.info(
            "DICOM listener %s on %s:%d%s",
            self.dicom.ae_title,
            *self.address,
            " (TLS)" if ssl_context else "",
        )

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let open associations end for up to `grace` seconds, abort the
        rest (an instance not yet acknowledged is then resent by its peer), and record
        what is queued."""
        scp, self._scp = self._scp, None
        if scp is None:
            return
        if self._children is not None:
            self._children.stop()
            self._children = None
        scp.stop(grace)
        if self._recorder is not None:
            self._recorder.stop()
            self._recorder = None
        logger.info("DICOM listener stopped")

    def serve_connection(self, conn: socket.socket) -> None:
        """Serve a connection another process accepted (a child listener process)."""
        if self._scp is None:
            conn.close()
            return
        self._scp.serve_connection(conn)

    @property
    def associations(self) -> list[AssociationInfo]:
        """The open associations (and connections not yet associated)."""
        return [] if self._scp is None else self._scp.associations

    @property
    def address(self) -> tuple[str, int]:
        """The bound address and port (the real port when configured as 0)."""
        if self._scp is None:
            raise RuntimeError("the receiver is not running")
        return self._scp.address

    @property
    def port(self) -> int:
        """The bound TCP port."""
        return self.address[1]

    @property
    def is_bound(self) -> bool:
        """Whether the listening socket is open and its accepting thread alive."""
        return (
            self._scp is not None
            and self._scp.is_bound
            and (self._children is None or self._children.alive)
        )

    def _count_refused(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.instances_refused.labels(status=f"0x{status:04X}").inc()

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


def serve_child_listener(
    spec: ChildSpec, events: Any, ready: Any, stop: Any, connections: Any
) -> None:
    """A child listener process (:mod:`service.listener_process`): serve the connections the
    receiver's process passes on `connections` until `stop` is set."""
    logging.basicConfig(
        level=spec.log_level,
        format=f"%(asctime)s listener-{spec.index} %(levelname)s %(name)s: %(message)s",
    )
    store = JobStore(spec.database_url, retry=RetryPolicy())
    dicom = spec.dicom.model_copy(update={"listener_processes": 1})
    receiver = Receiver(
        dicom,
        spec.storage,
        store,
        listener=Forward(events),
        metrics=ForwardedMetrics(events),  # type: ignore[arg-type]
        first_association_id=spec.index << ID_BITS,
        recover=False,
        listen=False,
        on_closed=lambda: events.put(("closed", spec.index, None)),
    )
    receiver.start()
    parent = os.getppid()

    def receive_connections() -> None:
        while True:
            try:
                fd = recv_handle(connections)
            except (EOFError, OSError):
                return
            receiver.serve_connection(socket.socket(fileno=fd))

    def watch_parent() -> None:
        # A parent killed (kill -9, OOM) leaves no one to stop this process: it goes too,
        # like the parent, and what its recorder had queued is recovered at the next start.
        while not stop.wait(0.5):
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=receive_connections, name="connections", daemon=True).start()
    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    ready.set()
    try:
        stop.wait()
    finally:
        receiver.stop()
        store.close()
        events.put(("stopped", spec.index, None))
