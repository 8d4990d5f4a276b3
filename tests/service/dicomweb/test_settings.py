"""The ``dicomweb`` section and ``type: dicomweb`` destinations in config.yaml: validated at
start-up with the key's dotted name and line, secrets only by environment variable name."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from service.config import Destination, load_settings
from service.dicomweb.settings import DicomwebDestination
from service.errors import ConfigError

BASE = """\
dicom:
  allowed_callers: [PACS]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + textwrap.dedent(text))
    return path


def test_a_dicomweb_section_and_both_destination_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        dicomweb:
          enabled: true
          clients:
            - {name: OHIF, token_env: UNICT_STOW_OHIF}
            - {name: GATEWAY, cert_cn: gateway.example.org}
          max_request_mb: 100
        destinations:
          - {name: pacs, ae_title: PACS, host: 127.0.0.1, port: 104}
          - name: vna
            type: dicomweb
            url: https://vna.example.org/dicom-web/
            username: unict
            password_env: UNICT_VNA_PASSWORD
        """,
    )
    settings = load_settings(path, env={})
    assert [c.name for c in settings.dicomweb.clients] == ["OHIF", "GATEWAY"]
    pacs, vna = settings.destinations
    assert isinstance(pacs, Destination) and pacs.address == "PACS@127.0.0.1:104"
    assert isinstance(vna, DicomwebDestination)
    assert vna.address == "https://vna.example.org/dicom-web/studies"
    # The environment switches it on like any key.
    env = {"UNICT_DICOMWEB__ENABLED": "false"}
    assert not load_settings(path, env=env).dicomweb.enabled


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dicomweb:\n  enabled: true\n", ":3: dicomweb: Value error, dicomweb.enabled needs"),
        (
            "dicomweb:\n  clients:\n    - {name: A-NAME-LONGER-THAN-16, token_env: X}\n",
            ":5: dicomweb.clients[0].name",
        ),
        ("dicomweb:\n  clients:\n    - {name: A}\n", "give token_env or cert_cn"),
        (
            "dicomweb:\n  clients:\n    - {name: A, token_env: 'not a name'}\n",
            "environment variable",
        ),
        (
            "destinations:\n  - name: x\n    type: dicomweb\n    url: ftp://host/x\n",
            ":6: destinations[0].url",
        ),
        (
            "destinations:\n  - {name: x, type: dicomweb, url: 'http://h', token_env: T,"
            " username: u, password_env: P}\n",
            "token_env or username, not both",
        ),
        ("destinations:\n  - {name: x, type: smtp, url: 'http://h'}\n", "destinations[0]"),
    ],
)
def test_bad_dicomweb_settings_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    assert expected in str(info.value)
