"""Nothing leaves the machine, and what Suwen writes is its user's alone.

One place decides both, whatever the user's environment says:

- ``enforce()`` (the CLI's entry and ``runtime.open_agent`` call it) forces the Hugging Face
  hub offline with its telemetry off, vLLM's usage statistics off, and LangSmith/LangChain
  tracing off, removing LangSmith's endpoints and keys from the environment every child
  inherits. Libraries that read those settings once at import (``huggingface_hub``) are
  updated too when already imported.
- ``no_tracing()`` wraps every graph run: LangSmith decides per run from a context variable
  before it looks at the environment, so this holds even for a caller that configured tracing
  itself.
- ``child_env()`` is the environment for every process Suwen starts (the managed vLLM server).
- ``allow_network()`` is the one way to lift hub-offline, for explicit download commands only
  (``suwen models fetch``, ``suwen data fetch``); children stay offline even then.
- ``private_umask()`` and ``private_dir()``: files and folders Suwen creates are readable by
  their owner only (umask 077, data home 0700).
- ``check_vllm_urls()``: model requests go to loopback unless ``allow_remote_vllm`` is set.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from suwen.errors import InputError

# Values forced in Suwen's own environment and every child's.
HUB_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
FORCED_ENV = {
    **HUB_OFFLINE,
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    # langsmith reads TRACING_V2, then TRACING, under both prefixes.
    "LANGSMITH_TRACING": "false",
    "LANGSMITH_TRACING_V2": "false",
    "LANGCHAIN_TRACING": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_OTEL_ENABLED": "false",
    # ONNX Runtime's Linux wheels carry Microsoft's 1DS event uploader (OneCollector), which
    # resolves its collector's address from worker threads; off before any session exists.
    "ORT_DISABLE_TELEMETRY": "1",
}
# Where LangSmith would send traces and what would authenticate them: gone, so that even a
# library that ignores the tracing switch has nowhere to send and nothing to send with.
REMOVED_ENV = (
    "LANGSMITH_ENDPOINT",
    "LANGCHAIN_ENDPOINT",
    "LANGSMITH_RUNS_ENDPOINTS",
    "LANGSMITH_API_KEY",
    "LANGCHAIN_API_KEY",
    "LANGSMITH_OTEL_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)
PRIVATE_UMASK = 0o077
PRIVATE_DIR_MODE = 0o700

_network_allowed = False


class RemoteServerError(InputError):
    """A model server outside this machine was configured without ``allow_remote_vllm``."""


def enforce() -> None:
    """Force the offline, untraced environment on this process (idempotent, cheap)."""
    os.environ.update(FORCED_ENV)
    if _network_allowed:
        os.environ.update(dict.fromkeys(HUB_OFFLINE, "0"))
    for name in REMOVED_ENV:
        os.environ.pop(name, None)
    _set_hub_offline(not _network_allowed)
    _refresh_langsmith()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process Suwen starts: this one's, offline and untraced (even
    inside ``allow_network``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in REMOVED_ENV}
    env.update(FORCED_ENV)
    env.update(extra or {})
    return env


@contextmanager
def allow_network() -> Iterator[None]:
    """Lift hub-offline for the block: for explicit download commands only. Telemetry and
    tracing stay off, and children started inside still get the offline environment."""
    global _network_allowed
    previous = _network_allowed
    _network_allowed = True
    enforce()
    try:
        yield
    finally:
        _network_allowed = previous
        enforce()


@contextmanager
def no_tracing() -> Iterator[None]:
    """LangSmith tracing off for the block (around every graph run)."""
    enforce()
    try:
        from langsmith.run_helpers import tracing_context
    except ImportError:  # langsmith absent: nothing can trace
        yield
        return
    with tracing_context(enabled=False):
        yield


def _set_hub_offline(offline: bool) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; transformers asks it.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = offline  # type: ignore[attr-defined]
        constants.HF_HUB_DISABLE_TELEMETRY = True  # type: ignore[attr-defined]


def _refresh_langsmith() -> None:
    # langsmith caches environment lookups; a value read before enforce() must not stick.
    utils = sys.modules.get("langsmith.utils")
    if utils is not None:
        for name in ("get_env_var", "get_tracer_project"):
            cached = getattr(utils, name, None)
            clear = getattr(cached, "cache_clear", None)
            if callable(clear):
                clear()
    if "langsmith.run_trees" in sys.modules:
        from langsmith.run_trees import configure

        configure(enabled=False)


# -- private at rest -------------------------------------------------------------------------


def private_umask() -> None:
    """Everything this process (and every child) creates from now on: owner only."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing and make it 0700 (the data home)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
        path.chmod(PRIVATE_DIR_MODE)
    return path


# -- who may use a local vLLM server ---------------------------------------------------------

API_KEY_FILE = Path("run") / "api-key"


def local_api_key(home: Path, create: bool = False) -> str | None:
    """The API key of the vLLM servers Suwen starts from the data home ``home``: the user's
    ``VLLM_API_KEY`` when set, else a random key kept owner-only in the home (made on first
    use when ``create``), so ``suwen serve`` and the commands pointed at it with
    ``--vllm-url`` agree without the key ever appearing on a command line."""
    from_env = os.environ.get("VLLM_API_KEY")
    if from_env:
        return from_env
    path = home / API_KEY_FILE
    try:
        return path.read_text(encoding="ascii").strip() or None
    except FileNotFoundError:
        if not create:
            return None
    private_dir(path.parent)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another run made it first
        return path.read_text(encoding="ascii").strip() or None
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(secrets.token_urlsafe(32))
    return path.read_text(encoding="ascii").strip()


# -- models that are not on this machine -----------------------------------------------------


def hub_id_of(model: str) -> str | None:
    """The hub repository ``model`` names, or None when it is a path on this machine."""
    if model.startswith(("/", "./", "../", "~")) or Path(model).expanduser().exists():
        return None
    repo = model.removeprefix("hf-hub:")
    return repo if repo.count("/") == 1 else None


def cached_locally(repo_id: str) -> bool:
    """True when the Hugging Face cache holds a snapshot of ``repo_id`` (its config)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "open_clip_config.json"):
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str):
            return True
    return False


def fetch_hint(model: str, setting: str) -> str:
    """What to do about ``model`` (a hub id) missing here: the download command for it, or
    pointing ``setting`` at a local copy."""
    from suwen.models import MODELS

    repo = model.removeprefix("hf-hub:")
    names = [spec.name for spec in MODELS.values() if any(r.repo_id == repo for r in spec.repos)]
    command = f"run `suwen models fetch {names[0]}`" if names else "download it"
    return f"{command} or set {setting} to a local model directory"


def missing_model_message(what: str, model: str, setting: str) -> str | None:
    """One line when ``model`` is a hub id with no local copy (Suwen never downloads outside
    `suwen models fetch`), else None."""
    repo = hub_id_of(model)
    if repo is None or cached_locally(repo):
        return None
    hint = fetch_hint(model, setting)
    return f"{what} {model!r} is not on this machine (hub access is off): {hint}"


# -- where model requests may go -------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    """True for a URL on this machine: ``localhost``, 127.0.0.0/8 or ::1 (no name lookup)."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_vllm_urls(urls: Sequence[str], allow_remote: bool) -> str | None:
    """Refuse a model server outside this machine unless ``allow_remote``; with it, the one
    line every run says (None when every URL is local)."""
    remote = [url for url in urls if not is_loopback_url(url)]
    if not remote:
        return None
    if not allow_remote:
        raise RemoteServerError(
            f"vllm_url {', '.join(remote)}: not on this machine; questions and images would "
            "leave it. Set allow_remote_vllm=true to allow a remote server"
        )
    return f"sending questions and images to a remote vLLM server: {', '.join(remote)}"
