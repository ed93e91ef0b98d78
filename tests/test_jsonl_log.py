"""The append-only log batch and eval resume from (suwen/jsonl_log.py)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from suwen.errors import InputError
from suwen.jsonl_log import open_append_log, read_log, split_log


def test_a_torn_last_line_is_left_out_when_read_and_dropped_by_the_next_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "ans')
    found = read_log(path)
    assert found.lines == [b'{"id": "a"}', b'{"id": "b"}'] and found.torn_tail
    assert path.read_bytes().endswith(b'"ans')  # a reader changes nothing
    with open_append_log(path, "suwen test") as log:
        assert log.found == found
        log.append('{"id": "c"}')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_split_log_of_clean_and_empty_data() -> None:
    assert split_log(b"").lines == [] and not split_log(b"").torn_tail
    clean = split_log(b"x\n\ny\n")
    assert clean.lines == [b"x", b"", b"y"] and not clean.torn_tail
    assert read_log(Path("/nonexistent/suwen/out.jsonl")).lines == []


def test_the_log_is_owner_only_and_lines_from_many_threads_never_interleave(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.jsonl"
    old = os.umask(0o022)
    try:
        with open_append_log(path, "suwen test") as log:
            line = json.dumps({"text": "x" * 100_000})  # larger than a pipe buffer

            def write(n: int) -> None:
                for _ in range(n):
                    log.append(line)

            threads = [threading.Thread(target=write, args=(20,)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == [line] * 80


def test_rewrite_replaces_the_content_and_later_lines_follow_it(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"keep\ndrop\n")
    with open_append_log(path, "suwen test") as log:
        log.rewrite([b"keep"])
        log.append("new")
    assert path.read_bytes() == b"keep\nnew\n"


def test_a_second_writer_is_refused_naming_the_file_and_command(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with open_append_log(path, "suwen test"):  # noqa: SIM117
        with pytest.raises(InputError, match=r"out\.jsonl: another suwen test is writing"):
            with open_append_log(path, "suwen test"):
                pass
