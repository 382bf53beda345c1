"""Writing files so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

#: What ``open(path, "w")`` asks for; the process umask takes its bits away (0o644 under umask 022).
_NEW_FILE_MODE = 0o666
_EXCLUSIVE_BINARY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def _open_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty file next to the target, created by the kernel with the umask applied (so it ends
    up with the permissions a plain ``open`` would give; ``tempfile.mkstemp`` makes 0600 files)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, _EXCLUSIVE_BINARY, _NEW_FILE_MODE), tmp
        except FileExistsError:  # a name another writer holds right now: draw again
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows: readers see the old file or the new one, never a mix.
    The file gets the usual permissions of a new file (``0o666`` minus the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def evict_least_recently_used(folder: str | os.PathLike, pattern: str, max_bytes: int, keep: Path) -> None:
    """Delete the files of ``folder`` matching ``pattern`` with the oldest modification time (which
    cache reads touch) until they total at most ``max_bytes``; ``keep``, just written, stays."""
    files = []
    for f in Path(folder).glob(pattern):
        try:
            st = f.stat()
        except OSError:  # removed by another process meanwhile
            continue
        files.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in files)
    for _, size, f in sorted(files):
        if total <= max_bytes:
            break
        if f != keep:
            f.unlink(missing_ok=True)
            total -= size
