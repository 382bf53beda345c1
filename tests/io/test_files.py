"""Atomic writes: an error half-way through leaves the previous file intact and no temporary file."""

from __future__ import annotations

import pytest

from vocabseg.io.files import atomic_write


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
