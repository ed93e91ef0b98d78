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
from suwen.errors import InputError, ServerError
from suwen.llm import server as server_module
from suwen.llm.server import (
    ManagedServer,
    failure_reason,
    free_port,
    open_model,
    server_command,
    server_env,
)
from tests.terminal_signals import default_signal_actions

# Serves /health (and /v1/models) on argv[1]; starts a long-lived child like vLLM's engine
# core. With argv[2] == "fail" it prints a traceback-style error and exits instead; with "hang"
# it never becomes healthy (a model still loading).
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, json, subprocess, sys
    port, mode = int(sys.argv[1]), sys.argv[2]
    if mode == "fail":
        print("INFO loading model", flush=True)
        print("ValueError: unsupported dtype 'float7' for this model", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    if mode == "hang":
        import time
        time.sleep(600)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "fake"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    print("fake vLLM child", child.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
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
    """Make ManagedServer launch FAKE_SERVER; the list selects its mode ("ok" or "fail")."""
    mode = ["ok"]

    def command(settings: Settings, model: str, host: str, port: int) -> list[str]:
        return [sys.executable, "-c", FAKE_SERVER, str(port), mode[0]]

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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(server_module, "is_cpu_build", lambda: True)
    env = server_env(Settings(home=tmp_path, vllm_cpu_kvcache_gib=3))
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"
    assert env["HF_HUB_OFFLINE"] == "1"
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
        assert len(members) == 2  # the server and its engine-like child
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
    async def main() -> list[str]:
        async with open_model(settings, ["http://gpu-a:8000/v1", "http://gpu-b:8000"]) as client:
            assert started_here() == []
            return client.urls

    assert asyncio.run(main()) == ["http://gpu-a:8000", "http://gpu-b:8000"]


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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
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
        assert len(members) == 2
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
        while time.monotonic() < deadline and len(members) < 2:
            members = watched.children(recursive=True)  # the server and its engine child
            time.sleep(0.05)
        assert len(members) == 2, members
        parent.send_signal(signum)
        parent.wait(timeout=30)  # not the 600 s start-up timeout
        assert_all_gone(members)
    finally:
        parent.kill()
