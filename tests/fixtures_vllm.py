"""Session fixtures for the vllm layer: the tiny Lingshu-architecture checkpoint, and ONE real
vLLM server on it per test session (starting one costs 35 s or more on 2 cores).

Public fixtures for end-to-end tests:
- ``tiny_model_dir``: the tiny random Qwen2.5-VL checkpoint (built once, offline);
- ``vllm_settings``: Settings for the tiny model on the CPU (1 GiB KV cache, home in tmp);
- ``vllm_url``: the base URL (``http://127.0.0.1:PORT``) of the running server; pass it as
  ``--vllm-url`` or to ``VLLMClient([vllm_url], vllm_settings)``;
- ``vllm_server``: the ManagedServer itself (log path, pid), stopped at session end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.llm.server import ManagedServer, free_port

HOST = "127.0.0.1"


def tiny_settings(model_dir: Path, home: Path, **overrides: object) -> Settings:
    """Settings for serving the tiny checkpoint on a CPU in tests."""
    values: dict[str, object] = {
        "home": home,
        "vlm": str(model_dir),
        "vllm_cpu_kvcache_gib": 1,
        # Eager mode: torch.compile of even this tiny model takes minutes on a busy CPU
        # (engine init 140 s vs 0.5 s measured here); tests gain nothing from compiled speed.
        "vllm_extra_args": ["--enforce-eager"],
        "vllm_startup_timeout": 900.0,  # first start compiles; other tests share the CPUs
        "request_timeout": 120.0,
        "max_tokens": 64,
        **overrides,
    }
    return Settings.model_validate(values)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from suwen.devtools.tiny_qwen import write_tiny_model

    directory = tmp_path_factory.mktemp("tiny-qwen") / "model"
    write_tiny_model(directory)
    return directory


@pytest.fixture(scope="session")
def vllm_settings(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings(tiny_model_dir, tmp_path_factory.mktemp("vllm-home"))


@pytest.fixture(scope="session")
def vllm_server(vllm_settings: Settings) -> Iterator[ManagedServer]:
    with ManagedServer(vllm_settings, port=free_port(HOST), host=HOST) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_url(vllm_server: ManagedServer) -> str:
    return vllm_server.url
