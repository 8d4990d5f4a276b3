"""service.config: validation with dotted keys and YAML lines, env overrides, paths."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, is_loopback, is_placeholder_secret, load_settings
from service.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
dicom:
  ae_title: UNICT
  allowed_callers: [ORTHANC]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_repository_config_loads_for_a_local_node() -> None:
    settings = load_settings(REPO / "config.yaml", env={})
    assert settings.dicom.port == 11112
    assert settings.dicom.allowed_callers == ("ORTHANC", "STORESCU", "UNICT_DEMO")
    assert settings.http.host == "127.0.0.1" and settings.http.port == 8080
    assert settings.destinations[0].ae_title == "ORTHANC"
    assert (settings.destinations[0].host, settings.destinations[0].port) == ("127.0.0.1", 4242)
    # Relative paths are resolved against the config file's folder, not the cwd.
    assert settings.storage.spool_dir == REPO / "var" / "spool"
    assert settings.database.url == f"sqlite:///{REPO / 'var' / 'unict.db'}"
    assert settings.model.checkpoint_path == REPO / "model" / "checkpoints" / "small"
    assert settings.outputs.seg.segmentation_type == "BINARY"
    assert settings.outputs.seg.series_number == 9901 and settings.outputs.sr.series_number == 9902
    assert not settings.http.token_required


def test_every_key_of_the_repository_config_has_a_comment() -> None:
    for number, line in enumerate((REPO / "config.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if ":" in stripped.split("#")[0] or stripped.startswith("- "):
            assert "#" in line, f"config.yaml:{number} has no comment: {line!r}"


def test_settings_are_immutable(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), env={})
    with pytest.raises(ValidationError):
        settings.dicom.port = 104


def test_unknown_key_names_dotted_key_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        dicom:
          ae_title: UNICT
          allowed_callers: [ORTHANC]
        selection:
          modalities: [CT]
          min_slice: 40
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert f"{path}:6: selection.min_slice: unknown key" in str(info.value)


def test_bad_value_names_dotted_key_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        dicom:
          ae_title: UNICT
          allowed_callers: [ORTHANC]
        destinations:
          - name: pacs
            ae_title: PACS
            host: 127.0.0.1
            port: 70000
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert f"{path}:8: destinations[0].port" in message
    assert "65535" in message


def test_missing_callers_are_refused_unless_any_caller_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, "dicom:\n  ae_title: UNICT\n")
    with pytest.raises(ConfigError, match=r"dicom\.allowed_callers: .*allow_any_caller"):
        load_settings(path, env={})
    path = write(tmp_path, "dicom:\n  allow_any_caller: true\n")
    assert load_settings(path, env={}).dicom.allowed_callers == ()


def test_invalid_ae_title_and_regex(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        dicom:
          ae_title: THIS_TITLE_IS_TOO_LONG
          allowed_callers: [ORTHANC]
        selection:
          series_description_exclude: ["(unclosed"]
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert f"{path}:2: dicom.ae_title" in message
    assert f"{path}:5: selection.series_description_exclude" in message


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    env = {
        "UNICT_DATABASE__URL": "postgresql+psycopg://node@db.example/unict",
        "UNICT_HTTP__HOST": "0.0.0.0",
        "UNICT_HTTP__TOKEN": "s3cr3t-t0ken-for-tests",
        "UNICT_DICOM__ALLOWED_CALLERS": "[PACS_A, PACS_B]",
        "UNICT_DICOM__TLS__ENABLED": "false",
        "UNICT_WORKERS__COUNT": "4",
        "UNICT_TEST_POSTGRES_URL": "ignored: not a settings override",
    }
    settings = load_settings(path, env=env)
    assert settings.database.url == "postgresql+psycopg://node@db.example/unict"
    assert settings.dicom.allowed_callers == ("PACS_A", "PACS_B")
    assert settings.workers.count == 4
    assert settings.http.token.get_secret_value() == "s3cr3t-t0ken-for-tests"
    assert settings.http.token_required
    assert "s3cr3t" not in repr(settings)


def test_environment_errors_name_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(
        ConfigError, match=r"environment variable UNICT_WORKERS__COUNT: workers\.count"
    ):
        load_settings(path, env={"UNICT_WORKERS__COUNT": "zero"})
    with pytest.raises(ConfigError, match=r"environment variable UNICT_NOPE__X: nope: unknown key"):
        load_settings(path, env={"UNICT_NOPE__X": "1"})


@pytest.mark.parametrize("token", ["", "changeme", "CHANGE_ME", "  "])
def test_placeholder_token_refused_off_loopback(tmp_path: Path, token: str) -> None:
    path = write(tmp_path, MINIMAL + f"http:\n  host: 0.0.0.0\n  token: '{token}'\n")
    with pytest.raises(ConfigError, match=r":6: http\.token: .*real token"):
        load_settings(path, env={})
    # On loopback a placeholder only means "no token".
    path = write(tmp_path, MINIMAL + f"http:\n  host: 127.0.0.1\n  token: '{token}'\n")
    assert not load_settings(path, env={}).http.token_required


def test_tls_needs_certificate(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "  tls:\n    enabled: true\n")
    with pytest.raises(ConfigError, match=r"dicom\.tls\.cert_file: .*required"):
        load_settings(path, env={})
    path = write(
        tmp_path,
        MINIMAL
        + "  tls:\n    enabled: true\n    cert_file: tls/node.pem\n    key_file: tls/node.key\n",
    )
    tls = load_settings(path, env={}).dicom.tls
    assert tls.cert_file == tmp_path / "tls" / "node.pem"


def test_duplicate_key_and_bad_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "http:\n  port: 1\n  port: 2\n")
    with pytest.raises(ConfigError, match=r":6: http\.port: duplicate key \(first at line 5\)"):
        load_settings(path, env={})
    path = write(tmp_path, "dicom: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", env={})


def test_slice_thickness_range_and_engines(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "selection:\n  slice_thickness_mm: [5, 1]\n")
    with pytest.raises(ConfigError, match=r":5: selection\.slice_thickness_mm"):
        load_settings(path, env={})
    path = write(tmp_path, MINIMAL + "model:\n  engines: [tensorrt, tflite]\n")
    with pytest.raises(ConfigError, match=r"model\.engines\[1\]"):
        load_settings(path, env={})
    path = write(tmp_path, MINIMAL + "model:\n  engines: [triton, onnxruntime]\n")
    assert load_settings(path, env={}).model.engines == ("triton", "onnxruntime")


def test_defaults_and_helpers() -> None:
    settings = Settings.model_validate({"dicom": {"allowed_callers": ["A"]}})
    assert settings.assembly.quiet_period_s == 10
    assert settings.selection.modalities == ("CT",)
    assert settings.selection.exclude_image_types == ("LOCALIZER",)
    assert settings.model.engines == ("tensorrt", "onnxruntime", "pytorch")
    assert settings.database.migrate_on_start
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("pacs.example")
    assert is_placeholder_secret("ChangeMe") and not is_placeholder_secret("x9-long-random")


def test_procrastinate_queue_needs_postgres() -> None:
    base = {"dicom": {"ae_title": "UNICT", "allow_any_caller": True}}
    assert Settings.model_validate(base).queue.backend == "embedded"
    with pytest.raises(ValidationError, match=r"queue\.backend: procrastinate needs"):
        Settings.model_validate(
            {**base, "queue": {"backend": "procrastinate"}, "database": {"url": "sqlite:///x.db"}}
        )
    with pytest.raises(ValidationError, match="stalled_after_s must be longer"):
        Settings.model_validate({**base, "queue": {"heartbeat_s": 10, "stalled_after_s": 5}})


def test_ae_title_is_checked_wherever_one_is_given(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + """\
assembly:
  sender_query:
    ORTHANC:
      host: 127.0.0.1
      port: 4242
      ae_title: 'A\\B'
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    message = str(info.value)
    assert f"{path}:9: assembly.sender_query.ORTHANC.ae_title" in message
    assert "not a valid AE title" in message
    spaced = write(tmp_path, MINIMAL.replace("[ORTHANC]", "[' ORTHANC ']"))
    assert load_settings(spaced, env={}).dicom.allowed_callers == ("ORTHANC",)


@pytest.mark.parametrize(
    ("outputs", "line", "key", "taken"),
    [
        ("  seg:\n    series_number: 7\n  sr:\n    series_number: 7\n", 8, "sr", "SEG"),
        ("  sc:\n    enabled: true\n    series_number: 9901\n", 7, "sc", "SEG"),
        ("  sc:\n    enabled: true\n    series_number: 9902\n", 7, "sc", "SR"),
    ],
)
def test_equal_output_series_numbers_are_refused_at_load(
    tmp_path: Path, outputs: str, line: int, key: str, taken: str
) -> None:
    path = write(tmp_path, MINIMAL + "outputs:\n" + outputs)
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert f"{path}:{line}: outputs.{key}.series_number: " in str(info.value)
    assert f"is already the {taken}'s" in str(info.value)
    # Key images that are off may keep any number.
    off = write(tmp_path, MINIMAL + "outputs:\n  sc:\n    enabled: false\n    series_number: 9901\n")
    assert load_settings(off, env={}).outputs.sc.series_number == 9901
