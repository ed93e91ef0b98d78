"""A managed vLLM server never outlives the `suwen batch` that started it: the batch is killed
with SIGKILL (no handler, no atexit: what the OOM killer or a preempted job does) while the
server starts, while requests are in flight, and after answers were written; every process
of the server's group is gone moments later, and the re-run resumes on a fresh server. The
fake server of test_llm_server stands in for vLLM (the real one: test_llm_vllm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from suwen.llm.server import free_port
from tests.conftest import REPO
from tests.test_llm_server import FAKE_SERVER, assert_all_gone

pytestmark = pytest.mark.slow

# The real CLI, with the managed server's command swapped for the fake server (argv[1]: mode).
BATCH = textwrap.dedent(
    """
    import sys
    from suwen.llm import server as server_module
    fake, mode = sys.argv[1], sys.argv[2]
    def command(settings, model, host, port):
        return [sys.executable, "-c", fake, str(port), mode]
    server_module.server_command = command
    from suwen.cli import main
    sys.argv = ["suwen", *sys.argv[3:]]
    main()
    """
)


def start_batch(home: Path, folder: Path, out: Path, mode: str, delay: float) -> subprocess.Popen:
    env = {
        **os.environ,
        "SUWEN_HOME": str(home),
        "SUWEN_VLM": "fake",
        "SUWEN_MAX_RETRIES": "0",
        "SUWEN_REQUEST_TIMEOUT": "900",
        "FAKE_POST_DELAY": str(delay),
    }
    return subprocess.Popen(
        [sys.executable, "-c", BATCH, FAKE_SERVER, mode, "batch", str(folder), "--out", str(out)],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def server_group(batch: subprocess.Popen) -> list[psutil.Process]:
    """The guard, the fake API server and its engine-like child, once all three exist."""
    try:
        members = psutil.Process(batch.pid).children(recursive=True)
    except psutil.Error:
        return []
    return members if len(members) >= 3 else []


@pytest.fixture()
def questions(tmp_path: Path) -> Path:
    folder = tmp_path / "questions"
    folder.mkdir()
    rows = [{"id": f"q{i}", "question": f"Question number {i} about asthma?"} for i in range(6)]
    (folder / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def kill_and_check(batch: subprocess.Popen, home: Path) -> None:
    members = server_group(batch)
    assert len(members) == 3, members
    batch.send_signal(signal.SIGKILL)
    batch.wait(timeout=30)
    assert_all_gone(members)
    assert all(not m.is_running() for m in members)


@pytest.mark.parametrize("point", ["starting", "answering", "after-answers"])
def test_sigkill_of_a_batch_leaves_no_server_and_the_rerun_resumes(
    tmp_path: Path, questions: Path, point: str
) -> None:
    home, out = tmp_path / "home", tmp_path / "answers.jsonl"
    mode, delay = {"starting": ("hang", 0.0), "answering": ("ok", 600.0)}.get(point, ("ok", 0.3))
    batch = start_batch(home, questions, out, mode, delay)
    try:
        wait_until(lambda: bool(server_group(batch)), "the server group")
        if point == "answering":
            wait_until(lambda: any((home / "logs").glob("vllm-*.log")), "the server log")
            time.sleep(3)  # healthy, and the first requests are waiting for their replies
            assert not out.exists() or out.read_text() == ""
        if point == "after-answers":
            wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, "an answer")
        kill_and_check(batch, home)
    finally:
        batch.kill()
        batch.wait()
    # The re-run starts its own server (nothing stale holds the port or the record) and ends
    # with no server left behind.
    again = start_batch(home, questions, out, "ok", 0.0)
    try:
        again.wait(timeout=300)
    finally:
        again.kill()
    ids = sorted(json.loads(line)["id"] for line in out.read_text().splitlines())
    assert ids == [f"q{i}" for i in range(6)]
    assert list((home / "run").glob("vllm-*")) == []  # no server record left


@pytest.mark.vllm
def test_sigkill_of_a_batch_ends_the_real_vllm_server(
    tmp_path: Path, questions: Path, tiny_model_dir: Path
) -> None:
    """The real server: API server, engine core and any worker go with the SIGKILLed batch."""
    home, out = tmp_path / "home", tmp_path / "answers.jsonl"
    env = {
        **os.environ,
        "SUWEN_HOME": str(home),
        "SUWEN_VLM": str(tiny_model_dir),
        "SUWEN_VLLM_CPU_KVCACHE_GIB": "1",
        "SUWEN_VLLM_EXTRA_ARGS": "--enforce-eager",
        "SUWEN_MAX_TOKENS": "2000",  # long answers: requests are in flight when it dies
        "SUWEN_VLLM_PORT": str(free_port("127.0.0.1")),
    }
    suwen = str(Path(sys.executable).with_name("suwen"))
    batch = subprocess.Popen(
        [suwen, "batch", str(questions), "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _serving(home), "the vLLM server", timeout=900)
        time.sleep(5)  # the agent's first requests are being generated
        members = psutil.Process(batch.pid).children(recursive=True)
        assert len(members) >= 3, members  # the guard, the API server, the engine core
        batch.send_signal(signal.SIGKILL)
        batch.wait(timeout=30)
        _gone, alive = psutil.wait_procs(members, timeout=30)
        assert not alive, f"left running: {alive}"
    finally:
        batch.kill()
        batch.wait()


def _serving(home: Path) -> bool:
    logs = list((home / "logs").glob("vllm-*.log")) if (home / "logs").is_dir() else []
    return any("Application startup complete" in log.read_text(errors="replace") for log in logs)
