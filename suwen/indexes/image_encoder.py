"""BiomedCLIP (or any open_clip model) as an image and text encoder.

The configured encoder is a hub id (by default BiomedCLIP,
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) or a local directory laid
out like a downloaded snapshot: ``open_clip_config.json``, weights
(``open_clip_model.safetensors`` preferred; ``.bin``/``.pth`` are read by open_clip with
``torch.load(weights_only=True)``, never unpickled) and the tokenizer files. A directory's text
tower may name its Hugging Face config by a path relative to the directory (the tiny test model
does); that path is resolved here, and everything else is open_clip's own loading.

Embeddings are L2-normalised float32; calls are serialised by a lock, so one encoder can be
shared between threads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from suwen.errors import ModelError
from suwen.indexes.onnx_encoder import ExportCache, find_or_export
from suwen.privacy import missing_model_message

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from suwen.config import Settings
    from suwen.indexes.onnx_image_encoder import ImageExportRecord
    from suwen.indexes.vectors import FloatArray

HF_HUB = "hf-hub:"
LOCAL_DIR = "local-dir:"


def open_clip_name(encoder: str) -> str:
    """The open_clip model name for a configured encoder: a schema'd name as given, an existing
    directory as ``local-dir:<absolute path>``, an ``org/name`` id as ``hf-hub:org/name``."""
    if encoder.startswith(HF_HUB):
        return encoder
    if encoder.startswith(LOCAL_DIR):
        return LOCAL_DIR + str(Path(encoder[len(LOCAL_DIR) :]).expanduser().resolve())
    path = Path(encoder).expanduser()
    if path.is_dir():
        return LOCAL_DIR + str(path.resolve())
    if "/" in encoder and not encoder.startswith((".", "/", "~")):
        return HF_HUB + encoder
    return encoder


def encoder_id(encoder: str) -> str:
    """How an index records its encoder, stable across spellings of the same model."""
    name = open_clip_name(encoder)
    return name[len(LOCAL_DIR) :] if name.startswith(LOCAL_DIR) else name


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_text_overrides(name: str) -> dict[str, Any]:
    """For a local directory whose text tower names a folder inside it, point open_clip at that
    folder (it would otherwise look relative to the working directory). The full checkpoint
    holds the text weights, so the tower is built from its config alone."""
    if not name.startswith(LOCAL_DIR):
        return {}
    directory = Path(name[len(LOCAL_DIR) :])
    try:
        config = json.loads((directory / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # open_clip reports a missing or broken config itself
    text_cfg = dict(config.get("model_cfg", {}).get("text_cfg", {}))
    hf_name = text_cfg.get("hf_model_name")
    if not isinstance(hf_name, str) or not (directory / hf_name).is_dir():
        return {}
    text_cfg["hf_model_name"] = str((directory / hf_name).resolve())
    text_cfg["hf_model_pretrained"] = False
    return {"text_cfg": text_cfg}


def create_open_clip_model(
    name: str, *, load_weights: bool = True, device: str = "cpu"
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """open_clip's model and eval transform for ``name``; with ``load_weights`` the full
    checkpoint is required (open_clip would otherwise fall back to random weights silently)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        name,
        load_weights=load_weights,
        device=device,
        weights_only=True,
        pretrained_text=False,  # never the text tower's base weights alone
        require_pretrained=load_weights,
        **_local_text_overrides(name),
    )
    model.eval()
    return model, preprocess


@dataclass
class ImageEncoder:
    """An open_clip model with its preprocessing and tokenizer, ready to embed."""

    encoder: str  # as configured
    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: str
    batch_size: int
    dim: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def id(self) -> str:
        return encoder_id(self.encoder)

    def encode_images(
        self,
        images: Sequence[Image.Image],
        progress: Callable[[int], None] | None = None,
    ) -> FloatArray:
        """Normalised embeddings, one row per image; ``progress(n)`` after each batch of n."""
        import torch

        rows = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in batch])
            with self._lock, torch.inference_mode():
                features = self.model.encode_image(pixels.to(self.device), normalize=True)
            rows.append(features.float().cpu().numpy())
            if progress is not None:
                progress(len(batch))
        return _stack(rows, self.dim)

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """Normalised embeddings of texts through the CLIP text tower."""
        import torch

        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            with self._lock, torch.inference_mode():
                tokens = self.tokenizer(batch).to(self.device)
                features = self.model.encode_text(tokens, normalize=True)
            rows.append(features.float().cpu().numpy())
        return _stack(rows, self.dim)


def _stack(rows: list[Any], dim: int) -> FloatArray:
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


class ImageQueryEncoder(Protocol):
    """What image search needs of an encoder: the eager :class:`ImageEncoder`, or its vision
    tower's ONNX Runtime export (``suwen.indexes.onnx_image_encoder``)."""

    encoder: str
    dim: int
    device: str

    @property
    def id(self) -> str: ...

    def encode_images(
        self, images: Sequence[Image.Image], progress: Callable[[int], None] | None = None
    ) -> FloatArray: ...

    def encode_texts(self, texts: Sequence[str]) -> FloatArray: ...


_CACHE: dict[tuple[str, str, int], ImageEncoder] = {}
_CACHE_LOCK = threading.Lock()
_ONNX_CACHE: ExportCache[ImageQueryEncoder] = ExportCache()


def query_image_encoder(settings: Settings) -> ImageQueryEncoder:
    """The encoder image search embeds question images with: the vision tower's ONNX Runtime
    export when ``query_runtime`` allows it and one matches the model, else the eager model."""
    if settings.query_runtime == "auto" and settings.device != "cuda":
        fast = _onnx_image_encoder(settings)
        if fast is not None:
            return fast
    return load_image_encoder(settings)


def _onnx_image_encoder(settings: Settings) -> ImageQueryEncoder | None:
    """The export, made now if it does not exist yet (this loads the model with PyTorch once);
    None when the runtime is missing, the model is not on this machine, it runs on a GPU, or
    its export was rejected."""
    from suwen.indexes import onnx_image_encoder

    def opened(directory: Path, record: ImageExportRecord, threads: int) -> ImageQueryEncoder:
        return onnx_image_encoder.OnnxImageEncoder(
            directory, record, settings.image_encoder, lambda: load_image_encoder(settings), threads
        )

    return find_or_export(
        _ONNX_CACHE,
        settings.encoders_dir,
        settings.query_threads,
        fingerprint=lambda: onnx_image_encoder.image_fingerprint(settings.image_encoder),
        load_eager=lambda: load_image_encoder(settings),
        read=onnx_image_encoder.read_image_record,
        export=onnx_image_encoder.export_image_tower,
        open_encoder=opened,
    )


def load_image_encoder(settings: Settings) -> ImageEncoder:
    """The configured image encoder, loaded once per process (model, device, batch size)."""
    device = resolve_device(settings.device)
    key = (open_clip_name(settings.image_encoder), device, settings.encode_batch_size)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(settings.image_encoder, device, settings.encode_batch_size)
        return _CACHE[key]


def _load(encoder: str, device: str, batch_size: int) -> ImageEncoder:
    import open_clip

    name = open_clip_name(encoder)
    missing = missing_model_message("image encoder", encoder, "image_encoder")
    if missing:  # hub access is off: say how to get it, not what the hub client says
        raise ModelError(missing)
    try:
        model, preprocess = create_open_clip_model(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip, hub and transformers errors all mean "cannot load"
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        raise ModelError(
            f"image encoder {encoder!r}: cannot load ({type(exc).__name__}: {reason}); "
            "set SUWEN_IMAGE_ENCODER to a downloaded open_clip model directory"
        ) from exc
    dim = _embedding_dim(model, preprocess, device)
    return ImageEncoder(encoder, model, preprocess, tokenizer, device, batch_size, dim)


def _embedding_dim(
    model: Any, preprocess: Callable[[Image.Image], torch.Tensor], device: str
) -> int:
    """The embedding width, measured (open_clip models name it differently per tower kind)."""
    import torch
    from PIL import Image

    blank = preprocess(Image.new("RGB", (8, 8))).unsqueeze(0).to(device)
    with torch.inference_mode():
        return int(model.encode_image(blank).shape[-1])
