"""The image query encoder as an ONNX Runtime model: similar-case search without PyTorch.

A similar-case search embeds one question image. Through open_clip that means importing
PyTorch, torchvision, timm and transformers (seconds, and most of a gigabyte resident) and
running the vision tower's modules eagerly, whose Python holds the interpreter lock the agent's
event loop needs. So, as for the text query encoder (``suwen.indexes.onnx_encoder``), the first
time an image index is searched the encoder's vision tower is exported once to ONNX, checked
against the eager model on probe images, and cached in the data home
(``encoders/<fingerprint>/``: the graph, its weights and ``export.json``; files 0600, never a
pickle). A later process finds it by the model files' fingerprint and embeds with ONNX Runtime,
PIL and numpy alone.

The preprocessing is open_clip's evaluation transform redone with PIL and numpy (resize with
PIL's own filter, as torchvision does for a PIL image, centre crop, scale to [0, 1],
normalise): an export is kept only when, on every probe image, these pixels equal open_clip's
within float rounding and the embedding's cosine to the eager model's is at least
:data:`MIN_COSINE`; else there is no export and images stay on PyTorch. The text tower (search
by words, ``suwen search image --text``) stays on PyTorch, loaded when first asked for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from suwen.indexes.image_encoder import encoder_id
from suwen.indexes.onnx_encoder import (
    MANIFEST_FILE,
    MODEL_FILE,
    export_bytes,
    fingerprint,
    publish_export,
    quiet_tracing,
    read_manifest,
    runtime_session,
    save_with_external_weights,
)
from suwen.indexes.vectors import FloatArray, normalise

if TYPE_CHECKING:
    from suwen.indexes.image_encoder import ImageEncoder

EXPORT_FORMAT = 1
TOWER = f"open_clip vision tower, export format {EXPORT_FORMAT}"  # part of the fingerprint
MARKER = "open_clip_config.json"  # the file that marks an open_clip snapshot in the hub cache
MIN_COSINE = 0.99999  # float32 graph: it differs from eager PyTorch by rounding alone
PIXEL_TOLERANCE = 1e-5  # the same pixels, up to float rounding
Resize = Literal["shortest", "squash"]
Filter = Literal["bicubic", "bilinear"]
FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class ImageExportRecord:
    """What ``export.json`` says about one vision-tower export."""

    model: str
    fingerprint: str
    dim: int
    size: int  # the square the tower takes, in pixels
    resize: Resize  # shortest side to ``size`` then centre crop, or squashed to the square
    interpolation: Filter
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_cosine: float
    onnxruntime: str
    model_bytes: int

    def as_json(self) -> dict[str, Any]:
        return {
            "format": EXPORT_FORMAT,
            "tower": "image",
            **self.__dict__,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageExportRecord:
        if data.get("format") != EXPORT_FORMAT or data.get("tower") != "image":
            raise ValueError("not an image export of this format")
        fields = {key: data[key] for key in cls.__dataclass_fields__}
        if fields["resize"] not in ("shortest", "squash") or fields["interpolation"] not in FILTERS:
            raise ValueError("unknown resize or interpolation")
        for key in ("mean", "std"):
            values = tuple(float(v) for v in fields[key])
            if len(values) != 3 or (key == "std" and min(values) <= 0):
                raise ValueError(f"bad {key}")
            fields[key] = values
        for key in ("size", "dim", "model_bytes"):
            if not isinstance(fields[key], int) or isinstance(fields[key], bool):
                raise ValueError(f"bad {key}")
        if not 1 <= fields["size"] <= 4096 or fields["dim"] < 1:
            raise ValueError("bad size or dim")
        return cls(**fields)


def image_fingerprint(encoder: str) -> str | None:
    """The export key of an open_clip model on this machine (None when it is not here)."""
    ident = encoder_id(encoder)
    return fingerprint(ident.removeprefix("hf-hub:"), TOWER, MARKER)


def read_image_record(directory: Path) -> ImageExportRecord | None:
    """The image export in ``directory`` when it is complete and readable, else None."""
    return read_manifest(directory, ImageExportRecord.from_json)


class OnnxImageEncoder:
    """Images in, L2-normalised float32 vectors out, through ONNX Runtime; thread-safe. The
    text tower comes from ``text_side`` (the eager encoder, loaded on first use)."""

    device = "cpu"

    def __init__(
        self,
        directory: Path,
        record: ImageExportRecord,
        encoder: str,
        text_side: Callable[[], ImageEncoder],
        threads: int = 0,
    ) -> None:
        self.directory = directory
        self.record = record
        self.encoder = encoder  # as configured
        self.dim = record.dim
        self._text_side = text_side
        self._session = runtime_session(directory / MODEL_FILE, threads)
        self._mean = np.asarray(record.mean, dtype=np.float32)[:, None, None]
        self._std = np.asarray(record.std, dtype=np.float32)[:, None, None]

    @property
    def id(self) -> str:
        return encoder_id(self.encoder)

    def encode_images(
        self, images: Sequence[Image.Image], progress: Callable[[int], None] | None = None
    ) -> FloatArray:
        """Normalised embeddings, one row per image."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        pixels = np.stack([self.pixels(image) for image in images])
        out = self._session.run(None, {"pixels": pixels})[0]
        if progress is not None:
            progress(len(images))
        return normalise(np.asarray(out, dtype=np.float32))

    def encode_texts(self, texts: Sequence[str]) -> FloatArray:
        """Through the CLIP text tower, on PyTorch."""
        return self._text_side().encode_texts(texts)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """open_clip's evaluation transform of ``image``: float32, channels first."""
        return preprocess(image, self.record, self._mean, self._std)


def preprocess(
    image: Image.Image, record: ImageExportRecord, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    size, resample = record.size, FILTERS[record.interpolation]
    image = image.convert("RGB")
    width, height = image.size
    if record.resize == "squash":
        image = image.resize((size, size), resample)
    else:  # torchvision's Resize(int): the short side to size, the long one truncated
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new = (new_short, new_long) if width <= height else (new_long, new_short)
        if new != (width, height):
            image = image.resize(new, resample)
        # torchvision's CenterCrop: offsets rounded half to even, as Python's round does
        left = round((image.width - size) / 2.0)
        top = round((image.height - size) / 2.0)
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return np.ascontiguousarray((array.transpose(2, 0, 1) - mean) / std, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Exporting (needs PyTorch; runs once per model)


def probe_images() -> list[Image.Image]:
    """Images the export is checked on: shapes taller, wider and smaller than the tower's
    square, greyscale and colour, smooth and noisy (seeded: the same every time)."""
    rng = np.random.default_rng(20261202)
    ramp = np.linspace(0, 255, 320, dtype=np.float32)
    smooth = np.stack([np.outer(np.linspace(0, 1, 240), ramp)] * 3, axis=-1).astype(np.uint8)
    return [
        Image.fromarray(smooth),  # wider than tall
        Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),  # taller
        Image.fromarray(rng.integers(0, 256, (97, 131), dtype=np.uint8), mode="L"),  # small
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),  # square
        Image.new("RGB", (64, 48), (200, 40, 90)),
    ]


def export_image_tower(
    eager: ImageEncoder, key: str, encoders_dir: Path
) -> ImageExportRecord | None:
    """Export ``eager``'s vision tower into ``encoders_dir/key`` and return its record, or None
    when it cannot be exported, its preprocessing is not one redone here, or the export does not
    match the eager model on the probe images."""
    if eager.device != "cpu":
        return None
    built = publish_export(encoders_dir, key, lambda staging: _export_into(staging, eager, key))
    return read_image_record(built) if built is not None else None


def _export_into(staging: Path, eager: ImageEncoder, key: str) -> ImageExportRecord | None:
    import onnxruntime

    config = _transform_config(eager.model)
    if config is None:
        return None
    probes = probe_images()
    torch_pixels = [eager.preprocess(image.convert("RGB")).numpy() for image in probes]
    _export_graph(eager.model, torch_pixels[0], staging / "float32.onnx")
    save_with_external_weights(staging / "float32.onnx", staging / MODEL_FILE)
    record = ImageExportRecord(
        model=eager.id,
        fingerprint=key,
        dim=eager.dim,
        min_cosine=0.0,
        onnxruntime=onnxruntime.__version__,
        model_bytes=export_bytes(staging),
        **config,
    )
    onnx = OnnxImageEncoder(staging, record, eager.encoder, lambda: eager, threads=0)
    ours = [onnx.pixels(image) for image in probes]
    if any(
        mine.shape != theirs.shape or float(np.max(np.abs(mine - theirs))) > PIXEL_TOLERANCE
        for mine, theirs in zip(ours, torch_pixels, strict=True)
    ):
        return None
    expected = eager.encode_images(probes)
    cosine = float(np.min(np.sum(onnx.encode_images(probes) * expected, axis=1)))
    if cosine < MIN_COSINE:
        return None
    record = ImageExportRecord(**{**record.__dict__, "min_cosine": round(cosine, 7)})
    (staging / MANIFEST_FILE).write_text(json.dumps(record.as_json(), indent=2), encoding="utf-8")
    return record


def _transform_config(model: Any) -> dict[str, Any] | None:
    """The evaluation transform open_clip built for ``model``, when it is one redone here."""
    config = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if not isinstance(config, dict):
        return None
    size = config.get("size")
    if isinstance(size, int):
        side: int | None = size
    elif isinstance(size, (tuple, list)) and len(set(size)) == 1:
        side = int(size[0])  # a square
    else:
        side = None
    resize, interpolation = config.get("resize_mode", "shortest"), config.get("interpolation")
    if side is None or resize not in ("shortest", "squash") or interpolation not in FILTERS:
        return None
    return {
        "size": int(side),
        "resize": resize,
        "interpolation": interpolation,
        "mean": tuple(float(v) for v in config["mean"]),
        "std": tuple(float(v) for v in config["std"]),
    }


def _export_graph(model: Any, example: np.ndarray, path: Path) -> None:
    """The vision tower, normalised embedding out, batch size dynamic."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(pixels, normalize=True)  # type: ignore[no-any-return]

    with torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            Tower().eval(),
            (torch.from_numpy(example[None]),),
            str(path),
            input_names=["pixels"],
            output_names=["embedding"],
            dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
