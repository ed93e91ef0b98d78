"""The process-wide privacy switches: the environment Suwen forces on itself and its children,
LangSmith tracing off around graph runs even when a caller turned it on, the one way to lift
hub-offline, where model requests may go, which vLLM flags a setting may add, and which
settings files are read."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import pytest

from suwen import privacy
from suwen.config import Settings, SettingsError, load_settings, refused_vllm_flag
from suwen.privacy import RemoteServerError, check_vllm_urls, is_loopback_url
from tests.capture_server import CaptureServer

SUWEN = Path(sys.executable).with_name("suwen")
USER_ENV = {
    "HF_HUB_OFFLINE": "0",
    "TRANSFORMERS_OFFLINE": "0",
    "HF_HUB_DISABLE_TELEMETRY": "0",
    "DO_NOT_TRACK": "0",
    "VLLM_NO_USAGE_STATS": "0",
    "LANGSMITH_TRACING": "true",
    "LANGCHAIN_TRACING_V2": "true",
    "LANGSMITH_API_KEY": "lsv2-user-key",
    "LANGCHAIN_API_KEY": "lsv2-user-key",
}


@pytest.fixture()
def user_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A user environment that asks for the hub, telemetry and tracing."""
    for name, value in USER_ENV.items():
        monkeypatch.setenv(name, value)
    for name in privacy.FORCED_ENV:
        if name not in USER_ENV:
            monkeypatch.delenv(name, raising=False)
    yield
    privacy.enforce()


@pytest.fixture()
def capture_server() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def test_enforce_overrides_the_users_environment(user_env: None) -> None:
    import huggingface_hub.constants as hub

    privacy.enforce()
    for name, value in privacy.FORCED_ENV.items():
        assert os.environ[name] == value, name
    assert "LANGSMITH_API_KEY" not in os.environ and "LANGCHAIN_API_KEY" not in os.environ
    assert hub.HF_HUB_OFFLINE is True


def test_allow_network_lifts_hub_offline_only_inside_and_never_for_children(
    user_env: None,
) -> None:
    import huggingface_hub.constants as hub

    privacy.enforce()
    with privacy.allow_network():
        assert os.environ["HF_HUB_OFFLINE"] == "0" and hub.HF_HUB_OFFLINE is False
        assert os.environ["LANGSMITH_TRACING"] == "false"  # tracing stays off
        assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
        assert privacy.child_env()["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.HF_HUB_OFFLINE is True


class _State(TypedDict):
    text: str


def _graph_run(tracing: bool) -> None:
    """A LangGraph run the way SuwenAgent runs one (inside no_tracing) or, as the control,
    a bare one."""
    from langchain_core.tracers.langchain import wait_for_all_tracers
    from langgraph.graph import END, START, StateGraph

    async def step(state: _State) -> _State:
        return {"text": state["text"] + " answered"}

    builder = StateGraph(_State)
    builder.add_node("step", step)
    builder.add_edge(START, "step")
    builder.add_edge("step", END)
    graph = builder.compile()

    async def run() -> None:
        if tracing:
            await graph.ainvoke({"text": "patient MRN 12345"})
        else:
            with privacy.no_tracing():
                await graph.ainvoke({"text": "patient MRN 12345"})

    asyncio.run(run())
    wait_for_all_tracers()


def test_graph_runs_send_nothing_to_langsmith_even_when_a_caller_enabled_it(
    user_env: None, capture_server: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import langsmith
    import langsmith.utils

    endpoint = capture_server.url
    monkeypatch.setenv("LANGSMITH_ENDPOINT", endpoint)
    langsmith.utils.get_env_var.cache_clear()
    langsmith.configure(enabled=True, client=langsmith.Client(api_url=endpoint, api_key="k"))
    try:
        # Control: this set-up does upload a bare run's inputs (the test can fail).
        _graph_run(tracing=True)
        assert capture_server.requests, "the control run sent no trace"
        capture_server.requests.clear()
        _graph_run(tracing=False)
        assert capture_server.requests == []
    finally:
        langsmith.configure(enabled=False, client=None)


def test_loopback_urls() -> None:
    local = ["http://127.0.0.1:8000", "http://localhost:8000/v1", "http://[::1]:9", "127.0.0.5:1"]
    remote = ["http://10.0.0.5:8000", "http://gpu-a:8000", "https://example.org", "http://[::2]"]
    assert all(is_loopback_url(url) for url in local)
    assert not any(is_loopback_url(url) for url in remote)
    assert check_vllm_urls(local, allow_remote=False) is None
    with pytest.raises(RemoteServerError, match=r"gpu-a:8000.*allow_remote_vllm=true"):
        check_vllm_urls(["http://127.0.0.1:1", "http://gpu-a:8000"], allow_remote=False)
    notice = check_vllm_urls(["http://gpu-a:8000"], allow_remote=True)
    assert notice == "sending questions and images to a remote vLLM server: http://gpu-a:8000"


@pytest.mark.parametrize(
    ("arg", "flag"),
    [
        ("--host", "--host"),
        ("--host=0.0.0.0", "--host"),
        ("--ho", "--host"),  # argparse takes unambiguous abbreviations
        ("--port=9", "--port"),
        ("--api-key", "--api-key"),
        ("--api_key=abc", "--api-key"),
        ("--trust-remote-code", "--trust-remote-code"),
        ("--no-trust-remote-code", "--trust-remote-code"),
        ("--allowed-local-media-path=/", "--allowed-local-media-path"),
        ("--allowed-origins", "--allowed-origins"),
        ("--ssl-keyfile", "--ssl-keyfile"),
        ("--root-path", "--root-path"),
        ("--uds=/tmp/s", "--uds"),
        ("--middleware", "--middleware"),
        ("--kv-transfer-config.kv_ip=10.0.0.1", "--kv-transfer-config"),
        ("--otlp-traces-endpoint", "--otlp-traces-endpoint"),
        ("--enable-log-requests", "--enable-log-requests"),
        ("--config=more.yaml", "--config"),
        ("-dpa", "-dpa"),
    ],
)
def test_refused_vllm_flags(arg: str, flag: str) -> None:
    assert refused_vllm_flag(arg) == flag
    with pytest.raises(SettingsError, match=f"{flag} may not be set"):
        load_settings(cli_values={"vllm_extra_args": [arg]})


@pytest.mark.parametrize(
    "arg",
    ["--enforce-eager", "--seed", "7", "--max-num-seqs=4", "--generation-config", "-tp", "-dp"],
)
def test_ordinary_vllm_flags_pass(arg: str) -> None:
    assert refused_vllm_flag(arg) is None
    assert load_settings(cli_values={"vllm_extra_args": [arg]}).settings.vllm_extra_args == [arg]


def suwen(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SUWEN), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_settings_file_others_can_write_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "suwen.toml"
    config.write_text('vllm_url = ["http://10.1.2.3:8000"]\n')
    for mode in (0o664, 0o646):
        config.chmod(mode)
        with pytest.raises(SettingsError, match="writable by group or others"):
            load_settings(config)
        env = {**os.environ, "SUWEN_HOME": str(tmp_path / "home")}
        run = suwen("--config", str(config), "config", "show", env=env)
        assert run.returncode == 2
        (line,) = run.stderr.strip().splitlines()
        assert str(config) in line.replace("\n", "") and "writable by group or others" in line
    config.chmod(0o644)
    assert load_settings(config).settings.vllm_url == ["http://10.1.2.3:8000"]


def test_the_settings_file_in_the_data_home_is_checked_too(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "suwen.toml").write_text("rounds = 3\n")
    (home / "suwen.toml").chmod(0o666)
    with pytest.raises(SettingsError, match="writable by group or others"):
        load_settings(cli_values={"home": home})


def test_settings_have_the_new_knobs(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    assert settings.allow_remote_vllm is False
    assert settings.vllm_data_parallel_size == 1


def test_a_remote_server_is_refused_or_announced_on_every_run(tmp_path: Path) -> None:
    from suwen.runtime import open_agent
    from tests.test_ask import Opened

    notices: list[str] = []

    async def run(settings: Settings) -> None:
        backends = Opened().backends()
        async with open_agent(
            settings, ["http://gpu-a:8000"], backends=backends, on_notice=notices.append
        ):
            pass

    with pytest.raises(RemoteServerError):
        asyncio.run(run(Settings(home=tmp_path / "home")))
    asyncio.run(run(Settings(home=tmp_path / "home", allow_remote_vllm=True)))
    assert notices == ["sending questions and images to a remote vLLM server: http://gpu-a:8000"]


def test_the_cli_refuses_a_remote_server_before_sending_anything(tmp_path: Path) -> None:
    env = {**os.environ, "SUWEN_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    run = suwen("ask", "--vllm-url", "http://10.255.255.1:8000", "Is this asthma?", env=env)
    assert run.returncode == 2
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "http://10.255.255.1:8000" in line and "allow_remote_vllm" in line
