"""A fix for a race in pynetdicom 3.0's requestor: a response its reactor thread takes.

``Association.send_c_store()`` (and every ``send_*``) pauses the association's reactor
thread, sends the request and waits for the response on the DIMSE queue. The pause is a
handshake (``_reactor_checkpoint`` cleared, then ``_is_paused`` awaited) that the reactor
can pass just before it takes effect: it then takes the response off the queue itself,
finds it is not a request, logs "Received unexpected C-STORE service message" and drops
it, and the ``send_*`` call waits for its DIMSE timeout and aborts. A peer that answers
within a millisecond (the node's own listener, a fast PACS) meets it now and then; the
2,000-slice test met it under load.

:func:`install` wraps ``Association._serve_request`` so that a response the reactor took
while a ``send_*`` call is waiting (the checkpoint is cleared only then) goes back on the
queue that call reads; everything else goes to pynetdicom as before. The node installs it
wherever it uses pynetdicom as a requestor (:mod:`service.sender`, :mod:`service.assembly`).
"""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association

__all__ = ["install"]

_MARK = "_unict_response_race_fixed"


def install() -> None:
    """Patch ``Association._serve_request`` once per process (idempotent)."""
    original = Association._serve_request
    if getattr(original, _MARK, False):
        return

    def serve_request(self: Association, msg: Any, context_id: int) -> None:
        waiting = not self._reactor_checkpoint.is_set()  # a send_*() call awaits a response
        if waiting and not msg.is_valid_request and not self._sent_release:
            self.dimse.msg_queue.put((context_id, msg))
            return
        original(self, msg, context_id)

    setattr(serve_request, _MARK, True)
    Association._serve_request = serve_request  # type: ignore[method-assign]
