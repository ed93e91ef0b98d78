"""Private at rest: under the usual permissive umask (022), everything Suwen creates (the data
home, indexes, logs, the managed server's log and run record, batch outputs, evaluation
samples and reports) is readable by its owner only."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.llm import server as server_module
from suwen.llm.server import ManagedServer, free_port
from tests.conftest import REPO
from tests.fixtures_images import ImageCorpus
from tests.test_llm_server import FAKE_SERVER

pytestmark = pytest.mark.slow

SUWEN = Path(sys.executable).with_name("suwen")
FAKE_CLI = [sys.executable, "-m", "tests.fake_cli"]


def permissive_umask() -> None:
    os.umask(0o022)


def shared_with_others(*roots: Path) -> list[str]:
    """Every path under ``roots`` (the roots included) that group or others may read, write
    or enter, with its mode."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077 and not path.is_symlink():
                found.append(f"{path.relative_to(root.parent)} {mode:o}")
    return found


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(REPO),
        preexec_fn=permissive_umask,
    )


def test_everything_suwen_writes_is_owner_only_under_umask_022(
    tmp_path: Path,
    text_corpus: Path,
    image_corpus: ImageCorpus,
    minilm_path: Path,
    tiny_clip_dir: Path,
    shared_data: Path,
) -> None:
    home, out = tmp_path / "home", tmp_path / "outputs"
    out.mkdir(mode=0o755)
    env = {
        **os.environ,
        "SUWEN_HOME": str(home),
        "SUWEN_TEXT_ENCODER": str(minilm_path),
        "SUWEN_IMAGE_ENCODER": str(tiny_clip_dir),
        "SUWEN_DEVICE": "cpu",
        "COLUMNS": "200",
    }
    corpus = tmp_path / "corpus.json"
    pqal = json.loads((text_corpus / "pubmedqa_subset.json").read_text(encoding="utf-8"))
    corpus.write_text(json.dumps(dict(sorted(pqal.items())[:10])), encoding="utf-8")
    image = image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg"
    questions = tmp_path / "questions"
    questions.mkdir()
    (questions / image.name).write_bytes(image.read_bytes())
    rows = [{"id": "q1", "question": "Is the heart enlarged?", "images": [image.name]}]
    (questions / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    steps: dict[str, list[str]] = {
        "index text": [str(SUWEN), "index", "text", "--name", "pubmed", str(corpus)],
        "index images": [
            str(SUWEN), "index", "images", "--name", "images", str(image_corpus.manifest)
        ],
        "ask": [*FAKE_CLI, "ask", "--image", str(image), "Is the heart enlarged?"],
        "batch": [*FAKE_CLI, "batch", str(questions), "--out", str(out / "answers.jsonl")],
        "eval": [
            *FAKE_CLI, "eval", "--benchmark", "PubMedQA", "--data", str(shared_data),
            "--modes", "plain", "--limit", "2", "--out", str(out / "eval"),
        ],
    }  # fmt: skip
    for name, args in steps.items():
        done = run(args, env)
        assert done.returncode == 0, f"{name}: {done.stderr}"
    assert (out / "answers.jsonl").is_file() and any((out / "eval").iterdir())
    assert list((home / "indexes").iterdir())
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert shared_with_others(home) == []
    assert shared_with_others(out / "answers.jsonl", out / "eval") == []


def test_a_shared_data_home_is_made_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    done = run([str(SUWEN), "config", "show"], {**os.environ, "SUWEN_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_the_managed_servers_log_and_record_are_owner_only_for_library_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program embedding Suwen keeps its own umask: the server's files are private anyway."""
    command: Callable[..., list[str]] = lambda s, m, h, port: [  # noqa: E731
        sys.executable, "-c", FAKE_SERVER, str(port), "ok"
    ]  # fmt: skip
    monkeypatch.setattr(server_module, "server_command", command)
    monkeypatch.setattr(server_module, "HEALTH_POLL_SECONDS", 0.1)
    settings = Settings(home=tmp_path / "home", vlm="fake", vllm_startup_timeout=60)
    previous = os.umask(0o022)
    try:
        with ManagedServer(settings, port=free_port("127.0.0.1")) as server:
            assert server.log_path is not None
            assert shared_with_others(settings.logs_dir, settings.home / "run") == []
    finally:
        os.umask(previous)
