"""The unict-node command line: subcommands, help texts, check-config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {  # type: ignore[arg-type]
        "train",
        "evaluate",
        "generate",
        "build-engine",
        "serve",
        "check-config",
        "db-upgrade",
        "jobs",
        "demo",
    }


def test_evaluate_help_documents_checkpoint_seed_cases_and_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--seed", "--cases", "--out"):
        assert option in text


def test_check_config_on_the_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(REPO / "config.yaml")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"].startswith("UniCT-small")
    assert report["engines"]["pytorch"] == "available"
    assert report["engines"]["tensorrt"].startswith("unavailable")


def test_check_config_names_a_bad_key_and_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("dicom:\n  ae_title: UNICT\n  allowed_callers: [PACS]\n  prot: 104\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dicom.prot" in err and ":4" in err
