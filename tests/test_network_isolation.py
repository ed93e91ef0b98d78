"""Nothing leaves the machine: the real CLI, in a network namespace that has only loopback,
under ``strace -f`` of every connect/sendto/sendmsg, with the environment of a user who has
LangSmith tracing on (its endpoint, and the hub's and vLLM's statistics server, pointed at a
local capture server, so a regression is captured, never sent) and no offline variable set.

Indexing text (MiniLM) and images (tiny open_clip), searching both, a hub-id model that is
not on the machine, then `ask` with the full agent, `batch` and `chat` through a terminal
against a real vLLM CPU server started by `suwen serve` (the managed-server code `ask` uses):
not one request reaches the capture server and not one call names an address outside
loopback. The first test shows the audit can fail: a connect to 10.255.255.1 made inside the
namespace, and a plain LangGraph run with that environment, are both caught.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pexpect
import psutil
import pytest

from suwen import privacy
from tests.conftest import REPO
from tests.fixtures_images import ImageCorpus
from tests.netns import Namespace, outside_addresses, tools_missing

pytestmark = pytest.mark.slow

SUWEN = Path(sys.executable).with_name("suwen")
QUESTION = "Is there a pneumothorax on this chest radiograph?"
PROMPT = r"suwen(\[[^\]\n]*\])?>"  # prompt_toolkit draws the prompt's space as a cursor move
SERVE_PORT = 18000  # the namespace has its own ports: nothing else listens there


def user_env(capture_url: str, **values: str) -> dict[str, str]:
    """A user's environment with tracing on and no offline variable: every place a library
    would send data to is the capture server."""
    dropped = ("SUWEN_", "LANGSMITH_", "LANGCHAIN_", "HF_", "VLLM_", "TRANSFORMERS_")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(dropped) and name not in privacy.FORCED_ENV
    }
    env.update(
        {
            "LANGSMITH_TRACING": "true",
            "LANGCHAIN_TRACING_V2": "true",
            "LANGSMITH_ENDPOINT": capture_url,
            "LANGCHAIN_ENDPOINT": capture_url,
            "LANGSMITH_API_KEY": "lsv2_pt_not_a_real_key",
            "HF_ENDPOINT": capture_url,
            "VLLM_USAGE_STATS_SERVER": capture_url,
            "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    assert "HF_HUB_OFFLINE" not in env and "DO_NOT_TRACK" not in env
    env.update(values)
    return env


class Capture:
    """The capture server, a process inside the namespace, logging every request."""

    def __init__(self, ns: Namespace, log: Path) -> None:
        self.log = log
        log.touch()
        self.process = ns.untraced(
            [sys.executable, "-m", "tests.capture_server", str(log)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def ns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Namespace]:
    assert not tools_missing(), f"missing tools: {tools_missing()} (.ci/run installs strace)"
    namespace = Namespace(tmp_path_factory.mktemp("netns-traces"))
    yield namespace
    namespace.close()


@pytest.fixture(scope="module")
def capture(ns: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Capture]:
    server = Capture(ns, tmp_path_factory.mktemp("capture") / "requests.log")
    yield server
    server.close()


def test_the_audit_catches_a_leak(ns: Namespace, tmp_path: Path) -> None:
    """Without Suwen in the way, the same set-up records both kinds of leak."""
    leak = textwrap.dedent(
        """
        import socket
        for family, address in ((socket.AF_INET, ("10.255.255.1", 443)),
                                (socket.AF_INET6, ("2001:4860:4860::8888", 80))):
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.connect(address)
                except OSError:
                    pass  # no route: nothing left the namespace
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.connect(("127.0.0.1", 9))
            except OSError:
                pass
        """
    )
    run = ns.run("control-connect", [sys.executable, "-c", leak], env=dict(os.environ))
    assert run.returncode == 0, run.stderr
    assert ns.outside()["control-connect"] == ["10.255.255.1:443", "2001:4860:4860::8888:80"]
    assert outside_addresses('connect(3, {sa_family=AF_UNIX, sun_path="/run/x"}, 9) = 0') == []

    capture = Capture(ns, tmp_path / "control.log")
    try:
        traced = textwrap.dedent(
            """
            from typing import TypedDict
            from langchain_core.tracers.langchain import wait_for_all_tracers
            from langgraph.graph import END, START, StateGraph
            class State(TypedDict):
                text: str
            graph = StateGraph(State)
            graph.add_node("step", lambda state: {"text": state["text"] + "!"})
            graph.add_edge(START, "step")
            graph.add_edge("step", END)
            graph.compile().invoke({"text": "patient MRN 12345"})
            wait_for_all_tracers()
            """
        )
        run = ns.run("control-trace", [sys.executable, "-c", traced], env=user_env(capture.url))
        assert run.returncode == 0, run.stderr
        assert capture.requests(), "a traced LangGraph run sent nothing to the capture server"
    finally:
        capture.close()


@pytest.fixture(scope="module")
def indexed_home(
    ns: Namespace,
    capture: Capture,
    tmp_path_factory: pytest.TempPathFactory,
    text_corpus: Path,
    image_corpus: ImageCorpus,
    minilm_path: Path,
    tiny_clip_dir: Path,
) -> tuple[Path, dict[str, subprocess.CompletedProcess[str]]]:
    """A data home indexed, searched (and a hub-id model tried) inside the namespace."""
    home = tmp_path_factory.mktemp("netns") / "home"
    # A few documents and cases: what is audited is where the CLI connects, not scale.
    corpus = home.parent / "corpus.json"
    pqal = json.loads((text_corpus / "pubmedqa_subset.json").read_text(encoding="utf-8"))
    corpus.write_text(json.dumps(dict(sorted(pqal.items())[:12])), encoding="utf-8")
    manifest = image_corpus.manifest.parent / "few.jsonl"
    manifest.write_text("".join(image_corpus.manifest.read_text().splitlines(True)[:6]))
    env = user_env(
        capture.url,
        SUWEN_HOME=str(home),
        SUWEN_TEXT_ENCODER=str(minilm_path),
        SUWEN_IMAGE_ENCODER=str(tiny_clip_dir),
        SUWEN_DEVICE="cpu",
    )
    image = image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg"
    commands = {
        "index-text": ["index", "text", "--name", "pubmed", str(corpus)],
        "index-images": ["index", "images", "--name", "images", str(manifest)],
        "search-text": ["search", "text", "tension pneumothorax", "-k", "3", "--json"],
        "search-image": ["search", "image", str(image), "-k", "3", "--json"],
    }
    runs = {name: ns.run(name, [str(SUWEN), *args], env=env) for name, args in commands.items()}
    # The default text encoder is a hub id with no local copy here.
    hub_env = {k: v for k, v in env.items() if k != "SUWEN_TEXT_ENCODER"}
    hub_args = [str(SUWEN), "index", "text", "--name", "hub", str(corpus)]
    runs["hub-model"] = ns.run("hub-model", hub_args, env=hub_env)
    return home, runs


def test_indexing_and_search_stay_on_the_machine(
    ns: Namespace,
    capture: Capture,
    indexed_home: tuple[Path, dict[str, subprocess.CompletedProcess[str]]],
) -> None:
    _home, runs = indexed_home
    for name in ("index-text", "index-images", "search-text", "search-image"):
        assert runs[name].returncode == 0, f"{name}: {runs[name].stderr}"
    assert json.loads(runs["search-text"].stdout), "text search found nothing"
    assert json.loads(runs["search-image"].stdout), "image search found nothing"
    hub = runs["hub-model"]
    assert hub.returncode == 4  # a model error: the encoder is not on this machine
    assert "Traceback" not in hub.stderr
    (line,) = [line for line in hub.stderr.splitlines() if line.startswith("error:")]
    assert "ncbi/MedCPT-Article-Encoder" in line and "not on this machine" in line
    assert "suwen models fetch medcpt" in line
    traced = ns.outside()
    assert set(runs) <= set(traced)
    assert {name: traced[name] for name in runs} == {name: [] for name in runs}
    assert capture.requests() == []


@pytest.mark.vllm
@pytest.mark.timeout(2400)  # one vLLM start-up and three agent runs, on a loaded machine
def test_ask_batch_and_chat_through_real_vllm_stay_on_the_machine(
    ns: Namespace,
    capture: Capture,
    indexed_home: tuple[Path, dict[str, subprocess.CompletedProcess[str]]],
    tiny_model_dir: Path,
    minilm_path: Path,
    tiny_clip_dir: Path,
    tmp_path: Path,
    shared_data: Path,
) -> None:
    home, _runs = indexed_home
    env = user_env(
        capture.url,
        SUWEN_HOME=str(home),
        SUWEN_TEXT_ENCODER=str(minilm_path),
        SUWEN_IMAGE_ENCODER=str(tiny_clip_dir),
        SUWEN_VLM=str(tiny_model_dir),
        SUWEN_VLLM_CPU_KVCACHE_GIB="1",
        SUWEN_VLLM_EXTRA_ARGS="--enforce-eager",
        SUWEN_MAX_TOKENS="24",
        SUWEN_ROUNDS="1",
        SUWEN_DEVICE="cpu",
    )
    image = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]
    serve = ns.popen(
        "serve",
        [str(SUWEN), "serve", "--port", str(SERVE_PORT)],
        env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ctrl_c_stops_it,
    )
    url = f"http://127.0.0.1:{SERVE_PORT}"
    try:
        _wait_for_serve(serve, url)
        ask = ns.run(
            "ask",
            [str(SUWEN), "ask", "--vllm-url", url, "--image", str(image), "--json", QUESTION],
            env=env,
        )
        assert ask.returncode in (0, 1), ask.stderr  # a random model may give no answer
        result = json.loads(ask.stdout)
        assert result["model_calls"] >= 3 and result["mode"] == "agent"
        assert result["tokens"]["completion"] > 0, "no model call succeeded"
        assert result["evidence"] or result["trace"], "the agent did not search"

        batch = _batch(ns, env, url, tmp_path, image)
        assert batch.returncode in (0, 1), batch.stderr
        lines = (tmp_path / "answers.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted(record["id"] for record in records) == ["q1", "q2"]
        assert not any("401" in record.get("error", "") for record in records)

        _chat(ns, env, url)
    finally:
        _stop_serve(serve)
    traced = ns.outside()
    for name in ("serve", "ask", "batch", "chat"):
        assert traced.get(name) == [], f"{name} reached outside loopback: {traced.get(name)}"
    assert capture.requests() == []


def _wait_for_serve(serve: subprocess.Popen[str], url: str) -> None:
    assert serve.stdout is not None
    seen = []
    for line in serve.stdout:
        seen.append(line)
        if f"{url}/v1" in line:
            return
    raise AssertionError("suwen serve ended before serving:\n" + "".join(seen[-30:]))


def _ctrl_c_stops_it() -> None:
    """Ctrl-C back to its default in the child: a test run started in the background of a shell
    without job control inherits SIGINT ignored, and `suwen serve` would never see the Ctrl-C
    that stops it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_serve(serve: subprocess.Popen[str]) -> None:
    """Ctrl-C for `suwen serve` (strace's child), then wait for the whole tree."""
    tracer = psutil.Process(serve.pid)
    for child in tracer.children():
        child.send_signal(signal.SIGINT)
    try:
        serve.wait(timeout=120)
    finally:
        serve.kill()


def _batch(
    ns: Namespace, env: dict[str, str], url: str, tmp_path: Path, image: Path
) -> subprocess.CompletedProcess[str]:
    folder = tmp_path / "questions"
    folder.mkdir()
    (folder / image.name).write_bytes(image.read_bytes())
    rows = [
        {"id": "q1", "question": QUESTION, "images": [image.name]},
        {"id": "q2", "question": "What is the first-line treatment of tension pneumothorax?"},
    ]
    (folder / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "answers.jsonl"
    # Two agent processes: what they search and ask is traced too (strace follows children).
    command = [str(SUWEN), "batch", str(folder), "--out", str(out), "--vllm-url", url]
    return ns.run("batch", [*command, "--processes", "2"], env)


def _chat(ns: Namespace, env: dict[str, str], url: str) -> None:
    chat_env = {**env, "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
    chat = ns.spawn(
        "chat", [str(SUWEN), "chat", "--vllm-url", url], chat_env, timeout=600, dimensions=(50, 160)
    )
    try:
        chat.expect(PROMPT)
        chat.sendline("What is the first-line treatment of tension pneumothorax?")
        # After an answer (or a one-line error) chat repeats the notice, then the prompt.
        chat.expect("not medical advice|error:", timeout=600)
        chat.expect(PROMPT, timeout=600)
        chat.sendline("/quit")
        chat.expect(pexpect.EOF, timeout=120)
    finally:
        chat.close(force=True)
