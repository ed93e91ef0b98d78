"""What a run's answers came from, recorded in run.json: the model's revision and the vLLM
server's version.

The model revision is read from the model directory when the model is local (the Hugging Face
snapshot commit when it sits in a hub cache's ``snapshots/<commit>/``, and the SHA-256 of its
``config.json`` and ``generation_config.json``, whose defaults a server may apply); the vLLM
version is what each server's ``/version`` endpoint says.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from suwen.digests import sha256_of
from suwen.errors import InputError

VERSION_TIMEOUT = 5.0


def _sha256(path: Path) -> str | None:
    try:
        return sha256_of(path)
    except InputError:
        return None


def model_revision(model: str) -> dict[str, Any]:
    """The revision of ``model`` (a local directory or a hub id / served name)."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return {"name": model, "local": False, "revision": None}
    folder = folder.resolve()
    revision = folder.name if folder.parent.name == "snapshots" else None
    info: dict[str, Any] = {
        "name": model,
        "local": True,
        "revision": revision,
        "config_sha256": _sha256(folder / "config.json"),
        "generation_config_sha256": _sha256(folder / "generation_config.json"),
        "weights_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
    }
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        info["transformers_version"] = config.get("transformers_version")
    except (OSError, ValueError, AttributeError):
        pass
    return info


async def vllm_versions(urls: Sequence[str]) -> dict[str, str | None]:
    """Each server's vLLM version from ``GET /version`` (None when it does not say). Only the
    configured servers are asked; the environment's proxies are not used."""
    versions: dict[str, str | None] = {}
    async with httpx.AsyncClient(timeout=VERSION_TIMEOUT, trust_env=False) as http:
        for url in urls:
            try:
                response = await http.get(f"{url.rstrip('/')}/version")
                value = response.json().get("version") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                value = None
            versions[url] = str(value) if value is not None else None
    return versions


async def provenance(model: str, urls: Sequence[str]) -> dict[str, Any]:
    return {"model": model_revision(model), "vllm_version": await vllm_versions(urls)}
