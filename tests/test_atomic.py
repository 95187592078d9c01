"""Atomic writes: complete files or nothing, never a partial file or a stray temporary."""

import pytest

from unimm.atomic import atomic_write, atomic_write_text


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "good")

    def crash(temporary):
        temporary.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
