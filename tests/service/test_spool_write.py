"""The durable spool write: final name at once, identical resends, leftovers of a crash."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.spool_write import spool_write

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


def test_written_under_its_hash_name(tmp_path: Path) -> None:
    data = b"DICM-ish" * 1000
    path, size, digest = spool_write(tmp_path, data, STUDY, SERIES, SOP, prefix=b"P")
    assert digest == hashlib.sha256(b"P" + data).hexdigest()
    assert path == tmp_path / STUDY / SERIES / f"{SOP}.{digest[:16]}.dcm"
    assert path.read_bytes() == b"P" + data and size == len(data) + 1
    assert not list(path.parent.glob(".*.part"))


def test_identical_resend_leaves_the_file_in_place(tmp_path: Path) -> None:
    data = b"x" * 5000
    first, _, _ = spool_write(tmp_path, data, STUDY, SERIES, SOP)
    inode = first.stat().st_ino
    again, _, _ = spool_write(tmp_path, data, STUDY, SERIES, SOP)
    assert again == first and again.stat().st_ino == inode  # not rewritten under a reader


def test_a_cut_leftover_is_replaced_whole(tmp_path: Path) -> None:
    data = b"y" * 5000
    digest = hashlib.sha256(data).hexdigest()
    leftover = tmp_path / STUDY / SERIES / f"{SOP}.{digest[:16]}.dcm"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(data[:1234])  # a crash in the middle of the write
    inode = leftover.stat().st_ino
    path, _, _ = spool_write(tmp_path, data, STUDY, SERIES, SOP, sha256=digest)
    assert path == leftover and path.read_bytes() == data
    assert path.stat().st_ino != inode  # renamed over, not rewritten in place
    assert not list(path.parent.glob(".*.part"))
