"""Whole-file writes (suwen/files.py): a reader sees the old file or the new one, never half
of one; nothing is left behind when the writer fails; what is written is owner-only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from suwen.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    held_staging,
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


HOLD = """
import sys, time
from pathlib import Path
from suwen.files import held_staging
with held_staging(Path(sys.argv[1]), ".export-") as staging:
    (staging / "model.onnx").write_bytes(b"x" * 4096)
    print(staging, flush=True)
    time.sleep(60)
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parent)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_staging_of_a_killed_writer_is_removed_and_a_live_writers_kept(tmp_path: Path) -> None:
    killed, left = _holder(tmp_path)
    live, held = _holder(tmp_path)
    try:
        killed.kill()
        killed.wait()
        assert (left / "model.onnx").is_file()  # a kill runs no clean-up
        with held_staging(tmp_path, ".export-") as mine:
            assert mine.is_dir() and not left.exists() and (held / "model.onnx").is_file()
        assert not mine.exists()
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([held.name, held.name + ".lock"])


def test_staging_is_removed_when_its_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), held_staging(tmp_path, ".x-") as staging:
        (staging / "part").write_bytes(b"1")
        raise RuntimeError("export failed")
    assert list(tmp_path.iterdir()) == []
