"""The DICOM Upper Layer as an acceptor needs it: PDUs read and written, command sets coded.

The node's Storage SCP (:mod:`service.storage_scp`) speaks the Upper Layer protocol
(PS3.8 §9) itself instead of through pynetdicom's state machine: per instance that machine
spends about 5 ms of Python in its event queue and polling loop (``bench/bench_ingest.py``),
several times what DCMTK's ``storescp`` needs for the whole instance. What is here is only
what an acceptor of C-STORE and C-ECHO needs:

- reading one PDU from a socket (:func:`read_pdu`), with the announced maximum enforced;
- the A-ASSOCIATE-RQ decoded (:func:`parse_associate_rq`), the A-ASSOCIATE-AC, -RJ,
  A-RELEASE-RP, A-ABORT and P-DATA-TF encoded;
- the PDVs of a P-DATA-TF split (:func:`iter_pdvs`);
- DIMSE command sets (always Implicit VR Little Endian, PS3.7 §6.3.1) decoded to the few
  fields an SCP reads (:func:`parse_command`), and the C-STORE and C-ECHO responses encoded;
- the Part 10 file meta of a received dataset (:func:`file_meta`).

Anything malformed raises :class:`ProtocolError`; the association is then aborted.
"""

from __future__ import annotations

import socket
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "APPLICATION_CONTEXT",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION",
    "AssociateRequest",
    "Command",
    "PresentationContext",
    "ProtocolError",
    "abort_pdu",
    "associate_ac",
    "associate_rj",
    "command_response",
    "file_meta",
    "iter_pdvs",
    "p_data_tf",
    "parse_associate_rq",
    "parse_command",
    "read_pdu",
    "release_rp",
]

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
"""The DICOM Application Context Name (PS3.7 Annex A.2.1)."""

IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_DNS, 'unict-node.storage-scp').int}"
"""The node's Implementation Class UID: a UUID-derived UID (PS3.5 §B.2), stable by name."""
IMPLEMENTATION_VERSION = "UNICT_NODE_1"

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))

#: Largest A-ASSOCIATE-RQ accepted: generous (hundreds of presentation contexts) but bounded.
MAX_ASSOCIATE_RQ = 1 << 20
#: The command set of a DIMSE message is a few hundred bytes; more is not a command.
MAX_COMMAND_BYTES = 1 << 16

_HEADER = struct.Struct(">BBL")
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">LBB")


class ProtocolError(Exception):
    """A PDU or command set that cannot be decoded, or one that is out of place."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection (between PDUs or in the middle of one)."""


#: Linux's TCP_QUICKACK (12): acknowledge at once instead of up to 40 ms later.
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        if _QUICKACK is not None:
            # A sender with Nagle's algorithm on (DCMTK by default, pynetdicom) holds the
            # rest of a message until its first segment is acknowledged, and the receiver
            # delays that ACK (up to 40 ms) while it has nothing to answer yet: one stall
            # per instance. Quick ACKs are re-armed before every read (the kernel drops
            # the mode by itself).
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise ConnectionClosed("connection closed by the peer")
        got += n
    return buffer


def read_pdu(sock: socket.socket, max_length: int) -> tuple[int, bytearray]:
    """Read one PDU: its type and its body (what follows the 6-byte header).

    Parameters
    ----------
    max_length
        The largest body accepted for a P-DATA-TF (the maximum PDU length this side
        announced plus the PDV headers' slack; 0: no limit); other PDUs are bounded by
        :data:`MAX_ASSOCIATE_RQ`.

    Raises
    ------
    ConnectionClosed
        The peer closed the connection.
    ProtocolError
        An unknown PDU type or a length over the limit.
    """
    pdu_type, _, length = _HEADER.unpack(_recv_exact(sock, 6))
    if pdu_type not in PDU_TYPES:
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02X}")
    limit = max_length if pdu_type == P_DATA_TF and max_length else MAX_ASSOCIATE_RQ
    if length > limit:
        raise ProtocolError(f"PDU of {length} bytes over the limit of {limit}")
    return pdu_type, _recv_exact(sock, length)


# --------------------------------------------------------------------------- association


@dataclass(frozen=True)
class PresentationContext:
    """One presentation context proposed in an A-ASSOCIATE-RQ."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class AssociateRequest:
    """The fields of an A-ASSOCIATE-RQ an acceptor decides on (PS3.8 §9.3.2)."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: tuple[PresentationContext, ...]
    max_pdu: int
    """The requestor's Maximum Length Received (0: unlimited)."""
    implementation_class_uid: str = ""
    roles: tuple[tuple[str, int, int], ...] = field(default=())
    """SCP/SCU Role Selection items: (SOP class UID, SCU role, SCP role)."""
    raw_header: bytes = b""
    """Bytes 0-67 of the body, echoed in the A-ASSOCIATE-AC as PS3.8 §9.3.3 asks."""


def _uid(value: bytes | bytearray | memoryview) -> str:
    return bytes(value).decode("ascii", "replace").rstrip("\0 ")


def _items(body: memoryview) -> Iterator[tuple[int, memoryview]]:
    offset = 0
    while offset < len(body):
        if offset + 4 > len(body):
            raise ProtocolError("item header cut short")
        item_type, _, length = _ITEM.unpack_from(body, offset)
        end = offset + 4 + length
        if end > len(body):
            raise ProtocolError(f"item 0x{item_type:02X} runs past its PDU")
        yield item_type, body[offset + 4 : end]
        offset = end


def parse_associate_rq(body: bytearray) -> AssociateRequest:
    """Decode the body of an A-ASSOCIATE-RQ.

    Raises
    ------
    ProtocolError
        Fixed fields cut short or an item that runs past the PDU.
    """
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    view = memoryview(body)
    (version,) = struct.unpack_from(">H", view, 0)
    called = bytes(view[4:20]).decode("ascii", "replace").strip()
    calling = bytes(view[20:36]).decode("ascii", "replace").strip()
    application_context = ""
    contexts: list[PresentationContext] = []
    max_pdu = 0
    implementation = ""
    roles: list[tuple[str, int, int]] = []
    for item_type, value in _items(view[68:]):
        if item_type == 0x10:
            application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item cut short")
            abstract = ""
            syntaxes: list[str] = []
            for sub_type, sub in _items(value[4:]):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub))
            contexts.append(PresentationContext(value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x50:
            for sub_type, sub in _items(value):
                if sub_type == 0x51 and len(sub) == 4:
                    (max_pdu,) = struct.unpack(">L", sub)
                elif sub_type == 0x52:
                    implementation = _uid(sub)
                elif sub_type == 0x54 and len(sub) >= 4:
                    (uid_length,) = struct.unpack_from(">H", sub, 0)
                    if 2 + uid_length + 2 <= len(sub):
                        roles.append(
                            (
                                _uid(sub[2 : 2 + uid_length]),
                                sub[2 + uid_length],
                                sub[3 + uid_length],
                            )
                        )
    return AssociateRequest(
        protocol_version=version,
        called_ae=called,
        calling_ae=calling,
        application_context=application_context,
        contexts=tuple(contexts),
        max_pdu=max_pdu,
        implementation_class_uid=implementation,
        roles=tuple(roles),
        raw_header=bytes(view[:68]),
    )


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, 0, len(body)) + body


def _even(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def associate_ac(
    request: AssociateRequest,
    results: list[tuple[int, int, str]],
    max_pdu: int,
) -> bytes:
    """The A-ASSOCIATE-AC for `request`.

    Parameters
    ----------
    results
        Per proposed context: (context ID, result, accepted transfer syntax); result 0 is
        acceptance, 3 abstract syntax and 4 transfer syntaxes not supported (PS3.8 §9.3.3.2).
    max_pdu
        This side's Maximum Length Received.
    """
    items = [_item(0x10, APPLICATION_CONTEXT.encode("ascii"))]
    for context_id, result, syntax in results:
        sub = _item(0x40, syntax.encode("ascii")) if result == 0 else b""
        items.append(_item(0x21, bytes([context_id, 0, result, 0]) + sub))
    user = [
        _item(0x51, struct.pack(">L", max_pdu)),
        _item(0x52, IMPLEMENTATION_CLASS_UID.encode("ascii")),
    ]
    for sop_class, scu_role, _scp_role in request.roles:
        # The node is only ever the SCP of the storage it accepts: the requestor keeps its
        # SCU role as proposed, an SCP role it asks for is refused (PS3.7 §D.3.3.4).
        uid = sop_class.encode("ascii")
        user.append(_item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu_role & 1, 0])))
    user.append(_item(0x55, IMPLEMENTATION_VERSION.encode("ascii")))
    items.append(_item(0x50, b"".join(user)))
    return _pdu(A_ASSOCIATE_AC, request.raw_header + b"".join(items))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ: result 1 permanent / 2 transient, source and reason (PS3.8 §9.3.4)."""
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, reason]))


def release_rp() -> bytes:
    """An A-RELEASE-RP."""
    return _pdu(A_RELEASE_RP, b"\0\0\0\0")


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT: by the service provider (2), reason not specified (0) by default."""
    return _pdu(A_ABORT, bytes([0, 0, source, reason]))


# --------------------------------------------------------------------------- P-DATA


def iter_pdvs(body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The PDVs of a P-DATA-TF body: (context ID, message control header, fragment).

    Raises
    ------
    ProtocolError
        A PDV shorter than its header or running past the PDU.
    """
    view = memoryview(body)
    offset = 0
    while offset < len(view):
        if offset + 6 > len(view):
            raise ProtocolError("PDV header cut short")
        length, context_id, control = _PDV.unpack_from(view, offset)
        end = offset + 4 + length
        if length < 2 or end > len(view):
            raise ProtocolError(f"PDV of length {length} does not fit its PDU")
        yield context_id, control, view[offset + 6 : end]
        offset = end


def p_data_tf(context_id: int, command: bytes, max_pdu: int) -> bytes:
    """A command set as P-DATA-TF PDUs, fragmented to the peer's maximum (0: unlimited)."""
    room = len(command) if not max_pdu else max(1, max_pdu - 6)
    chunks = [command[i : i + room] for i in range(0, len(command), room)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        control = 0x01 | (0x02 if i == len(chunks) - 1 else 0)  # command; last fragment
        out.append(_pdu(P_DATA_TF, _PDV.pack(len(chunk) + 2, context_id, control) + chunk))
    return b"".join(out)


# --------------------------------------------------------------------------- DIMSE commands

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATASET = 0x0101

_ELEMENT = struct.Struct("<HHL")


@dataclass(frozen=True)
class Command:
    """The fields of a DIMSE request an SCP acts on (PS3.7 §9.3)."""

    command_field: int
    message_id: int
    affected_sop_class: str
    affected_sop_instance: str
    has_dataset: bool


def parse_command(data: bytes) -> Command:
    """Decode a command set (Implicit VR Little Endian, group 0000 only).

    Raises
    ------
    ProtocolError
        An element runs past the data, or Command Field or Message ID is missing.
    """
    if len(data) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command set of {len(data)} bytes")
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + 8 > len(data):
            raise ProtocolError("command element header cut short")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        end = offset + 8 + length
        if group != 0 or end > len(data):
            raise ProtocolError("command element out of group 0000 or past the command set")
        values[element] = data[offset + 8 : end]
        offset = end

    def us(element: int) -> int | None:
        raw = values.get(element)
        return struct.unpack("<H", raw)[0] if raw is not None and len(raw) == 2 else None

    command_field, message_id = us(0x0100), us(0x0110)
    if command_field is None or message_id is None:
        raise ProtocolError("command set without Command Field or Message ID")
    return Command(
        command_field=command_field,
        message_id=message_id,
        affected_sop_class=_uid(values.get(0x0002, b"")),
        affected_sop_instance=_uid(values.get(0x1000, b"")),
        has_dataset=us(0x0800) != NO_DATASET,
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0, element, len(value)) + value


def command_response(
    command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str = ""
) -> bytes:
    """A C-STORE-RSP or C-ECHO-RSP command set (PS3.7 §9.3.1.2, §9.3.5.2)."""
    body = [_element(0x0002, _even(sop_class))]
    body.append(_element(0x0100, struct.pack("<H", command_field)))
    body.append(_element(0x0120, struct.pack("<H", message_id)))
    body.append(_element(0x0800, struct.pack("<H", NO_DATASET)))
    body.append(_element(0x0900, struct.pack("<H", status)))
    if sop_instance:
        body.append(_element(0x1000, _even(sop_instance)))
    joined = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(joined))) + joined


# --------------------------------------------------------------------------- Part 10


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received dataset (PS3.10 §7.1)."""
    ae = source_ae.encode("ascii", "replace")[:16]
    version = IMPLEMENTATION_VERSION.encode("ascii")
    elements = b"".join(
        (
            _explicit(0x0001, b"OB", b"\0\1"),
            _explicit(0x0002, b"UI", _even(sop_class)),
            _explicit(0x0003, b"UI", _even(sop_instance)),
            _explicit(0x0010, b"UI", _even(transfer_syntax)),
            _explicit(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID)),
            _explicit(0x0013, b"SH", version + b" " * (len(version) % 2)),
            _explicit(0x0016, b"AE", ae + b" " * (len(ae) % 2)),
        )
    )
    length = _explicit(0x0000, b"UL", struct.pack("<L", len(elements)))
    return b"\0" * 128 + b"DICM" + length + elements
