"""The managed server's command line, environment, start-up failures, port choice, restart
and clean shutdown. A few-line fake server (an HTTP /health endpoint that also starts a child
process, like vLLM's engine) stands in for vLLM here so every path runs in seconds; the real
vLLM is exercised in test_llm_vllm.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from suwen.config import Settings
from suwen.errors import InputError, ModelError, ServerError
from suwen.llm import server as server_module
from suwen.llm.base import Message
from suwen.llm.client import VLLMClient
from suwen.llm.server import (
    ManagedServer,
    failure_reason,
    free_port,
    open_model,
    server_command,
    server_env,
)
from suwen.privacy import RemoteServerError
from tests.capture_server import CaptureServer
from tests.terminal_signals import default_signal_actions

# Serves /health (and /v1/models); answers chat completions with "fake answer" after
# FAKE_POST_DELAY seconds, to callers with the key vLLM would take from VLLM_API_KEY; starts a
# long-lived child like vLLM's engine core. Modes (argv[2]): "ok"; "fail" prints a
# traceback-style error and exits; "hang" never becomes healthy (a model still loading);
# "patient" waits instead of failing when its port is taken (argv[3]: a file it creates
# then); "inuse-once" fails like vLLM on a taken port the first time (argv[3]: marker file).
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, json, os, pathlib, subprocess, sys, time
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "fail":
        print("INFO loading model", flush=True)
        print("ValueError: unsupported dtype 'float7' for this model", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(1)
    if mode == "inuse-once" and not pathlib.Path(sys.argv[3]).exists():
        pathlib.Path(sys.argv[3]).touch()
        print("OSError: [Errno 98] error while attempting to bind on address "
              "('127.0.0.1', %d): address already in use" % port, flush=True)
        sys.exit(1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if mode == "hang":
        time.sleep(600)
    KEY = os.environ.get("VLLM_API_KEY")
    COMPLETION = {
        "choices": [{"message": {"content": "fake answer"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def authorized(self):
            return KEY is None or self.headers.get("Authorization") == "Bearer " + KEY
        def do_GET(self):
            if self.path.startswith("/v1") and not self.authorized():
                return self.reply(401, {"error": "Unauthorized"})
            self.reply(200, {"data": [{"id": "fake"}]})
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.authorized():
                return self.reply(401, {"error": "Unauthorized"})
            time.sleep(float(os.environ.get("FAKE_POST_DELAY", "0")))
            self.reply(200, COMPLETION)
        def log_message(self, *args):
            pass
    print("fake vLLM child", child.pid, flush=True)
    try:
        server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    except OSError:
        if mode == "patient":
            pathlib.Path(sys.argv[3]).touch()
            time.sleep(600)
        raise
    server.serve_forever()
    """
)


_before: set[object] = set()


@pytest.fixture(autouse=True)
def _servers_running_before() -> None:
    """The session's real vLLM server (other tests' fixture) may be live: ignore it."""
    _before.clear()
    _before.update(server_module.managed_servers())


def started_here() -> list[object]:
    """Managed servers started by the current test."""
    return [s for s in server_module.managed_servers() if s not in _before]


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home", vllm_startup_timeout=60.0, vlm="fake")


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make ManagedServer launch FAKE_SERVER; the list holds its mode and arguments."""
    mode = ["ok"]

    def command(settings: Settings, model: str, host: str, port: int) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(port), *mode]

    monkeypatch.setattr(server_module, "server_command", command)
    monkeypatch.setattr(server_module, "HEALTH_POLL_SECONDS", 0.1)
    return mode


def group_members(server: ManagedServer) -> list[psutil.Process]:
    assert server.pid is not None
    parent = psutil.Process(server.pid)
    return [parent, *parent.children(recursive=True)]


def assert_all_gone(processes: list[psutil.Process]) -> None:
    _gone, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"left running: {alive}"


def test_command_has_lingshu_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        vllm_max_model_len=16384,
        vllm_dtype="bfloat16",
        vllm_tensor_parallel_size=2,
        vllm_data_parallel_size=3,
        vllm_gpu_memory_utilization=0.8,
        vllm_max_images=3,
        vllm_extra_args=["--seed", "7"],
    )
    command = server_command(settings, "lingshu-medical-mllm/Lingshu-7B", "127.0.0.1", 8123)
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--model") == value("--served-model-name") == "lingshu-medical-mllm/Lingshu-7B"
    assert value("--port") == "8123"
    assert value("--max-model-len") == "16384"
    assert value("--dtype") == "bfloat16"
    assert value("--tensor-parallel-size") == "2"
    assert value("--data-parallel-size") == "3"
    # Sampling comes from each request, not from the checkpoint's generation_config.json.
    assert value("--generation-config") == "vllm"
    assert value("--host") == "127.0.0.1"
    assert not any("api-key" in arg or "api_key" in arg for arg in command)
    assert value("--gpu-memory-utilization") == "0.8"
    assert "--enable-prefix-caching" in command
    assert json.loads(value("--limit-mm-per-prompt")) == {"image": 3, "video": 0}
    size = json.loads(value("--mm-processor-kwargs"))["size"]
    assert size == {"shortest_edge": 3136, "longest_edge": settings.vllm_image_max_pixels}
    assert json.loads(value("--structured-outputs-config"))["disable_any_whitespace"] is True
    assert command[-2:] == ["--seed", "7"]


def test_users_structured_output_config_wins(tmp_path: Path) -> None:
    mine = '--structured-outputs-config={"backend": "guidance"}'
    settings = Settings(home=tmp_path, vllm_extra_args=[mine])
    command = server_command(settings, "m", "127.0.0.1", 1)
    assert [arg for arg in command if arg.startswith("--structured-outputs-config")] == [mine]


def test_environment_is_private_and_sizes_cpu_kv_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the user's environment says.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("VLLM_NO_USAGE_STATS", "0")
    monkeypatch.setenv("LANGSMITH_TRACING", "true")
    monkeypatch.setenv("LANGSMITH_API_KEY", "user-key")
    monkeypatch.setenv("LANGSMITH_ENDPOINT", "http://10.9.9.9")
    monkeypatch.setattr(server_module, "is_cpu_build", lambda: True)
    env = server_env(Settings(home=tmp_path, vllm_cpu_kvcache_gib=3), "secret", "127.0.0.1")
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["LANGSMITH_TRACING"] == env["LANGCHAIN_TRACING_V2"] == "false"
    assert "LANGSMITH_API_KEY" not in env and "LANGSMITH_ENDPOINT" not in env
    # vLLM learns its address instead of connecting a socket to 8.8.8.8 to find it.
    assert env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_API_KEY"] == "secret"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    monkeypatch.setattr(server_module, "is_cpu_build", lambda: False)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert "VLLM_CPU_KVCACHE_SPACE" not in server_env(Settings(home=tmp_path))


def test_failure_reason_skips_generic_engine_errors() -> None:
    log = (
        "INFO starting\n"
        "(EngineCore pid=1) ValueError: max_model_len 99999 is larger than the model's 32768\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert failure_reason(log) == "ValueError: max_model_len 99999 is larger than the model's 32768"
    assert failure_reason("INFO all good\n") is None


def test_vllm_missing_names_the_install_command(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "vllm_installed", lambda: False)
    with pytest.raises(ServerError, match=r"scripts/setup\.sh.*pip install -e '\.\[gpu\]'"):
        ManagedServer(settings).start()


def test_missing_model_directory_fails_before_starting(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"model directory .*nowhere not found"):
        ManagedServer(settings, model=str(tmp_path / "nowhere")).start()
    assert not settings.logs_dir.exists()


def test_failed_start_says_why_and_shows_the_log(settings: Settings, fake_vllm: list[str]) -> None:
    fake_vllm[0] = "fail"
    server = ManagedServer(settings, port=free_port("127.0.0.1"))
    with pytest.raises(ServerError) as raised:
        server.start()
    first, *tail = str(raised.value).splitlines()
    assert "exited with code 1 while starting" in first
    assert "ValueError: unsupported dtype 'float7'" in first
    assert str(settings.logs_dir) in first
    assert any("INFO loading model" in line for line in tail)
    assert server.log_path is not None and server.log_path.parent == settings.logs_dir
    assert started_here() == []


def test_start_serves_and_stop_leaves_no_process(settings: Settings, fake_vllm: list[str]) -> None:
    with ManagedServer(settings, port=free_port("127.0.0.1")) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        members = group_members(server)
        assert len(members) == 3  # the guard, the server and its engine-like child
        assert server in server_module.managed_servers()
    assert_all_gone(members)
    assert started_here() == []


def test_busy_port_moves_or_fails_when_named(settings: Settings, fake_vllm: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} on 127.0.0.1 is in use"):
            ManagedServer(settings, port=port, strict_port=True).start()
        with ManagedServer(settings, port=port) as server:
            assert server.port != port
            assert httpx.get(f"{server.url}/health").status_code == 200


def test_dead_server_is_restarted_once(settings: Settings, fake_vllm: list[str]) -> None:
    with ManagedServer(settings, port=free_port("127.0.0.1"), max_restarts=1) as server:
        first = group_members(server)
        os.killpg(first[0].pid, signal.SIGKILL)
        assert_all_gone(first)
        deadline = time.monotonic() + 30
        while not (server.restarts == 1 and server.running() and server.status() is None):
            assert time.monotonic() < deadline, "server was not restarted"
            time.sleep(0.1)
        assert httpx.get(f"{server.url}/health").status_code == 200
        second = group_members(server)
        os.killpg(second[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while server.failure is None:
            assert time.monotonic() < deadline, "second death was not noticed"
            time.sleep(0.1)
        assert "died" in server.failure and "after 1 restart(s)" in server.failure
    assert_all_gone(second)


def test_open_model_starts_and_stops_a_managed_server(
    settings: Settings, fake_vllm: list[str]
) -> None:
    settings.vllm_port = free_port("127.0.0.1")
    with open_model(settings) as client:
        assert client.urls == [f"http://127.0.0.1:{settings.vllm_port}"]
        (server,) = started_here()
        members = group_members(server)
    assert_all_gone(members)


def test_async_open_model_uses_given_urls_without_a_server(settings: Settings) -> None:
    remote = ["http://gpu-a:8000/v1", "http://gpu-b:8000"]

    async def main(settings: Settings) -> list[str]:
        async with open_model(settings, remote) as client:
            assert started_here() == []
            return client.urls

    # Questions and images leave the machine only when a setting says they may.
    with pytest.raises(RemoteServerError, match=r"gpu-a:8000.*allow_remote_vllm"):
        asyncio.run(main(settings))
    allowed = settings.model_copy(update={"allow_remote_vllm": True})
    assert asyncio.run(main(allowed)) == ["http://gpu-a:8000", "http://gpu-b:8000"]


def test_async_open_model_stops_the_server_on_an_exception(
    settings: Settings, fake_vllm: list[str]
) -> None:
    settings.vllm_port = free_port("127.0.0.1")
    members: list[psutil.Process] = []

    async def main() -> None:
        async with open_model(settings):
            (server,) = started_here()
            members.extend(group_members(server))
            raise KeyError("boom")

    with pytest.raises(KeyError):
        asyncio.run(main())
    assert members
    assert_all_gone(members)


# A Python process that starts a managed (fake) server, reports the server's pid, and waits.
PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from suwen.config import Settings
    from suwen.llm import server as server_module
    fake = [sys.executable, "-c", sys.argv[2]]
    server_module.server_command = lambda s, m, h, port: [*fake, str(port), "ok"]
    settings = Settings(home=Path(sys.argv[1]), vllm_port={port}, vlm="fake")
    with server_module.open_model(settings):
        (server,) = server_module.managed_servers()
        print("server", server.pid, flush=True)
        time.sleep(600)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL])
def test_killing_the_parent_leaves_no_orphan(tmp_path: Path, signum: signal.Signals) -> None:
    code = PARENT.replace("{port}", str(free_port("127.0.0.1")))
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), FAKE_SERVER],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=default_signal_actions,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.startswith("server "), line
        server = psutil.Process(int(line.split()[1]))
        members = [server, *server.children(recursive=True)]
        assert len(members) == 3  # the guard, the server and its engine-like child
        parent.send_signal(signum)
        parent.wait(timeout=30)
        assert_all_gone(members)
    finally:
        parent.kill()


# A Python process that starts a managed (fake) server the way the commands do (async, the
# start in a thread) while that server never gets healthy: a signal arrives during start-up.
STARTING_PARENT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from suwen.config import Settings
    from suwen.llm import server as server_module
    fake = [sys.executable, "-c", sys.argv[2]]
    server_module.server_command = lambda s, m, h, port: [*fake, str(port), "hang"]
    settings = Settings(
        home=Path(sys.argv[1]), vllm_port={port}, vlm="fake", vllm_startup_timeout=600
    )
    async def main():
        async with server_module.open_model(settings):
            pass
    asyncio.run(main())
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_stops_the_starting_server(
    tmp_path: Path, signum: signal.Signals
) -> None:
    code = STARTING_PARENT.replace("{port}", str(free_port("127.0.0.1")))
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), FAKE_SERVER], preexec_fn=default_signal_actions
    )
    try:
        watched = psutil.Process(parent.pid)
        deadline = time.monotonic() + 60
        members: list[psutil.Process] = []
        while time.monotonic() < deadline and len(members) < 3:
            # the guard, the server and its engine child
            members = watched.children(recursive=True)
            time.sleep(0.05)
        assert len(members) == 3, members
        parent.send_signal(signum)
        parent.wait(timeout=30)  # not the 600 s start-up timeout
        assert_all_gone(members)
    finally:
        parent.kill()


def test_the_api_key_is_in_the_servers_environment_only_and_the_client_sends_it(
    settings: Settings, fake_vllm: list[str]
) -> None:
    settings.vllm_port = free_port("127.0.0.1")

    async def main() -> str:
        async with open_model(settings) as client:
            (server,) = started_here()
            for member in group_members(server):
                assert not any(server.api_key in arg for arg in member.cmdline())
            assert group_members(server)[1].environ()["VLLM_API_KEY"] == server.api_key
            # Another local user, without the key, is turned away.
            url = f"{server.url}/v1/chat/completions"
            async with httpx.AsyncClient() as stranger:
                assert (await stranger.post(url, json={})).status_code == 401
            reply = await client.chat([Message(role="user", text="hello")])
            return reply.text

    assert asyncio.run(main()) == "fake answer"


def test_a_port_taken_before_the_server_binds_is_chosen_again(
    settings: Settings, fake_vllm: list[str], tmp_path: Path
) -> None:
    fake_vllm[:] = ["inuse-once", str(tmp_path / "refused-once")]
    first = free_port("127.0.0.1")
    with ManagedServer(settings, port=first) as server:
        assert server.port != first
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.log_path is not None
        assert f"port {first} taken" in server.log_path.read_text()


def test_a_port_another_process_answers_on_is_never_used(
    settings: Settings, fake_vllm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process binds the port between Suwen's check and vLLM's bind, and answers
    /health: Suwen sees that the listener is not its own and never sends it a question."""
    monkeypatch.setattr(server_module, "port_is_free", lambda host, port: True)
    fake_vllm[:] = ["patient", str(tmp_path / "found-it-taken")]
    with CaptureServer() as impostor:
        port = int(impostor.url.rsplit(":", 1)[1])
        with pytest.raises(ServerError, match=f"port {port} .* taken by another process"):
            ManagedServer(settings, port=port, strict_port=True).start()
        assert started_here() == []
        with open_model(settings.model_copy(update={"vllm_port": port})) as client:
            assert client.urls != [impostor.url]
            (server,) = started_here()
            assert httpx.get(f"{server.url}/health").status_code == 200
    assert all(request.startswith("GET /health") for request in impostor.requests)


# A Python process that starts a managed (fake) server and waits, printing the guard's pid.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from suwen.config import Settings
    from suwen.llm import server as server_module
    fake = [sys.executable, "-c", sys.argv[2]]
    server_module.server_command = lambda s, m, h, port: [*fake, str(port), "ok"]
    settings = Settings(home=Path(sys.argv[1]), vllm_port={port}, vlm="fake")
    with server_module.open_model(settings):
        (server,) = server_module.managed_servers()
        print("guard", server.pid, flush=True)
        time.sleep(600)
    """
)


def test_a_stale_server_left_by_a_dead_run_is_ended_by_the_next(
    settings: Settings, fake_vllm: list[str]
) -> None:
    """The run and its guard both die by SIGKILL (say, the OOM killer on a full machine):
    vLLM's engine is left behind; the next run in the same data home finds and ends it."""
    code = HOLDER.replace("{port}", str(free_port("127.0.0.1")))
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(settings.home), FAKE_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.startswith("guard "), line
        guard = psutil.Process(int(line.split()[1]))
        (server,) = guard.children()
        (engine,) = server.children()
        (record,) = (settings.home / "run").glob("vllm-*.json")
        assert record.stat().st_mode & 0o777 == 0o600
        holder.send_signal(signal.SIGSTOP)  # it cannot clean up now
        guard.kill()
        holder.kill()
        holder.wait(timeout=30)
        # The parent-death signal took the API server with its guard; the engine is left.
        assert_all_gone([guard, server])
        assert engine.is_running()
        with ManagedServer(settings, port=free_port("127.0.0.1")) as fresh:
            (ended,) = fresh.ended_stale  # the dead run's server command line
            assert ended.startswith(sys.executable) and ended.endswith(" ok")
            assert fresh.log_path is not None
            assert "ended a stale vLLM server" in fresh.log_path.read_text()
            assert_all_gone([engine])
            assert [path.name for path in (settings.home / "run").glob("vllm-*")] == [
                f"vllm-{fresh.pid}.json"
            ]
        assert list((settings.home / "run").glob("vllm-*")) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_live_runs_server_is_not_taken_for_a_stale_one(
    settings: Settings, fake_vllm: list[str]
) -> None:
    with ManagedServer(settings, port=free_port("127.0.0.1")) as first:
        members = group_members(first)
        with ManagedServer(settings, port=free_port("127.0.0.1")) as second:
            assert second.ended_stale == []
            assert all(member.is_running() for member in members)


def test_clients_of_the_same_data_home_have_the_key_others_do_not(
    settings: Settings, fake_vllm: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`suwen serve` and the commands pointed at it with --vllm-url share the data home's key
    (0600, in the 0700 home); a client of another data home is turned away."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    async def ask(url: str, client_settings: Settings) -> str:
        async with VLLMClient([url], client_settings) as client:
            return (await client.chat([Message(role="user", text="hello")])).text

    with ManagedServer(settings, port=free_port("127.0.0.1")) as server:
        key_file = settings.home / "run" / "api-key"
        assert key_file.read_text() == server.api_key
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert asyncio.run(ask(server.url, settings)) == "fake answer"
        with pytest.raises(ModelError, match=r"401|Unauthorized"):
            asyncio.run(ask(server.url, Settings(home=tmp_path / "other-home")))


def test_a_refused_flag_slipped_past_validation_still_never_reaches_vllm(tmp_path: Path) -> None:
    unchecked = Settings(home=tmp_path).model_copy(update={"vllm_extra_args": ["--host=0.0.0.0"]})
    with pytest.raises(ServerError, match="--host may not be set"):
        server_command(unchecked, "m", "127.0.0.1", 1)


def test_the_guard_refuses_a_malformed_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "suwen.llm.guard", "x", "sleep", "1"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage:" in done.stderr
