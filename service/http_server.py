"""Serving an ASGI app (the HTTP API of :mod:`service.http`) with uvicorn in a thread."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.config import TlsSettings

__all__ = ["ServerThread"]

logger = logging.getLogger(__name__)


class ServerThread:
    """An ASGI app served by uvicorn in a daemon thread, with its own event loop.

    uvicorn installs no signal handlers outside the main thread, so the process keeps its
    own SIGTERM handling (``serve``'s, or procrastinate's in ``worker``).

    Parameters
    ----------
    app
        The application (:func:`create_app`).
    host, port
        Where to listen (port 0: any free port; :attr:`port` says which).
    tls
        ``http.tls``: HTTPS when enabled.
    """

    def __init__(
        self, app: FastAPI, host: str, port: int, *, tls: TlsSettings | None = None
    ) -> None:
        self.host = host
        self._wanted_port = port
        options: dict[str, Any] = {}
        if tls is not None and tls.enabled:
            # HTTPS; with ca_file, client certificates are verified and their CN reaches
            # the STOW-RS allow-list (required with require_client_cert).
            from service.dicomweb.peer_certificate import PeerCertificateProtocol

            options = {
                "ssl_certfile": str(tls.cert_file),
                "ssl_keyfile": str(tls.key_file),
                "ssl_ca_certs": None if tls.ca_file is None else str(tls.ca_file),
                "ssl_cert_reqs": (
                    ssl.CERT_REQUIRED
                    if tls.require_client_cert
                    else ssl.CERT_OPTIONAL
                    if tls.ca_file is not None
                    else ssl.CERT_NONE
                ),
                "http": PeerCertificateProtocol,
            }
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; return once the socket is bound.

        Raises
        ------
        RuntimeError
            The server could not bind (see the log) or did not start within `timeout`.
        """
        server = self._server

        def serve() -> None:
            try:
                server.run()
            except SystemExit:
                # uvicorn exits the process when it cannot bind; here that ends only its
                # thread, and start() reports it.
                logger.error("HTTP API stopped at start-up")

        thread = threading.Thread(target=serve, name="unict-http", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(
                    f"HTTP API could not start on {self.host}:{self._wanted_port} (see the log)"
                )
            if time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("HTTP API did not start in time")
            time.sleep(0.01)
        self._thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        if self._thread is None or not self._server.servers:
            raise RuntimeError("the HTTP API is not running")
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (requests in flight finish) and wait up to `timeout` for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
