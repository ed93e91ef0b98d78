"""Settings: the one place a default lives.

Precedence, lowest to highest: defaults < TOML file (``suwen.toml`` in the data home, or
``--config``) < ``SUWEN_*`` environment < CLI flags. ``load_settings`` records where every value
came from so ``suwen config show`` can say it.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from platformdirs import user_data_dir
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, SettingsConfigDict

from suwen.types import TextMethod, TextPooling

LINGSHU_7B = "lingshu-medical-mllm/Lingshu-7B"
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
MEDCPT_ARTICLE = "ncbi/MedCPT-Article-Encoder"
MEDCPT_QUERY = "ncbi/MedCPT-Query-Encoder"
MEDCPT_CROSS = "ncbi/MedCPT-Cross-Encoder"

# Asymmetric encoders publish their article and query halves as two models; any other text
# encoder is used for both sides unless `text_query_encoder` says otherwise.
QUERY_ENCODER_OF = {MEDCPT_ARTICLE: MEDCPT_QUERY}

CONFIG_FILE_NAME = "suwen.toml"

# vLLM flags that would change where the managed server listens, who may call it, or what it
# trusts (remote code, local files, media from the web, trace exporters, request logging).
REFUSED_VLLM_FLAGS = frozenset(
    {
        "--host",
        "--port",
        "--uds",
        "--grpc-port",
        "--api-key",
        "--allow-credentials",
        "--allowed-origins",
        "--allowed-methods",
        "--allowed-headers",
        "--ssl-keyfile",
        "--ssl-certfile",
        "--ssl-ca-certs",
        "--ssl-cert-reqs",
        "--ssl-ciphers",
        "--enable-ssl-refresh",
        "--root-path",
        "--middleware",
        "--trust-remote-code",
        "--allowed-local-media-path",
        "--allowed-media-domains",
        "--trust-request-chat-template",
        "--trust-request-mm-kwargs",
        "--tool-server",
        "--hf-token",
        "--otlp-traces-endpoint",
        "--collect-detailed-traces",
        "--kv-transfer-config",
        "--kv-events-config",
        "--data-parallel-address",
        "--data-parallel-rpc-port",
        "--headless",
        "--enable-log-requests",
        "--enable-log-outputs",
        # A YAML file of further flags, which could set any of the above.
        "--config",
    }
)


# vLLM's short forms of --data-parallel-address and --data-parallel-rpc-port.
REFUSED_SHORT_FLAGS = ("-dpa", "-dpp")
# argparse accepts any unambiguous prefix of a long flag ("--ho" for "--host"), and vLLM's
# JSON flags take dotted keys ("--kv-transfer-config.kv_ip").
MIN_ABBREVIATION = len("--h")


def refused_vllm_flag(arg: str) -> str | None:
    """The refused flag ``arg`` would set (exact, abbreviated, ``=value``, dotted key,
    underscore spelling or ``--no-`` form), else None."""
    if arg.startswith(REFUSED_SHORT_FLAGS):
        return arg[: len(REFUSED_SHORT_FLAGS[0])]
    if not arg.startswith("--"):
        return None
    flag = arg.split("=", 1)[0].split(".", 1)[0].replace("_", "-").lower()
    if flag.startswith("--no-"):
        flag = "--" + flag[len("--no-") :]
    if flag in REFUSED_VLLM_FLAGS:
        return flag
    if len(flag) >= MIN_ABBREVIATION:
        for refused in sorted(REFUSED_VLLM_FLAGS):
            if refused.startswith(flag):
                return refused
    return None


Source = Literal["default", "file", "env", "cli"]


def default_home() -> Path:
    return Path(user_data_dir("suwen", appauthor=False))


# The most agent processes one `suwen batch` starts (setting `processes`, --processes).
MAX_PROCESSES = 64


class Settings(BaseSettings):
    """Every knob of Suwen. Each field is settable as ``SUWEN_<NAME>``, in suwen.toml, or by
    ``--set name=value`` on the command line."""

    model_config = SettingsConfigDict(env_prefix="SUWEN_", extra="forbid", validate_assignment=True)

    # Where indexes, logs, sessions and evaluation runs live.
    home: Path = Field(default_factory=default_home, description="Data home")

    # Models: hub ids by default; a local directory works wherever an id does.
    vlm: str = Field(LINGSHU_7B, description="Vision-language model served by vLLM")
    text_encoder: str = Field(MEDCPT_ARTICLE, description="Text encoder for indexed articles")
    text_query_encoder: str | None = Field(
        None, description="Text encoder for queries (default: the article encoder's pair)"
    )
    text_pooling: TextPooling = Field(
        "auto", description="Pooling for encoders without a sentence-transformers config"
    )
    image_encoder: str = Field(BIOMEDCLIP, description="open_clip image/text encoder")
    cross_encoder: str = Field(MEDCPT_CROSS, description="Cross-encoder for optional reranking")
    rerank: bool = Field(False, description="Rerank hybrid hits with the cross-encoder")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device for encoders")
    encode_batch_size: int = Field(32, ge=1, description="Batch size when encoding")
    query_runtime: Literal["auto", "torch"] = Field(
        "auto",
        description="How one query is encoded on the CPU: auto = the encoder's ONNX Runtime "
        "export (made once, checked against the model), torch = PyTorch always",
    )
    query_threads: int = Field(
        0, ge=0, description="Threads ONNX Runtime uses per query (0: one per core)"
    )

    # Indexes.
    text_index: str = Field("pubmed", description="Default text index name")
    image_index: str = Field("images", description="Default image index name")
    index_type: Literal["auto", "exact", "compressed"] = Field(
        "auto", description="FAISS index type; auto picks by corpus size"
    )
    text_method: TextMethod = Field(
        "hybrid",
        description="How the agent and `search text` search PubMed: dense + BM25 fused, "
        "or one of them alone",
    )
    compressed_threshold: int = Field(
        200_000, ge=1, description="Vector count above which 'auto' builds a compressed index"
    )
    compressed_code_bytes: int = Field(
        64,
        ge=8,
        le=512,
        description="RAM per vector of a new compressed index's codes, in bytes (plus 8 for "
        "its id): fewer bytes hold more vectors, each search re-scoring a longer shortlist",
    )

    # vLLM server and client.
    vllm_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Running vLLM servers to use (none: start one)"
    )
    vllm_port: int = Field(8000, ge=1, le=65535, description="Port for a managed vLLM server")
    vllm_max_model_len: int = Field(8192, ge=256, description="vLLM max model length")
    vllm_dtype: str = Field("auto", description="vLLM dtype")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    vllm_data_parallel_size: int = Field(
        1, ge=1, description="Engine replicas of a managed vLLM server (--data-parallel-size)"
    )
    # 8: a volume's default views (6 slices and 2 reformats) in one prompt.
    vllm_max_images: int = Field(8, ge=1, description="Images allowed per prompt")
    # Qwen2.5-VL's processor admits 3136..12845056 pixels; 1280 visual tokens (28*28*1280) is
    # the budget Qwen recommends for serving and keeps 4 images inside the default context.
    vllm_image_min_pixels: int = Field(3136, ge=784, description="Smallest image area sent")
    vllm_image_max_pixels: int = Field(
        1_003_520, ge=3136, le=12_845_056, description="Largest image area sent (resized to fit)"
    )
    vllm_image_ids: bool = Field(
        True,
        description=(
            "Send each image to a server once, then name it by its content hash (vLLM's "
            "multimodal cache); false sends every image in full with every request"
        ),
    )
    vllm_cpu_kvcache_gib: int = Field(4, ge=1, description="KV cache on CPU-only vLLM (GiB)")
    vllm_startup_timeout: float = Field(900.0, gt=0, description="Seconds to wait for /health")
    vllm_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra vLLM flags (not ones that change where the server listens or "
        "what it trusts)",
    )
    allow_remote_vllm: bool = Field(
        False,
        description="Allow vllm_url / --vllm-url outside this machine (questions and images "
        "then leave it)",
    )
    request_timeout: float = Field(300.0, gt=0, description="Seconds per model request")
    max_retries: int = Field(3, ge=0, description="Retries on connection errors and 5xx")
    concurrency: int = Field(8, ge=1, description="Concurrent model requests")
    processes: int = Field(
        1,
        ge=1,
        le=MAX_PROCESSES,
        description="Agent processes suwen batch answers with (each its own core)",
    )
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=1, description="Completion tokens per answer")
    # Sent with every request when set; unset, the server's defaults apply (`suwen eval` sets
    # all three to MedEvalKit's values for its run).
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (unset: server's)")
    top_k: int | None = Field(None, ge=-1, description="Top-k sampling, -1 off (unset: server's)")
    repetition_penalty: float | None = Field(
        None, gt=0, description="Repetition penalty, 1 off (unset: server's)"
    )

    # Evaluation (`suwen eval`): images as MedEvalKit sends them by default, i.e. as
    # qwen_vl_utils' process_vision_info resizes them (4..16384 visual tokens of 28x28 pixels),
    # and up to 6 images per question (its MAX_IMAGE_NUM). The eval run raises the managed
    # server's image limit to this for its own server.
    eval_image_min_pixels: int = Field(3136, ge=784, description="Smallest image area (eval)")
    eval_image_max_pixels: int = Field(
        12_845_056, ge=3136, le=12_845_056, description="Largest image area sent (eval)"
    )
    eval_max_images: int = Field(6, ge=1, description="Images allowed per question (eval)")

    # Agent.
    rounds: int = Field(2, ge=1, description="Retrieval rounds the agent may take")
    max_queries: int = Field(3, ge=1, description="PubMed queries planned per round")
    text_k: int = Field(5, ge=1, description="Text hits per query")
    image_k: int = Field(4, ge=0, description="Similar cases per image")
    case_examples: int = Field(
        2,
        ge=0,
        description="Kept similar cases shown as worked examples in the answer (0: off; left "
        "out, least relevant first, when the prompt would not fit the model length)",
    )
    volume_slices: int = Field(
        6, ge=1, description="Slices shown of a 3-D volume in its acquisition plane (--slices)"
    )
    relevance_threshold: float = Field(0.5, ge=0, le=1, description="Reread score to keep")
    answer_evidence: int = Field(
        8, ge=1, description="Most relevant evidence items the answer sees"
    )
    history_turns: int = Field(4, ge=0, description="Earlier chat turns the model sees")
    max_question_chars: int = Field(
        20_000, ge=1, description="Longest question accepted (characters), from any input"
    )
    chat_history: bool = Field(
        False, description="Keep the lines typed in `suwen chat` in the data home (owner-only)"
    )

    # Confidence, adaptive retrieval and abstention.
    confidence: bool = Field(
        True, description="Measure each answer's confidence (one extra one-token request)"
    )
    adaptive_threshold: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Adaptive mode answers plainly at or above this confidence (a calibration "
        "file's threshold takes precedence)",
    )
    abstain_below: float | None = Field(
        None, ge=0, le=1, description="Below this confidence Suwen says it is not confident"
    )

    @field_validator("vllm_url", "vllm_extra_args", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        # Environment values arrive as one string; a comma-separated list is the natural form.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("vllm_extra_args")
    @classmethod
    def _no_listening_or_trust_flags(cls, value: list[str]) -> list[str]:
        refused = sorted({flag for arg in value if (flag := refused_vllm_flag(arg))})
        if refused:
            raise ValueError(
                f"{', '.join(refused)} may not be set: Suwen decides where its vLLM server "
                "listens and what it trusts"
            )
        return value

    @property
    def query_encoder(self) -> str:
        """The encoder used for queries: explicit, else the article encoder's known pair."""
        if self.text_query_encoder:
            return self.text_query_encoder
        return QUERY_ENCODER_OF.get(self.text_encoder, self.text_encoder)

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    @property
    def encoders_dir(self) -> Path:
        """The query encoders' ONNX Runtime exports, one folder per model fingerprint."""
        return self.home / "encoders"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def sessions_db(self) -> Path:
        return self.home / "sessions.sqlite"


class SettingsError(ValueError):
    """A settings source could not be read or holds an invalid value."""


class LoadedSettings:
    """Effective settings plus, for every field, the layer its value came from."""

    def __init__(self, settings: Settings, origins: dict[str, Source], config_file: Path | None):
        self.settings = settings
        self.origins = origins
        self.config_file = config_file


def _check_file_is_private(path: Path) -> None:
    """A settings file another user could edit could redirect every question: refuse it."""
    try:
        info = path.stat()
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc}") from exc
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SettingsError(
            f"{path}: settings file is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}); run chmod go-w on it"
        )
    if info.st_uid not in (os.getuid(), 0):
        raise SettingsError(
            f"{path}: settings file belongs to another user (uid {info.st_uid}); "
            "Suwen only reads its own"
        )


def _read_toml(path: Path) -> dict[str, Any]:
    _check_file_is_private(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc}") from exc
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    return data


def _env_values() -> dict[str, Any]:
    source = EnvSettingsSource(Settings, env_prefix="SUWEN_", env_parse_none_str="null")
    try:
        values = source()
    except Exception as exc:  # pydantic-settings raises SettingsError of its own
        raise SettingsError(f"SUWEN_* environment: {exc}") from exc
    return {key: value for key, value in values.items() if key in Settings.model_fields}


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``--set name=value`` pairs to a dict, naming the bad pair when one is malformed."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in Settings.model_fields:
            raise SettingsError(f"--set {pair!r}: expected NAME=VALUE with a known setting name")
        values[name] = value
    return values


def load_settings(
    config_file: Path | None = None, cli_values: dict[str, Any] | None = None
) -> LoadedSettings:
    """Merge defaults < TOML < environment < CLI, remembering each value's origin."""
    env = _env_values()
    cli = {k: v for k, v in (cli_values or {}).items() if v is not None}
    home = Path(cli.get("home") or env.get("home") or default_home()).expanduser()
    if config_file is None and (home / CONFIG_FILE_NAME).is_file():
        config_file = home / CONFIG_FILE_NAME
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"{config_file}: settings file not found")
    file_values = _read_toml(config_file) if config_file else {}

    merged: dict[str, Any] = {}
    origins: dict[str, Source] = {name: "default" for name in Settings.model_fields}
    for origin, layer in (("file", file_values), ("env", env), ("cli", cli)):
        for key, value in layer.items():
            merged[key] = value
            origins[key] = origin  # type: ignore[assignment]
    try:
        # Environment already merged above: stop pydantic-settings reading it a second time.
        settings = Settings.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))} = {err.get('input')!r} "
            f"(from {origins.get(str(err['loc'][0]), 'default')}): {err['msg']}"
            for err in exc.errors()
        )
        raise SettingsError(f"invalid setting: {problems}") from exc
    return LoadedSettings(settings, origins, config_file)


def offline_env() -> dict[str, str]:
    """Environment for child processes: offline, telemetry and tracing off (see privacy)."""
    from suwen.privacy import child_env

    return child_env()
