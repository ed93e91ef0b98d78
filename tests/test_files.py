"""Whole-file writes (suwen/files.py): a reader sees the old file or the new one, never half
of one; nothing is left behind when the writer fails; what is written is owner-only."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from suwen.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    publish_dir,
)


def test_written_files_are_owner_only_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "é\n")
        atomic_write_json(tmp_path / "b.json", {"x": "é"})
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.unlink()  # a writer that makes its own file gets the umask's mode
            tmp.write_bytes(b"c")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é\n"
    assert json.loads((tmp_path / "b.json").read_text(encoding="utf-8")) == {"x": "é"}
    assert (tmp_path / "b.json").read_text(encoding="utf-8").endswith("}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("killed mid-way")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_the_temporary_is_beside_the_target_and_hidden(tmp_path: Path) -> None:
    """Same directory (so the rename is atomic, never a copy across disks), a dot name (so a
    folder listing or a glob of outputs does not pick it up)."""
    with atomic_path(tmp_path / "out.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.")
        assert not (tmp_path / "out.json").exists()  # nothing at the target until done
        tmp.write_text("{}", encoding="utf-8")
    assert (tmp_path / "out.json").read_text(encoding="utf-8") == "{}"


def test_a_published_folder_appears_whole_under_its_name(tmp_path: Path) -> None:
    staging = tmp_path / ".model.staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "weights.bin").write_bytes(b"w")
    target = tmp_path / "model"
    publish_dir(staging, target)
    assert (target / "sub" / "weights.bin").read_bytes() == b"w" and not staging.exists()
    again = tmp_path / ".again"
    again.mkdir()
    (again / "x").write_bytes(b"x")
    with pytest.raises(OSError):  # never merged into, nor replacing, a published folder
        publish_dir(again, target)
    assert sorted(p.name for p in target.iterdir()) == ["sub"]
