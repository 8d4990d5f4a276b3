"""The node's Storage SCP server: associations accepted and served on plain sockets.

One thread accepts connections; each association gets a thread that reads PDUs
(:mod:`service.ul_pdu`), collects a C-STORE's dataset fragments into memory (spilling to
a file past :data:`SPILL_BYTES`), hands the whole Part 10 object to the
:class:`~service.instance_handler.InstanceHandler` and writes the response. Between the
last fragment and the response there is only the header check, the hash, one write, the
file's and its folder's ``fsync``; the job-store row follows in a batch
(:mod:`service.ingest_recorder`). It replaces pynetdicom's acceptor on the receive path
because per instance that one spends more Python time in its state machine than the whole
of DCMTK's storescp takes (``BENCHMARKS.md``, issue 18); pynetdicom stays the node's SCU.

What it does as an acceptor (PS3.8):

- A-ASSOCIATE-RQ within ``acse_timeout_s`` of the connection (the ARTIM timer), else the
  connection is closed; TLS handshakes in the same time;
- A-ASSOCIATE-RJ, permanent, "calling AE title not recognised" (1, 1, 3) for a caller not
  in ``allowed_callers`` or a host not in ``allowed_hosts``; "application context name
  not supported" (1, 1, 2); "protocol version not supported" (1, 2, 2); transient, "local
  limit exceeded" (2, 3, 2) past ``max_associations``;
- presentation contexts: the storage SOP classes and Verification, each with the first
  transfer syntax of the requestor's list that the node can decode; others are answered
  "abstract syntax not supported" (3) or "transfer syntaxes not supported" (4);
- C-STORE-RQ and C-ECHO-RQ; any other command, a malformed PDU or PDV, or a PDU out of
  place aborts the association (A-ABORT, service provider);
- A-RELEASE-RQ: every instance of the association recorded, then A-RELEASE-RP;
- an association idle for ``network_timeout_s`` is aborted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection

from service.ingest_recorder import BatchRecorder
from service.instance_handler import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
    InstanceHandler,
)
from service.metrics import NodeMetrics
from service.scp_association import (
    SPILL_BYTES,
    VERIFICATION,
    Association,
    AssociationInfo,
    Message,
    Refused,
    admit,
    await_close,
    negotiate,
)
from service.ul_pdu import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    P_DATA_TF,
    AssociateRequest,
    Command,
    ConnectionClosed,
    ProtocolError,
    associate_ac,
    associate_rj,
    command_response,
    file_meta,
    iter_pdvs,
    p_data_tf,
    parse_associate_rq,
    parse_command,
    read_pdu,
    release_rp,
)

__all__ = ["SPILL_BYTES", "VERIFICATION", "AssociationInfo", "StorageSCP"]

logger = logging.getLogger(__name__)


#: Room for PDV headers beyond the announced maximum PDU length: DCMTK and pynetdicom both
#: count the maximum as the PDV's size; some senders count it as the fragment's.
_PDU_SLACK = 1024


class StorageSCP:
    """Accept associations and serve C-STORE and C-ECHO.

    Parameters
    ----------
    ae_title
        The node's AE title (sent back in the A-ASSOCIATE-AC; any called AE is accepted).
    handler
        Checks and spools each instance.
    recorder
        Writes the job-store rows in batches and passes association ends on, in order.
    sop_classes, transfer_syntaxes
        The storage SOP classes and the transfer syntaxes accepted.
    allowed_callers
        Calling AE titles accepted; ``None``: any.
    allowed_hosts
        Networks connections are accepted from; ``None``: any.
    ssl_context
        TLS for every connection when set.
    """

    def __init__(
        self,
        handler: InstanceHandler,
        recorder: BatchRecorder,
        *,
        sop_classes: Collection[str],
        transfer_syntaxes: Collection[str],
        allowed_callers: Collection[str] | None,
        allowed_hosts: Collection[str] | None = None,
        max_associations: int = 10,
        max_pdu: int = 65536,
        acse_timeout_s: float = 10.0,
        network_timeout_s: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        metrics: NodeMetrics | None = None,
        on_refused: Callable[[int], None] | None = None,
        first_association_id: int = 0,
        dispatch: Callable[[socket.socket], bool] | None = None,
        open_elsewhere: Callable[[], int] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.handler = handler
        self.recorder = recorder
        self.sop_classes = frozenset(sop_classes)
        self.transfer_syntaxes = tuple(transfer_syntaxes)
        self.allowed_callers = None if allowed_callers is None else frozenset(allowed_callers)
        self.hosts = (
            None
            if allowed_hosts is None
            else tuple(ipaddress.ip_network(h, strict=False) for h in allowed_hosts)
        )
        self.max_associations = max_associations
        self.max_pdu = max_pdu
        self.acse_timeout_s = acse_timeout_s
        self.network_timeout_s = network_timeout_s
        self.ssl_context = ssl_context
        self.metrics = metrics
        self.on_refused = on_refused
        self._sock: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._open: dict[int, tuple[Association, threading.Thread]] = {}
        self._ids = itertools.count(first_association_id + 1)
        self.dispatch = dispatch
        self.open_elsewhere = open_elsewhere
        self.on_closed = on_closed

    # ------------------------------------------------------------ lifecycle

    def start(self, address: tuple[str, int] | None) -> None:
        """Bind and listen at `address`; accept in a background thread. ``None``: serve only
        the connections passed to :meth:`serve_connection` (a listener process).

        Raises
        ------
        OSError
            The address cannot be bound.
        """
        self._stopping.clear()
        if address is None:  # a listener process: connections come from serve_connection
            return
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.2)
        self._sock = sock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="StorageSCP-accept", daemon=True
        )
        self._accept_thread.start()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give open associations `grace` seconds to end, abort the rest."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=10)
            self._accept_thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            closing = [a for a, _ in self._open.values() if not a.established or a.released]
        for assoc in closing:  # not associated, rejected or released: nothing to wait for
            with contextlib.suppress(OSError):
                assoc.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                threads = [t for _, t in self._open.values()]
            if not threads:
                break
            threads[0].join(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        with self._lock:
            left = list(self._open.values())
        for assoc, _ in left:
            logger.warning("aborting association %d still open after %.1f s", assoc.id, grace)
            assoc.abort()
        for _, thread in left:
            thread.join(timeout=5)

    @property
    def address(self) -> tuple[str, int]:
        """The bound address and port."""
        if self._sock is None:
            raise RuntimeError("the Storage SCP is not running")
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def is_bound(self) -> bool:
        """Whether the listening socket is open and its accepting thread alive."""
        sock, thread = self._sock, self._accept_thread
        return sock is not None and sock.fileno() >= 0 and thread is not None and thread.is_alive()

    @property
    def associations(self) -> list[AssociationInfo]:
        """The open associations (and connections not yet associated)."""
        with self._lock:
            return [
                AssociationInfo(a.id, a.calling_ae, a.address, a.established)
                for a, _ in self._open.values()
            ]

    # ------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                logger.warning("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            try:
                if self.dispatch is not None and self.dispatch(conn):
                    conn.close()  # passed to another listener process, which has its copy
                    continue
            except OSError as exc:
                logger.warning("connection not passed on, served here: %s", exc)
            self.serve_connection(conn, str(peer[0]))

    def serve_connection(self, conn: socket.socket, address: str | None = None) -> None:
        """Serve an accepted connection (here, or passed from the accepting process)."""
        if self._stopping.is_set():
            conn.close()
            return
        if address is None:
            try:
                address = str(conn.getpeername()[0])
            except OSError:
                conn.close()
                return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = next(self._ids)
        assoc = Association(conn, address, key)
        thread = threading.Thread(
            target=self._serve, args=(assoc,), name=f"StorageSCP-assoc-{key}", daemon=True
        )
        with self._lock:
            self._open[key] = (assoc, thread)
        thread.start()

    @property
    def open_count(self) -> int:
        """Connections served here now (associated or not)."""
        with self._lock:
            return len(self._open)

    def _refuse(self, label: str) -> None:
        if self.metrics is not None:
            self.metrics.associations_refused.labels(reason=label).inc()

    # ------------------------------------------------------------ one association

    def _serve(self, assoc: Association) -> None:
        try:
            self._run(assoc)
        except ConnectionClosed:
            logger.debug("association %d: connection closed by the peer", assoc.id)
        except ProtocolError as exc:
            logger.warning("association %d aborted: %s", assoc.id, exc)
            assoc.abort()
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            logger.warning("association %d ended: %s", assoc.id, exc)
            assoc.abort()
        except Exception:
            logger.exception("association %d: unexpected error, aborted", assoc.id)
            assoc.abort()
        finally:
            with contextlib.suppress(OSError):
                assoc.sock.close()
            self._ended(assoc)
            with self._lock:
                self._open.pop(assoc.id, None)
            if self.on_closed is not None:
                self.on_closed()

    def _ended(self, assoc: Association) -> None:
        if assoc.established and not assoc.ended:
            assoc.ended = True
            self.recorder.association_ended(assoc.id, released=assoc.released)

    def _run(self, assoc: Association) -> None:
        assoc.sock.settimeout(self.acse_timeout_s)
        if self.ssl_context is not None:
            assoc.sock = self.ssl_context.wrap_socket(assoc.sock, server_side=True)
        pdu_type, body = read_pdu(assoc.sock, 0)
        if pdu_type != A_ASSOCIATE_RQ:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} before an association request")
        request = parse_associate_rq(body)
        assoc.calling_ae = request.calling_ae
        try:
            self._admit(assoc, request)
        except Refused as refused:
            logger.warning(
                "association from %s (%s) rejected: %s",
                assoc.address,
                request.calling_ae,
                refused.label,
            )
            self._refuse(refused.label)
            assoc.send(associate_rj(*refused.rj))
            await_close(assoc.sock, self.acse_timeout_s)
            return
        assoc.peer_max_pdu = request.max_pdu
        results, assoc.contexts = negotiate(request, self.sop_classes, self.transfer_syntaxes)
        assoc.send(associate_ac(request, results, self.max_pdu))
        assoc.established = True
        assoc.sock.settimeout(self.network_timeout_s)
        self._receive(assoc)

    def _admit(self, assoc: Association, request: AssociateRequest) -> None:
        with self._lock:
            established = sum(1 for a, _ in self._open.values() if a.established)
        if self.open_elsewhere is not None:  # the other listener processes' connections
            established += self.open_elsewhere()
        admit(
            request,
            assoc.address,
            hosts=self.hosts,
            allowed_callers=self.allowed_callers,
            busy=established >= self.max_associations,
        )

    def _receive(self, assoc: Association) -> None:
        limit = self.max_pdu + _PDU_SLACK if self.max_pdu else 0
        command_parts: list[bytes] = []
        message: Message | None = None
        while True:
            try:
                pdu_type, body = read_pdu(assoc.sock, limit)
            except TimeoutError:
                raise ProtocolError(
                    f"no PDU for {self.network_timeout_s:.0f} s (network timeout)"
                ) from None
            if pdu_type == A_RELEASE_RQ:
                if message is not None or command_parts:
                    raise ProtocolError("A-RELEASE-RQ in the middle of a message")
                if not self.recorder.flush():
                    logger.error("association %d: rows not recorded before release", assoc.id)
                assoc.send(release_rp())
                assoc.released = True
                self._ended(assoc)
                await_close(assoc.sock, self.acse_timeout_s)
                return
            if pdu_type == A_ABORT:
                logger.info("association %d aborted by the peer", assoc.id)
                return
            if pdu_type != P_DATA_TF:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            for context_id, control, fragment in iter_pdvs(body):
                if context_id not in assoc.contexts:
                    raise ProtocolError(f"PDV on presentation context {context_id} not accepted")
                if control & 0x01:  # command
                    if message is not None:
                        raise ProtocolError("command fragment inside a dataset")
                    command_parts.append(bytes(fragment))
                    if control & 0x02:
                        command = parse_command(b"".join(command_parts))
                        command_parts = []
                        message = self._command(assoc, context_id, command)
                else:
                    if message is None or context_id != message.context_id:
                        raise ProtocolError("dataset fragment without its command")
                    message.add(fragment)
                    if control & 0x02:
                        self._store(assoc, message)
                        message = None

    def _command(self, assoc: Association, context_id: int, command: Command) -> Message | None:
        if command.command_field == C_ECHO_RQ:
            if command.has_dataset:
                raise ProtocolError("C-ECHO-RQ with a dataset")
            self._respond(
                assoc, context_id, C_ECHO_RSP, command.message_id, STATUS_SUCCESS, VERIFICATION
            )
            return None
        if command.command_field != C_STORE_RQ:
            raise ProtocolError(f"DIMSE command 0x{command.command_field:04X} not supported")
        if not command.has_dataset:
            raise ProtocolError("C-STORE-RQ without a dataset")
        _, syntax = assoc.contexts[context_id]
        meta = file_meta(
            command.affected_sop_class, command.affected_sop_instance, syntax, assoc.calling_ae
        )
        return Message(context_id, command, meta, self.handler.spool_dir)

    def _respond(
        self,
        assoc: Association,
        context_id: int,
        command_field: int,
        message_id: int,
        status: int,
        sop_class: str,
        sop_instance: str = "",
    ) -> None:
        rsp = command_response(command_field, message_id, status, sop_class, sop_instance)
        assoc.send(p_data_tf(context_id, rsp, assoc.peer_max_pdu))

    def _store(self, assoc: Association, message: Message) -> None:
        command = message.command
        try:
            spilled = message.spilled()
            if spilled is None:
                status = self.handler.store_received(
                    message.data(),
                    caller=assoc.calling_ae,
                    connection=assoc.id,
                    requested_class=command.affected_sop_class,
                    requested_instance=command.affected_sop_instance,
                    recorder=self.recorder,
                    sha256=message.digest.hexdigest(),
                ).status
            else:
                try:
                    status = self.handler.store_file(
                        spilled,
                        caller=assoc.calling_ae,
                        connection=assoc.id,
                        requested_class=command.affected_sop_class,
                        requested_instance=command.affected_sop_instance,
                    ).status
                finally:
                    spilled.unlink(missing_ok=True)
        except OSError as exc:
            logger.error("association %d: instance not stored: %s", assoc.id, exc)
            status = STATUS_OUT_OF_RESOURCES
        finally:
            message.close()
        if status != STATUS_SUCCESS and self.on_refused is not None:
            self.on_refused(status)
        self._respond(
            assoc,
            message.context_id,
            C_STORE_RSP,
            command.message_id,
            status,
            command.affected_sop_class,
            command.affected_sop_instance,
        )
