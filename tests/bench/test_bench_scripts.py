"""The benchmark scripts of issue 8: ``--help`` works, and each table comes out of a tiny run.

The full-size runs take minutes and belong on an idle machine (BENCHMARKS.md says how);
these only check that the scripts run end to end and print what they promise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DCMTK = Path("/usr/bin/storescu").exists() and Path("/usr/bin/storescp").exists()
needs_dcmtk = pytest.mark.skipif(not DCMTK, reason="DCMTK not installed (apt-get install dcmtk)")


@pytest.mark.parametrize(
    "name",
    [
        "bench_ingest",
        "bench_encode",
        "bench_memory",
        "bench_distributed",
        "bench_stow",
        "profile_ingest",
    ],
)
def test_help(name: str) -> None:
    """``python -m bench.NAME --help`` prints the usage and the description."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    assert "--slices" in result.stdout


@needs_dcmtk
@pytest.mark.network
def test_ingest_table_from_a_tiny_run(tmp_path: Path) -> None:
    """Three 16x16 instances to storescp and the node (one and four listener processes), one
    sender then two at once."""
    from bench.bench_ingest import Options, run, table

    options = Options(slices=3, size=16, repeats=1, concurrency=2, orthanc=False, modes=("fast",))
    results = run(options, tmp_path)
    assert {(m.receiver, m.senders) for m in results} == {
        ("DCMTK storescp", 1),
        ("UniCT Node", 1),
        ("UniCT Node, 4 listener processes", 1),
        ("DCMTK storescp", 2),
        ("UniCT Node", 2),
        ("UniCT Node, 4 listener processes", 2),
    }
    assert all(m.instances == 3 * m.senders and m.seconds for m in results)
    lines = table(results).splitlines()
    assert lines[0].startswith("| receiver |") and len(lines) == 2 + len(results)
    assert "| DCMTK storescp | TCP_NODELAY=1 | 1 | 3 |" in lines[2]
    assert lines[2].endswith("| 1.00 |")


def test_ingest_modes_set_or_unset_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.bench_ingest import dcmtk_env

    monkeypatch.setenv("TCP_NODELAY", "1")
    assert "TCP_NODELAY" not in dcmtk_env("default")
    assert dcmtk_env("fast")["TCP_NODELAY"] == "1"
    with pytest.raises(ValueError, match="mode"):
        dcmtk_env("slow")


def test_encode_table_from_a_tiny_run(tmp_path: Path) -> None:
    """Eight 64x64 slices, three segments: node and plain writers, BINARY and LABELMAP, SR."""
    from bench.bench_encode import LABELMAP_NA, run, table

    rows = run(tmp_path, slices=8, size=64, segments=3, repeats=1)
    assert [(r.writer, r.kind) for r in rows] == [
        ("node build_seg", "BINARY"),
        ("plain highdicom", "BINARY"),
        ("node build_seg", "LABELMAP"),
        ("plain highdicom", "LABELMAP"),
        ("node build_sr", "TID 1500"),
    ]
    assert all(r.bytes > 0 and len(r.seconds) == 1 for r in rows)
    # Same masks: the same number of frames from both writers of a type.
    assert rows[0].frames == rows[1].frames and rows[2].frames == rows[3].frames
    if shutil.which("dciodvfy"):
        assert rows[0].dciodvfy.startswith("0 errors"), rows[0].dciodvfy
        assert rows[2].dciodvfy == LABELMAP_NA
    text = table(rows)
    assert text.count("\n") == 6 and "×**" in text


def test_memory_reads_proc_and_prints_a_table() -> None:
    """The /proc reading and the table; the node run itself takes minutes (model start-up)."""
    from bench.bench_memory import Row, proc_status, reset_peak, table

    status = proc_status(os.getpid())
    assert status["VmHWM"] >= status["VmRSS"] > 0
    if reset_peak(os.getpid()):
        assert proc_status(os.getpid())["VmHWM"] <= status["VmHWM"]
    text = table(
        [Row(300, 500 * 1024, 600 * 1024, 510 * 1024, 1500 * 1024, 900 * 1024, "DONE", 4.2)]
    )
    assert "| 300×512×512 | DONE | 500 | 600 | 510 | **1500** | 900 | 4.2 |" in text


def test_distributed_table_has_the_ratio_of_workers() -> None:
    from bench.bench_distributed import Run, table

    lines = table([Run(1, 4, 4, 60.0), Run(2, 4, 4, 40.0)]).splitlines()
    assert lines[0] == "| workers | studies | done | seconds | studies/min | ratio |"
    assert lines[2] == "| 1 | 4 | 4 | 60.0 | 4.0 | 1.00 |"
    assert lines[3] == "| 2 | 4 | 4 | 40.0 | 6.0 | 1.50 |"


def test_report_agreement_from_one_phantom(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue-14 agreement benchmark on one unseen phantom: both figures printed."""
    from bench.bench_report_agreement import main

    assert main(["--cases", "1", "--seed", "8000001"]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out
    assert "sentences stating a finding agree with the SEG (100.0%)" in out


def test_realct_bench_skips_with_the_reason_without_the_real_case(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import bench.bench_realct as bench
    import bench.realct as realct

    monkeypatch.setattr(realct, "LIDC_ARCHIVE", tmp_path / "missing.tar.xz")
    assert bench.main(["--runs", "1"]) == 0
    assert "skipped: the shared real chest CT is not at" in capsys.readouterr().out


@pytest.mark.orthanc
@pytest.mark.network
@pytest.mark.skipif(
    not (Path("/usr/sbin/Orthanc").exists() and Path("/usr/bin/curl").exists()),
    reason="Orthanc or curl not installed",
)
def test_stow_table_from_a_tiny_run(tmp_path: Path) -> None:
    """Issue 17: three 16x16 instances by STOW-RS to the node and to Orthanc, then two
    requests at once; the node's row carries its ratio to Orthanc's."""
    from bench.bench_stow import Options, run, table

    results = run(Options(slices=3, size=16, repeats=1, concurrency=2), tmp_path)
    assert {(m.receiver, m.requests) for m in results} == {
        ("UniCT Node", 1),
        ("Orthanc + DICOMweb", 1),
        ("UniCT Node", 2),
        ("Orthanc + DICOMweb", 2),
    }
    assert all(m.instances == 3 * m.requests and m.seconds for m in results)
    lines = table(results).splitlines()
    assert lines[0].startswith("| receiver |") and len(lines) == 2 + len(results)
    node_row = next(line for line in lines if line.startswith("| UniCT Node | 1 |"))
    assert float(node_row.rstrip(" |").rsplit("|", 1)[1]) > 0
