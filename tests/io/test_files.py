"""Atomic writes: an error half-way through leaves the previous file intact and no temporary file;
files get the permissions a plain ``open`` would give them."""

from __future__ import annotations

import os
import stat

import pytest

from vocabseg.io.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_or_keeps(tmp_path):
    target = tmp_path / "sub" / "r.json"
    atomic_write(target, lambda f: f.write(b"old"))
    assert target.read_bytes() == b"old"

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
        atomic_write_text(tmp_path / "b.json", "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == want  # what open() gives, for reference
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == want
    assert (tmp_path / "b.json").read_text() == "{}"


def test_atomic_write_text_is_utf8(tmp_path):
    target = atomic_write_text(tmp_path / "t.txt", "café ✓\n")
    assert target.read_bytes() == "café ✓\n".encode()
