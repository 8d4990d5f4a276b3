"""No module of the node over 500 lines (issue 16): a file that grows past it holds two things."""

from __future__ import annotations

from pathlib import Path

LIMIT = 500
SERVICE = Path(__file__).resolve().parents[1] / "service"


def test_no_service_module_over_the_limit() -> None:
    sizes = {
        str(path.relative_to(SERVICE)): len(path.read_text(encoding="utf-8").splitlines())
        for path in SERVICE.rglob("*.py")
    }
    assert sizes, SERVICE
    over = {name: lines for name, lines in sizes.items() if lines > LIMIT}
    assert not over, f"split these by what they hold: {over}"
