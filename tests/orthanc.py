"""Start a real Orthanc for tests, on loopback, with a configuration of the test's own.

Orthanc 1.10 binds every interface (it has no bind-address option), so the configuration
keeps ``RemoteAccessAllowed`` false and authentication on, and tests only ever talk to
127.0.0.1. Readiness is polled over REST; stopping sends SIGTERM and waits
for the process, which takes a few seconds, before ports or storage are reused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from orthanc_api_client import OrthancApiClient

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BINARY",
    "OrthancServer",
    "orthanc_server",
    "skip_without_orthanc",
]

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER = "unict-test"
PASSWORD = "unict-test-password"

skip_without_orthanc = pytest.mark.skipif(
    not ORTHANC_BINARY.exists(),
    reason=f"{ORTHANC_BINARY} not installed (apt-get install orthanc orthanc-dicomweb)",
)


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc."""

    process: subprocess.Popen[bytes]
    http_port: int
    dicom_port: int
    aet: str
    client: OrthancApiClient
    log_path: Path

    @property
    def url(self) -> str:
        """Its REST root on loopback."""
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode} during start-up")
        try:
            response = httpx.get(f"{url}/system", auth=(USER, PASSWORD), timeout=1.0)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"Orthanc did not answer on {url} within {timeout} s")


@contextmanager
def orthanc_server(
    workdir: Path,
    *,
    http_port: int,
    dicom_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
    aet: str = "ORTHANC",
    timeout: float = 20.0,
    tcp_nodelay: bool = True,
    dicomweb_servers: Mapping[str, Mapping[str, object]] | None = None,
) -> Iterator[OrthancServer]:
    """Run Orthanc until the block ends.

    Parameters
    ----------
    workdir
        Holds the configuration, the storage and the log.
    http_port, dicom_port
        Its ports (only ever used on 127.0.0.1).
    modalities
        ``DicomModalities``: name -> (AE title, host, port), e.g. our node.
    aet
        Orthanc's own AE title.
    tcp_nodelay
        Run with ``TCP_NODELAY=1`` (DCMTK's fast setting, as tests want); ``False`` leaves
        the variable unset, as Orthanc runs by default (benchmarks).
    dicomweb_servers
        ``DicomWeb.Servers`` of the DICOMweb plugin (name -> {"Url": ..., "HttpHeaders":
        ...}): peers Orthanc's DICOMweb client can STOW to
        (``POST /dicom-web/servers/<name>/stow``).
    """
    if not ORTHANC_BINARY.exists():
        pytest.skip(f"{ORTHANC_BINARY} not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    config = {
        "Name": "unict-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomModalities": {
            name: {"AET": ae, "Host": host, "Port": port, "AllowFind": True, "AllowStore": True}
            for name, (ae, host, port) in modalities.items()
        },
        "DicomCheckCalledAeTitle": False,
        "DicomAlwaysAllowFind": False,
        "DicomAssociationCloseDelay": 0,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "Servers": {name: dict(server) for name, server in (dicomweb_servers or {}).items()},
        },
        "HttpTimeout": 30,
        "StableAge": 1,
        "SaveJobs": False,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC_BINARY), str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env={
                **{k: v for k, v in os.environ.items() if k != "TCP_NODELAY"},
                **({"TCP_NODELAY": "1"} if tcp_nodelay else {}),
            },
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        try:
            _wait_ready(url, process, timeout)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}\n--- Orthanc log ---\n{tail}") from exc
        client = OrthancApiClient(url, user=USER, pwd=PASSWORD)
        try:
            yield OrthancServer(process, http_port, dicom_port, aet, client, log_path)
        finally:
            client.close()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
