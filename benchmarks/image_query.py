"""Image search as users meet it: a BiomedCLIP-shaped query image, ONNX Runtime against PyTorch.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is Suwen's default image
encoder: a timm ViT-B/16 at 224 px and a BERT-base text tower. Its weights cannot be downloaded
here, so this builds the same architecture from BiomedCLIP's published open_clip config
(``shared/data/configs``) with random, seeded weights (the text tower's tokenizer is BERT's
uncased WordPiece vocabulary from the all-MiniLM-L6-v2 package), indexes VQA-RAD training images
with it, and measures the vision tower's ONNX Runtime export and PyTorch side by side:

- one question image's embedding (decoded image in, vector out: preprocessing included), p50 and
  p95 over VQA-RAD test images, on 1 and 2 threads, and the cosine between the two;
- a fresh ``suwen search image`` process: wall time from start to exit, peak resident memory,
  and whether it imported torch;
- the export itself, made once at first use.

    .venv/bin/python -m benchmarks.image_query [--images 100] [--queries 30] [--work DIR]

Prints a table and writes benchmarks/results/image_query.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common import (
    fresh_cli_process,
    minilm_or_exit,
    shared_data_default,
    without_machine_paths,
    write_json,
)
from suwen.config import Settings
from suwen.files import atomic_write_bytes, atomic_write_text
from suwen.privacy import private_dir

RESULT = Path(__file__).resolve().parent / "results" / "image_query.json"
CONFIG = "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.open_clip_config.json"
TEXT_TOWER = "text_tower"
# BiomedBERT-base (BiomedCLIP's text tower): BERT-base sizes with a 30,522-token vocabulary.
TEXT_TOWER_CONFIG: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
INDEX = "images"


def build_model(folder: Path, data: Path, tokenizer_source: Path) -> Path:
    """The BiomedCLIP-shaped open_clip folder (built once; an existing one is reused)."""
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    from transformers import BertConfig

    from suwen.devtools.tiny_clip import write_weights

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / TEXT_TOWER).mkdir(parents=True)
    config = json.loads((data / "configs" / CONFIG).read_text(encoding="utf-8"))
    config["model_cfg"]["text_cfg"].update(hf_model_name=TEXT_TOWER, hf_tokenizer_name=TEXT_TOWER)
    (staging / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    BertConfig(**TEXT_TOWER_CONFIG).save_pretrained(str(staging / TEXT_TOWER))
    for name in TOKENIZER_FILES:  # open_clip reads a local model's tokenizer from its folder
        shutil.copy(tokenizer_source / name, staging / name)
    write_weights(staging)
    staging.rename(folder)
    return folder


def build_index(settings: Settings, data: Path, count: int, work: Path) -> None:
    """``count`` VQA-RAD training images (none of the test split's) in image index INDEX."""
    from suwen.indexes.image_index import build_image_index

    root = data / "vqa_rad"
    test = {qa["image_name"] for qa in json.loads((root / "testset.json").read_text("utf-8"))}
    train = json.loads((root / "trainset.json").read_text(encoding="utf-8"))
    names = sorted({qa["image_name"] for qa in train} - test)[:count]
    folder = private_dir(work / "cases")
    lines = []
    for name in names:
        atomic_write_bytes(folder / name, (root / "images" / name).read_bytes())
        lines.append(json.dumps({"path": name, "id": Path(name).stem, "source": "VQA-RAD"}))
    atomic_write_text(folder / "manifest.jsonl", "\n".join(lines) + "\n")
    print(f"indexing {len(names)} VQA-RAD training images with the BiomedCLIP shape", flush=True)
    build_image_index(settings, INDEX, folder / "manifest.jsonl")


def query_images(data: Path, count: int) -> list[Path]:
    """Distinct VQA-RAD test images, the kind of image a question comes with."""
    root = data / "vqa_rad"
    test = json.loads((root / "testset.json").read_text(encoding="utf-8"))
    names = list(dict.fromkeys(qa["image_name"] for qa in test))[:count]
    return [root / "images" / name for name in names]


def timed(encode: Any, images: list[Any]) -> dict[str, float]:
    encode(images[:1])  # warm: first-call allocations
    times = []
    for image in images:
        began = time.perf_counter()
        encode([image])
        times.append((time.perf_counter() - began) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
    }


def encode_times(settings: Settings, paths: list[Path]) -> dict[str, Any]:
    """Per-image embedding time of each runtime on 1 and 2 threads, and their agreement."""
    import torch

    from suwen.indexes.image_encoder import load_image_encoder, query_image_encoder
    from suwen.indexes.onnx_image_encoder import OnnxImageEncoder
    from suwen.medimage import load_image

    images = [load_image(path) for path in paths]
    eager = load_image_encoder(settings)
    fast = query_image_encoder(settings)
    assert isinstance(fast, OnnxImageEncoder), "no ONNX export was made"
    result: dict[str, Any] = {"onnxruntime": {}, "torch": {}}
    before = torch.get_num_threads()
    for threads in (1, 2):
        onnx = OnnxImageEncoder(fast.directory, fast.record, fast.encoder, lambda: eager, threads)
        result["onnxruntime"][str(threads)] = timed(onnx.encode_images, images)
        torch.set_num_threads(threads)
        result["torch"][str(threads)] = timed(eager.encode_images, images)
    torch.set_num_threads(before)
    cosines = np.sum(fast.encode_images(images) * eager.encode_images(images), axis=1)
    result["min_cosine_onnx_to_torch"] = round(float(cosines.min()), 7)
    result["export_min_cosine_on_probes"] = fast.record.min_cosine
    return result


def export_seconds(settings: Settings) -> float:
    """The one-off export and check (the eager model already loaded)."""
    from suwen.indexes.image_encoder import load_image_encoder
    from suwen.indexes.onnx_image_encoder import export_image_tower, image_fingerprint

    eager = load_image_encoder(settings)
    key = image_fingerprint(settings.image_encoder)
    assert key is not None
    scratch = Path(tempfile.mkdtemp(prefix="export-", dir=settings.home))
    began = time.perf_counter()
    record = export_image_tower(eager, key, scratch)
    seconds = time.perf_counter() - began
    shutil.rmtree(scratch)
    assert record is not None, "the export did not match the eager model"
    return round(seconds, 1)


def fresh_search(settings: Settings, runtime: str, query: Path) -> dict[str, Any]:
    """A fresh ``suwen search image`` process with ``runtime`` (the export already made)."""
    args = ["search", "image", str(query), "--index", INDEX, "-k", "5", "--json"]
    env = {"SUWEN_IMAGE_ENCODER": settings.image_encoder, "SUWEN_QUERY_RUNTIME": runtime}
    measured = fresh_cli_process(settings, args, env)
    hits = [hit["id"] for hit in json.loads(measured.pop("stdout"))]
    return {**measured, "hits": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--images", type=int, default=100, help="images in the index")
    parser.add_argument("--queries", type=int, default=30, help="question images timed")
    parser.add_argument("--work", type=Path, default=None, help="keep the model and index here")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="suwen-image-query-") as tmp:
        work = private_dir(args.work or Path(tmp))
        model = build_model(work / "biomedclip-shape", args.data, Path(minilm_or_exit()))
        settings = Settings(
            home=work / "home", image_encoder=str(model), device="cpu", query_runtime="auto"
        )
        if not (settings.indexes_dir / INDEX).exists():
            build_index(settings, args.data, args.images, work)
        paths = query_images(args.data, args.queries)
        result: dict[str, Any] = {
            "model": "BiomedCLIP shape (ViT-B/16 224 px + BERT-base text tower), random weights",
            "index_images": args.images,
            "query_images": len(paths),
            "encode": encode_times(settings, paths),
            "export_s": export_seconds(settings),
            "fresh_search_process": {
                runtime: fresh_search(settings, runtime, paths[0]) for runtime in ("auto", "torch")
            },
            "load": [round(x, 2) for x in os.getloadavg()],
            "command": f"python -m benchmarks.image_query --images {args.images} "
            f"--queries {args.queries}",
        }
    write_json(args.out, json.loads(without_machine_paths(json.dumps(result))))
    print_table(result)
    print(f"wrote {args.out}")


def print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"one question image, {result['model']}")
    for column in ("runtime", "1 thread p50/p95 ms", "2 threads p50/p95 ms", "fresh search"):
        table.add_column(column)
    for runtime, process in (("onnxruntime", "auto"), ("torch", "torch")):
        times = result["encode"][runtime]
        fresh = result["fresh_search_process"][process]
        table.add_row(
            runtime,
            *(f"{times[t]['p50_ms']} / {times[t]['p95_ms']}" for t in ("1", "2")),
            f"{fresh['wall_s']} s, {fresh['peak_rss_mb']} MB, torch: {fresh['torch_imported']}",
        )
    Console().print(table)
    fresh = result["fresh_search_process"]
    print(
        f"cosine ONNX to PyTorch >= {result['encode']['min_cosine_onnx_to_torch']} on the "
        f"question images; export (once, model loaded) {result['export_s']} s; same top 5 "
        f"hits: {fresh['auto']['hits'] == fresh['torch']['hits']}"
    )


if __name__ == "__main__":
    main()
