"""The subject CN of an HTTPS client's verified certificate, for the STOW-RS allow-list.

uvicorn does not put the peer certificate in the ASGI scope. :class:`PeerCertificateProtocol`
(uvicorn's h11 protocol) reads it once the TLS handshake is done and adds its subject CN to
the connection's lifespan state, which uvicorn copies into every request's
``scope["state"]`` (Starlette's ``request.state``), under :data:`TLS_CLIENT_CN`. Only a
certificate the server verified against ``http.tls.ca_file`` is there: with
``CERT_OPTIONAL`` or ``CERT_REQUIRED`` an unverifiable one fails the handshake.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["TLS_CLIENT_CN", "PeerCertificateProtocol", "subject_cn"]

TLS_CLIENT_CN = "tls_client_cn"


def subject_cn(certificate: dict[str, Any] | None) -> str | None:
    """The commonName of a certificate as :meth:`ssl.SSLSocket.getpeercert` returns it."""
    for rdn in (certificate or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class PeerCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, with the client certificate's CN in each request's state."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        cn = subject_cn(ssl_object.getpeercert()) if ssl_object is not None else None
        if cn is not None:
            # a copy per connection: the shared lifespan state is left alone
            self.app_state = {**self.app_state, TLS_CLIENT_CN: cn}
