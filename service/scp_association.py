"""One association's state on the Storage SCP, and a C-STORE's object as it arrives."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import socket
import tempfile
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

from service.spool_write import write_all
from service.ul_pdu import APPLICATION_CONTEXT, AssociateRequest, Command, abort_pdu

__all__ = [
    "SPILL_BYTES",
    "VERIFICATION",
    "Association",
    "AssociationInfo",
    "Message",
    "Refused",
    "admit",
    "await_close",
    "negotiate",
]

#: A dataset larger than this is collected in a file in the spool's ``.incoming`` folder
#: instead of memory (an Enhanced CT of hundreds of frames).
SPILL_BYTES = 64 * 2**20


@dataclass(frozen=True)
class AssociationInfo:
    """An open association, as :attr:`StorageSCP.associations` lists it."""

    id: int
    calling_ae: str
    address: str
    established: bool


class Association:
    """One connection's thread state."""

    def __init__(self, sock: socket.socket, address: str, key: int) -> None:
        self.sock = sock
        self.address = address
        self.id = key
        self.calling_ae = ""
        self.established = False
        self.released = False
        self.ended = False
        self.send_lock = threading.Lock()
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 0

    def send(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def abort(self) -> None:
        """Send an A-ABORT and close the connection (from any thread)."""
        with contextlib.suppress(OSError):
            self.send(abort_pdu())
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Message:
    """A C-STORE's Part 10 object as its fragments arrive: in memory, or in a file once large."""

    def __init__(self, context_id: int, command: Command, meta: bytes, spool_dir: Path) -> None:
        self.context_id = context_id
        self.command = command
        self.parts: list[bytes | memoryview] = [meta]
        self.digest = hashlib.sha256(meta)  # fed as fragments arrive (the spool name's hash)
        self.size = len(meta)
        self.spool_dir = spool_dir
        self.spill: tuple[int, Path] | None = None

    def add(self, fragment: memoryview) -> None:
        self.size += len(fragment)
        self.digest.update(fragment)
        if self.spill is not None:
            write_all(self.spill[0], fragment)
            return
        self.parts.append(fragment)
        if self.size > SPILL_BYTES:
            folder = self.spool_dir / ".incoming"
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=folder, prefix=".spill-", suffix=".part")
            self.spill = (fd, Path(name))
            for part in self.parts:
                write_all(fd, part)
            self.parts = []

    def data(self) -> bytes:
        """The whole object, when it stayed in memory."""
        return b"".join(self.parts)

    def spilled(self) -> Path | None:
        """The file the object was collected in (closed), or ``None``."""
        if self.spill is None:
            return None
        fd, path = self.spill
        os.close(fd)
        self.spill = None
        self.parts = []
        return path

    def close(self) -> None:
        self.parts = []
        if self.spill is not None:
            fd, path = self.spill
            os.close(fd)
            path.unlink(missing_ok=True)
            self.spill = None


def await_close(sock: socket.socket, timeout: float) -> None:
    """After an A-RELEASE-RP or A-ASSOCIATE-RJ, let the requestor close (PS3.8 §9.1.5)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (OSError, TimeoutError):
        pass


VERIFICATION = "1.2.840.10008.1.1"
_VERIFICATION_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def negotiate(
    request: AssociateRequest, sop_classes: Collection[str], transfer_syntaxes: Sequence[str]
) -> tuple[list[tuple[int, int, str]], dict[int, tuple[str, str]]]:
    """The A-ASSOCIATE-AC's answer to each proposed presentation context (ID, result,
    transfer syntax; PS3.8 §9.3.3.2), and the accepted ones (ID → abstract syntax, syntax).

    A storage SOP class of `sop_classes` or Verification is accepted with the first
    transfer syntax of the requestor's list that the node accepts; others are answered
    "abstract syntax not supported" (3) or "transfer syntaxes not supported" (4).
    """
    results: list[tuple[int, int, str]] = []
    accepted: dict[int, tuple[str, str]] = {}
    for context in request.contexts:
        if context.abstract_syntax == VERIFICATION:
            offered: Sequence[str] = _VERIFICATION_SYNTAXES
        elif context.abstract_syntax in sop_classes:
            offered = transfer_syntaxes
        else:
            results.append((context.context_id, 3, ""))
            continue
        chosen = next((ts for ts in context.transfer_syntaxes if ts in offered), None)
        if chosen is None:
            results.append((context.context_id, 4, ""))
            continue
        accepted[context.context_id] = (context.abstract_syntax, chosen)
        results.append((context.context_id, 0, chosen))
    return results, accepted


class Refused(Exception):
    """An association to reject: the A-ASSOCIATE-RJ's (result, source, reason) and the
    metrics label."""

    def __init__(self, result: int, source: int, reason: int, label: str) -> None:
        super().__init__(label)
        self.rj = (result, source, reason)
        self.label = label


def admit(
    request: AssociateRequest,
    address: str,
    *,
    hosts: Sequence[IPv4Network | IPv6Network] | None,
    allowed_callers: Collection[str] | None,
    busy: bool,
) -> None:
    """Raise :class:`Refused` when the association from `address` is not accepted
    (PS3.8 §9.3.4): a host or calling AE title not allowed, a protocol version or
    application context the node does not speak, or the association limit reached."""
    if hosts is not None:
        try:
            ip = ipaddress.ip_address(address)
            allowed = any(ip in net for net in hosts)
        except ValueError:
            allowed = False
        if not allowed:
            raise Refused(1, 1, 3, "host")
    if not request.protocol_version & 1:
        raise Refused(1, 2, 2, "other")
    if request.application_context != APPLICATION_CONTEXT:
        raise Refused(1, 1, 2, "other")
    if allowed_callers is not None and request.calling_ae not in allowed_callers:
        raise Refused(1, 1, 3, "calling_ae")
    if busy:
        raise Refused(2, 3, 2, "busy")
