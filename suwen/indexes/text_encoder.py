"""Text encoders: a sentence-transformers model from a hub id or a local directory.

A model that ships a sentence-transformers configuration (``modules.json``) is loaded exactly as
its authors set it up (e.g. all-MiniLM-L6-v2: mean pooling, normalised). A plain Hugging Face
encoder without one -- MedCPT's article and query encoders are published that way, and were
trained to use the [CLS] vector -- gets a Transformer + Pooling stack built here with the pooling
``text_pooling`` names ("auto" = CLS). Asymmetric models (MedCPT) load two encoders, one for
articles and one for queries; a symmetric model is loaded once and used for both.

Encoders are cached per process (loading takes seconds) and guard their model with a lock: Hugging
Face fast tokenizers raise "Already borrowed" when two threads use one at the same time.

Queries go through the encoder's ONNX Runtime export when there is one that matches the model
(``suwen.indexes.onnx_encoder``): a search process then never imports PyTorch. The first process
that needs the query encoder makes the export (index builds do, so searches find it ready); when
it cannot be made, queries use PyTorch with the frozen trace below.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from suwen.config import Settings
from suwen.errors import ModelError
from suwen.indexes import onnx_encoder
from suwen.indexes.onnx_encoder import (
    ExportCache,
    ExportRecord,
    OnnxQueryEncoder,
    find_or_export,
    quiet_tracing,
)
from suwen.indexes.vectors import FloatArray, normalise
from suwen.privacy import missing_model_message
from suwen.types import TextPooling

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

EncodeProgress = Callable[[int, int], None]  # (texts done, texts total)

# Tokenizers report a huge sentinel when a model sets no limit; BERT-style encoders take 512.
_FALLBACK_MAX_TOKENS = 512

_cache: dict[tuple[str, str, str], TextEncoder] = {}
_cache_lock = threading.Lock()
_onnx_cache: ExportCache[OnnxQueryEncoder] = ExportCache()


class TextEncoder:
    """One loaded encoder: text in, L2-normalised float32 vectors out."""

    def __init__(self, model: SentenceTransformer, name: str, pooling: str) -> None:
        self._model = model
        self._lock = threading.Lock()
        self.name = name
        self.pooling = pooling
        # Renamed get_embedding_dimension in sentence-transformers 6; older releases lack it.
        get_dim = getattr(model, "get_embedding_dimension", None)
        dim = get_dim() if get_dim else model.get_sentence_embedding_dimension()
        if not dim:
            raise ModelError(f"text encoder {name!r}: cannot tell its embedding dimension")
        self.dim: int = int(dim)
        self.max_tokens: int = _max_tokens(model)
        model.max_seq_length = self.max_tokens
        self._fast_query: _FrozenQueryPath | Literal[False] | None = None  # built on first use
        self.device: str = model.device.type

    def count_tokens(self, text: str) -> int:
        """Tokens the encoder would see for ``text``, special tokens included."""
        with self._lock:
            ids = self._model.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        return len(ids)

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        progress: EncodeProgress | None = None,
    ) -> FloatArray:
        """Vectors for ``texts`` (one row each, in order), reporting progress per batch."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # Similar lengths in a batch waste less time on padding; results go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out[batch] = self._encode_batch([texts[i] for i in batch], batch_size)
            if progress is not None:
                progress(min(start + batch_size, len(texts)), len(texts))
        return normalise(out)

    def encode_query(self, text: str) -> FloatArray:
        """One text's vector, shape ``(1, dim)``: what every search does once per query.

        On the CPU the transformer runs as a frozen TorchScript trace when that gives the same
        vector (checked once against the eager model): a short query is many small matrix
        products whose per-call overhead dominates, and freezing removes part of that overhead
        (``benchmarks/query_encoder.py`` measures it; the README has the numbers)."""
        with self._lock:
            if self._fast_query is None:

                def eager(probe: str) -> FloatArray:  # the lock is held: not _encode_batch
                    return self._model_vectors([probe], 1)

                self._fast_query = _FrozenQueryPath.build(self._model, eager) or False
            if self._fast_query:
                return normalise(self._fast_query(text))
        return self.encode([text])

    def export_onnx(self, key: str, encoders_dir: Path) -> ExportRecord | None:
        """Export this encoder for ONNX Runtime into ``encoders_dir`` (checked against this
        model on probe texts); None when it cannot be exported or does not match."""
        with self._lock:
            return onnx_encoder.export(
                self._model,
                self.name,
                key,
                encoders_dir,
                lambda probe: self._model_vectors([probe], 1),
            )

    def _encode_batch(self, texts: list[str], batch_size: int) -> FloatArray:
        with self._lock:
            return self._model_vectors(texts, batch_size)

    def _model_vectors(self, texts: list[str], batch_size: int) -> FloatArray:
        """The model's normalised vectors; the caller holds ``_lock``."""
        vectors = self._model.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )
        return np.asarray(vectors, dtype=np.float32)


class _FrozenQueryPath:
    """The sentence-transformers pipeline for one text, with its transformer module replaced by
    a frozen TorchScript trace. Batch size 1 only: one text has no padding, so nothing the
    trace baked in about the attention mask can differ between queries."""

    PROBES = ("What is the first-line treatment of mild asthma?", "BRCA1", "x " * 60)

    def __init__(self, model: SentenceTransformer, traced: Any) -> None:
        self._model = model
        self._traced = traced

    @classmethod
    def build(
        cls, model: SentenceTransformer, eager: Callable[[str], FloatArray]
    ) -> _FrozenQueryPath | None:
        """The frozen path, or None when tracing fails, the model is not on the CPU, or any
        probe's vector differs from the eager model's (then queries stay eager)."""
        import torch

        if model.device.type != "cpu":
            return None
        try:
            example = _tensors(model.preprocess([cls.PROBES[0]]))
            transformer: Any = model[0].auto_model
            with torch.inference_mode(False), torch.no_grad(), quiet_tracing():
                traced: Any = torch.jit.trace(  # type: ignore[no-untyped-call]
                    transformer.eval(), example_kwarg_inputs=example, strict=False
                )
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            path = cls(model, frozen)
            same = all(np.allclose(normalise(path(p)), eager(p), atol=1e-4) for p in cls.PROBES)
        except Exception:  # any tracing failure means: stay eager
            return None
        return path if same else None

    def __call__(self, text: str) -> FloatArray:
        import torch

        features = self._model.preprocess([text])
        with torch.inference_mode():
            output = self._traced(**_tensors(features))
            hidden = output["last_hidden_state"] if isinstance(output, dict) else output[0]
            features["token_embeddings"] = hidden
            for module in list(self._model)[1:]:  # pooling, normalisation, dense layers
                features = module(features)
            vector = features["sentence_embedding"]
        return np.asarray(vector.float().numpy(), dtype=np.float32).reshape(1, -1)


def _tensors(features: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}


def _max_tokens(model: SentenceTransformer) -> int:
    limit = model.max_seq_length or _FALLBACK_MAX_TOKENS
    config = getattr(model[0], "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limit = min(limit, positions)
    return int(limit) if limit < 100_000 else _FALLBACK_MAX_TOKENS


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _has_sentence_transformers_config(model: str) -> bool:
    if Path(model).expanduser().is_dir():
        return (Path(model).expanduser() / "modules.json").is_file()
    from sentence_transformers.util import is_sentence_transformer_model

    return is_sentence_transformer_model(model)


def _build_model(model: str, pooling: TextPooling, device: str) -> tuple[SentenceTransformer, str]:
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:  # sentence-transformers < 6 keeps them in `models`
        from sentence_transformers import models as modules  # type: ignore[no-redef,attr-defined]

    # Loading reports through our own progress callbacks; transformers' bars would garble them.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else model
    if _has_sentence_transformers_config(source):
        return SentenceTransformer(source, device=device), "model's own"
    mode = "cls" if pooling == "auto" else pooling
    transformer = modules.Transformer(source)
    pool = modules.Pooling(transformer.get_embedding_dimension(), mode)
    return SentenceTransformer(modules=[transformer, pool], device=device), mode


def load_text_encoder(
    model: str, *, pooling: TextPooling = "auto", device: str = "auto"
) -> TextEncoder:
    """The encoder for ``model`` (hub id or local directory), loaded once per process."""
    device = resolve_device(device)
    key = (model, pooling, device)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        missing = missing_model_message("text encoder", model, "text_encoder")
        if missing:  # hub access is off: say how to get it, not what the hub client says
            raise ModelError(missing)
        try:
            st_model, used_pooling = _build_model(model, pooling, device)
        except ModelError:
            raise
        except Exception as exc:  # hub, file and config errors come in many types
            raise ModelError(
                f"text encoder {model!r} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                "set SUWEN_TEXT_ENCODER to a local model directory"
            ) from exc
        encoder = TextEncoder(st_model, model, used_pooling)
        _cache[key] = encoder
        return encoder


def article_encoder(settings: Settings) -> TextEncoder:
    return load_text_encoder(
        settings.text_encoder, pooling=settings.text_pooling, device=settings.device
    )


QueryEncoder = TextEncoder | OnnxQueryEncoder


def query_encoder(settings: Settings) -> QueryEncoder:
    """The query-side encoder (the article encoder itself for symmetric models): its ONNX
    Runtime export when ``query_runtime`` allows it and one matches the model, else PyTorch."""
    if settings.query_runtime == "auto" and settings.device != "cuda":
        fast = onnx_query_encoder(settings)
        if fast is not None:
            return fast
    return load_text_encoder(
        settings.query_encoder, pooling=settings.text_pooling, device=settings.device
    )


def onnx_query_encoder(settings: Settings) -> OnnxQueryEncoder | None:
    """The query encoder's ONNX export, made now if it does not exist yet (this loads the model
    with PyTorch once); None when the runtime is missing, the model is not on this machine, it
    runs on a GPU, or its export was rejected."""
    name, pooling = settings.query_encoder, settings.text_pooling
    return find_or_export(
        _onnx_cache,
        settings.encoders_dir,
        settings.query_threads,
        fingerprint=lambda: onnx_encoder.fingerprint(name, pooling),
        load_eager=lambda: load_text_encoder(name, pooling=pooling, device=settings.device),
        read=onnx_encoder.read_record,
        export=TextEncoder.export_onnx,
        open_encoder=OnnxQueryEncoder,
    )
