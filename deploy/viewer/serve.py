"""Serve the prebuilt OHIF viewer and the PACS's DICOMweb from one loopback origin.

    python deploy/viewer/serve.py --dist .cache/viewer/ohif/dist \
        --dicomweb http://127.0.0.1:8042/dicom-web --port 3000
    # PACS credentials from the environment, never on the command line:
    #   UNICT_VIEWER_PACS_USER, UNICT_VIEWER_PACS_PASSWORD

- ``/app-config.js`` is ours (``app-config.js`` next to this file, or ``--app-config``):
  one DICOMweb data source at ``/dicom-web`` on the same origin;
- ``/dicom-web/...`` is forwarded to the PACS's DICOMweb root (Orthanc's DICOMweb plugin)
  with HTTP basic authentication added here, so the browser never holds the credentials;
- any other path is a file of OHIF's ``dist/``, and unknown paths (the viewer's own
  routes such as ``/viewer?StudyInstanceUIDs=...``) get its ``index.html``.

Only loopback addresses are accepted, for both the listening socket and the PACS: this
is a reader's or an admin's local harness, not a web server for a network. The viewer
is OHIF's own build from npm (``deploy/viewer/install.sh`` fetches the pinned version).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route

logger = logging.getLogger("unict.viewer")

HERE = Path(__file__).resolve().parent
USER_ENV = "UNICT_VIEWER_PACS_USER"
PASSWORD_ENV = "UNICT_VIEWER_PACS_PASSWORD"
# Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "authorization",
    "cookie",
    "content-length",
}
_DROP_RESPONSE = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "www-authenticate",
    "set-cookie",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    dist: Path,
    dicomweb: str,
    *,
    user: str | None = None,
    password: str | None = None,
    app_config: Path | None = None,
    timeout_s: float = 120.0,
) -> Starlette:
    """The viewer's ASGI app.

    Parameters
    ----------
    dist
        OHIF's ``dist/`` folder (``index.html``, bundles, wasm).
    dicomweb
        The PACS's DICOMweb root on loopback, e.g. ``http://127.0.0.1:8042/dicom-web``.
    user, password
        HTTP basic credentials for the PACS; none when both are ``None``.
    app_config
        The ``app-config.js`` to serve; ``deploy/viewer/app-config.js`` by default.
    timeout_s
        Per-request timeout towards the PACS.

    Raises
    ------
    ValueError
        If ``dist`` has no ``index.html`` or ``dicomweb`` is not on a loopback address.
    """
    dist = dist.resolve()
    index = dist / "index.html"
    if not index.is_file():
        raise ValueError(f"{dist} is not OHIF's dist/ folder (no index.html)")
    target = urlsplit(dicomweb.rstrip("/"))
    if target.scheme not in ("http", "https") or not is_loopback(target.hostname or ""):
        raise ValueError(f"--dicomweb must be an http(s) URL on a loopback address: {dicomweb}")
    root = dicomweb.rstrip("/")
    config_file = (app_config or HERE / "app-config.js").resolve()
    auth = httpx.BasicAuth(user, password or "") if user is not None else None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            auth=auth, timeout=timeout_s, follow_redirects=False
        ) as client:
            app.state.client = client
            yield

    async def config(request: Request) -> Response:
        return FileResponse(
            config_file, media_type="text/javascript", headers={"Cache-Control": "no-store"}
        )

    async def proxy(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        path = request.path_params["path"]
        url = f"{root}/{path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
        # Orthanc writes absolute BulkDataURIs from the Host it was asked on: keep the
        # browser's origin in them, so they come back through this proxy.
        headers["host"] = request.headers.get("host", target.netloc)
        headers["x-forwarded-host"] = headers["host"]
        headers["x-forwarded-proto"] = request.url.scheme
        upstream = client.build_request(
            request.method, url, headers=headers, content=await request.body()
        )
        response = await client.send(upstream, stream=True)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROP_RESPONSE}
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers=out_headers,
            background=BackgroundTask(response.aclose),
        )

    async def static(request: Request) -> Response:
        relative = request.path_params.get("path", "")
        candidate = (dist / relative).resolve()
        if relative and candidate.is_file() and candidate.is_relative_to(dist):
            return FileResponse(candidate)
        # The viewer's client-side routes (/viewer, /segmentation, ...) are index.html.
        return FileResponse(index, headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/app-config.js", config),
            Route(
                "/dicom-web/{path:path}",
                proxy,
                methods=["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"],
            ),
            Route("/{path:path}", static),
        ],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, required=True, help="OHIF's dist/ folder")
    parser.add_argument(
        "--dicomweb",
        default="http://127.0.0.1:8042/dicom-web",
        help="the PACS's DICOMweb root, on loopback (default: Orthanc's on 8042)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    parser.add_argument("--port", type=int, default=3000, help="port (0: any free one)")
    parser.add_argument("--app-config", type=Path, default=None, help="app-config.js to serve")
    parser.add_argument(
        "--ready-file",
        type=Path,
        default=None,
        help="write the bound port here once listening (for scripts and tests)",
    )
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        parser.error(f"--host must be a loopback address, got {args.host}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    user = os.environ.get(USER_ENV) or None
    password = os.environ.get(PASSWORD_ENV) or None
    try:
        app = create_app(
            args.dist, args.dicomweb, user=user, password=password, app_config=args.app_config
        )
    except ValueError as exc:
        parser.error(str(exc))
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # before the ready file: a client may connect as soon as it exists
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    logger.info("OHIF on http://%s:%d/ (DICOMweb -> %s)", args.host, port, args.dicomweb)
    if args.ready_file is not None:
        args.ready_file.write_text(str(port))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
