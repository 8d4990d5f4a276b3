"""deploy/viewer/serve.py without a browser: files, our app-config.js, the proxy, loopback only."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.conftest import OrthancFixture, wait_until
from tests.orthanc import PASSWORD, USER

SERVE = Path(__file__).resolve().parents[2] / "deploy" / "viewer" / "serve.py"


@pytest.fixture(scope="module")
def serve() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unict_viewer_serve", SERVE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def running(dist: Path, dicomweb: str, tmp_path: Path, **env: str) -> Iterator[httpx.Client]:
    """serve.py as an admin runs it, on a free port; a client on its origin."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ready = tmp_path / "port"
    process = subprocess.Popen(
        [
            *(sys.executable, str(SERVE), "--dist", str(dist), "--dicomweb", dicomweb),
            *("--port", "0", "--ready-file", str(ready)),
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = wait_until(
            lambda: process.poll() is None and ready.exists() and ready.read_text(),
            timeout=30,
            what="serve.py to listen",
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def dist(tmp_path: Path) -> Path:
    (tmp_path / "index.html").write_text("<html>OHIF</html>")
    (tmp_path / "app.bundle.js").write_text("console.log(1)")
    return tmp_path


def test_files_config_and_client_routes(dist: Path, tmp_path: Path) -> None:
    with running(dist, "http://127.0.0.1:9/dicom-web", tmp_path) as client:
        assert client.get("/app.bundle.js").text == "console.log(1)"
        config = client.get("/app-config.js")
        assert config.status_code == 200 and "/dicom-web" in config.text
        assert "window.config" in config.text
        # The viewer's own routes and unknown paths are index.html (a single-page app) ...
        assert client.get("/viewer?StudyInstanceUIDs=1.2.3").text == "<html>OHIF</html>"
        # ... and nothing outside dist/ is served.
        assert client.get("/%2e%2e/serve.py").text == "<html>OHIF</html>"


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8042/dicom-web", "http://example.org/dicom-web", "ftp://127.0.0.1/x"]
)
def test_refuses_a_pacs_off_loopback(serve: ModuleType, dist: Path, url: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        serve.create_app(dist, url)


def test_refuses_to_listen_off_loopback(serve: ModuleType, dist: Path) -> None:
    with pytest.raises(SystemExit):
        serve.main(["--dist", str(dist), "--host", "0.0.0.0"])


def test_requires_ohif_dist(serve: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"index\.html"):
        serve.create_app(tmp_path, "http://127.0.0.1:8042/dicom-web")


@pytest.mark.orthanc
def test_proxy_adds_the_pacs_credentials(
    dist: Path, orthanc: OrthancFixture, tmp_path: Path
) -> None:
    root = f"{orthanc.server.url}/dicom-web"
    credentials = {"UNICT_VIEWER_PACS_USER": USER, "UNICT_VIEWER_PACS_PASSWORD": PASSWORD}
    with running(dist, root, tmp_path, **credentials) as client:
        response = client.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"})
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), list)
    # Without credentials the PACS says no, and the proxy passes that on.
    bare = {k: "" for k in credentials}
    with running(dist, root, tmp_path / "bare", **bare) as client:
        assert client.get("/dicom-web/studies").status_code == 401
