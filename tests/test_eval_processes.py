"""`suwen eval --processes N`: the agent modes answered by several agent processes.

Driven through the real CLI in its own process, against the stand-in model server of
``benchmarks/coordinator.py`` (it answers every request at once) and a real tiny-BiomedCLIP
image index of VQA-RAD training cases; which agent a child answers each request with is
checked on the real graph in this process.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from suwen.answer_processes import ChildSpec, Request, _ChildAnswerers
from suwen.config import Settings
from suwen.errors import InputError
from suwen.runtime import AgentAnswerer
from suwen.types import Question
from tests.agent_helpers import make_agent
from tests.fake_model import FakeModel
from tests.fixtures_images import INDEX_NAME

CLI = [sys.executable, "-c", "from suwen.cli import main; main()", "eval"]
# What differs between two runs of the same question: when it finished and how long it took.
PER_RUN = ("latency", "finished_at")


@pytest.fixture(scope="module")
def model_url() -> Iterator[str]:
    from benchmarks.coordinator import stand_in

    with stand_in() as url:
        yield url


def _env(home: Path, **settings: str) -> dict[str, str]:
    return os.environ | {"SUWEN_HOME": str(home), "SUWEN_MAX_RETRIES": "0"} | settings


def _records(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every answer file of a run: benchmark/mode file -> question id -> record (without the
    fields that differ from run to run)."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(out.glob("*/*.jsonl")):
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        found[f"{path.parent.name}/{path.name}"] = {
            row["id"]: {k: v for k, v in row.items() if k not in PER_RUN} for row in rows
        }
    return found


@pytest.mark.slow  # starts the CLI and its agent processes, twice
def test_agent_processes_answer_every_mode_as_one_process_does(
    tmp_path: Path,
    shared_data: Path,
    model_url: str,
    tiny_clip_dir: Path,
    image_settings: Settings,
    image_index: str,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(image_settings.home / "indexes" / image_index, home / "indexes" / INDEX_NAME)
    env = _env(
        home,
        SUWEN_IMAGE_ENCODER=str(tiny_clip_dir),
        SUWEN_IMAGE_INDEX=INDEX_NAME,
        SUWEN_DEVICE="cpu",
    )
    outs = {count: tmp_path / f"out-{count}" for count in (1, 2)}
    for count, out in outs.items():
        args = ["-b", "VQA-RAD,PubMedQA", "--data", str(shared_data), "--limit", "10"]
        args += ["--modes", "plain,agent,adaptive", "--case-examples", "0,2", "--out", str(out)]
        args += ["--vllm-url", model_url, "--processes", str(count)]
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
    one, two = (_records(out) for out in outs.values())
    assert one == two
    # Every mode ran (each count of case examples its own file), every question answered.
    assert len(one) == 2 * 5 and all(len(rows) == 10 for rows in one.values())
    # The report scores them alike (its latencies, and the order of answers of equal
    # confidence in the risk-coverage curve, follow the order they finished in).
    reports = [json.loads((out / "metrics.json").read_text("utf-8")) for out in outs.values()]
    for name in ("VQA-RAD", "PubMedQA"):
        first, second = (report["benchmarks"][name] for report in reports)
        assert first["finished"] == second["finished"]
        for mode, scored in first["modes"].items():
            for key in ("suwen", "medevalkit", "n", "ece", "brier", "calls_per_question"):
                assert scored[key] == second["modes"][mode][key], (name, mode, key)


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A server that answers every request 401, as one with another API key does."""

    def _refuse(self) -> None:
        body = b'{"message": "Unauthorized"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._refuse()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._refuse()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.slow  # starts the CLI and its agent processes
def test_a_refusing_server_stops_the_agent_mode_of_processes_loudly(
    tmp_path: Path, shared_data: Path
) -> None:
    """The agent goes on past failed model calls (a degraded answer); the children's calls
    reach the parent, so a run of refusals is a failed mode, not a benchmark of wrong
    answers."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = tmp_path / "out"
        args = ["-b", "VQA-RAD", "--data", str(shared_data), "--limit", "12", "--modes", "agent"]
        args += ["--out", str(out), "--vllm-url", url, "--processes", "2", "--concurrency", "2"]
        env = _env(tmp_path / "home")
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode != 0
    failed = [line for line in done.stderr.splitlines() if "in a row failed" in line]
    assert len(failed) == 1 and "VQA-RAD agent" in failed[0] and "401" in failed[0], done.stderr
    # Nothing was scored: the next run asks every question again.
    assert (out / "VQA-RAD" / "agent.jsonl").read_text("utf-8") == ""


def test_a_child_answers_each_request_in_its_mode_showing_its_count(tmp_path: Path) -> None:
    agent = make_agent(tmp_path, FakeModel(), case_examples=1)
    answerers = _ChildAnswerers(agent, ChildSpec(settings={}, urls=[], mode="agent"))
    question = Question(text="Any effusion?")

    def chosen(**asked: Any) -> AgentAnswerer:
        answerer = answerers(Request(id=0, question=question, **asked))
        assert isinstance(answerer, AgentAnswerer)
        return answerer

    assert chosen().agent is agent and chosen().mode == "agent"
    assert chosen(mode="adaptive").agent is agent and chosen(mode="adaptive").mode == "adaptive"
    shown = chosen(mode="adaptive", examples=3)
    assert shown.mode == "adaptive" and shown.agent.settings.case_examples == 3
    assert chosen(examples=3).agent is shown.agent  # one agent per count, made once
    assert chosen(examples=0).agent.settings.case_examples == 0
    with pytest.raises(InputError, match="plain"):
        answerers(Request(id=0, question=question, mode="plain", examples=2))
