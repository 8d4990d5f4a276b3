"""Writing a received instance into the spool so that it survives a crash.

The file goes under its final name, ``study/series/<SOP Instance UID>.<hash>.dcm``, is
``fsync``-ed, and so is its folder (and the folders above when they are new): once
:func:`spool_write` returns, the instance is on disk whatever happens next.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["fsync_dir", "spool_write", "write_all"]


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of `data` to `fd` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """``fsync`` a folder: makes the names created in it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def spool_write(
    spool_dir: Path,
    source: bytes | Path,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    *,
    prefix: bytes = b"",
    sha256: str | None = None,
) -> tuple[Path, int, str]:
    """Write `prefix` + `source` (bytes, or a file's content) into the spool durably;
    return its path, size and SHA-256.

    The name carries the start of the content hash, so a changed resend never
    overwrites a file an earlier series version (maybe being analysed) points at, and
    the file is written under its final name (no temporary name and rename: a rename
    costs a second journal commit, about 1 ms per instance). A crash mid-write leaves
    a file that is not recorded and fails the completeness check, so
    :func:`service.spool_recovery.recover_spool` leaves it; a resend writes it again.
    An identical resend finds the file complete and only makes sure it is durable; a file
    of another size under the name is replaced whole (temporary name and rename).
    `sha256` is the hash of `prefix` + `source` when the caller computed it while the bytes
    arrived (the Storage SCP hashes each fragment as it comes).
    """
    directory = spool_dir / study_uid / series_uid
    created = not directory.is_dir()
    if created:
        directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(prefix)
    if isinstance(source, Path):
        size = len(prefix) + source.stat().st_size
        with source.open("rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
    else:
        size = len(prefix) + len(source)
        if sha256 is None:
            digest.update(source)
    hexdigest = (
        sha256 if sha256 is not None and not isinstance(source, Path) else digest.hexdigest()
    )
    final = directory / f"{sop_uid}.{hexdigest[:16]}.dcm"

    def write(fd: int) -> None:
        if prefix:
            write_all(fd, prefix)
        if isinstance(source, Path):
            with source.open("rb") as src:
                while chunk := src.read(1 << 20):
                    write_all(fd, chunk)
        else:
            write_all(fd, source)
        os.fsync(fd)

    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if final.stat().st_size == size:  # an identical resend: make sure it is durable
            fd = os.open(final, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            # Left over from a crash mid-write, or being written by another association
            # right now: replace it whole (temporary name, rename), never rewrite it in
            # place under a writer that may already have answered success.
            fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{sop_uid}.", suffix=".part")
            try:
                write(fd)
            except BaseException:
                os.close(fd)
                Path(tmp_name).unlink(missing_ok=True)
                raise
            os.close(fd)
            os.replace(tmp_name, final)
    else:
        try:
            write(fd)
        except BaseException:
            os.close(fd)
            final.unlink(missing_ok=True)
            raise
        os.close(fd)
    fsync_dir(directory)
    if created:  # make the new folders themselves durable too
        fsync_dir(directory.parent)
        fsync_dir(directory.parent.parent)
    return final, size, hexdigest
