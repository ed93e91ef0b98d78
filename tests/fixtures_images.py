"""Session fixtures for the images layer: the tiny open_clip model (built once, offline) and a
small image index of real VQA-RAD train images captioned with their train questions/answers.

Images that also appear in VQA-RAD's test split are kept out of the index, as a benchmark
must keep them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from suwen.config import Settings

INDEXED_CASES = 32  # enough to make search meaningful, few enough to embed in seconds
INDEX_NAME = "vqa-train"


@dataclass(frozen=True)
class ImageCorpus:
    folder: Path  # copies of the images, plus the manifest
    manifest: Path
    case_ids: list[str]
    captions: dict[str, str]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from suwen.devtools.tiny_clip import write_tiny_clip

    directory = tmp_path_factory.mktemp("models") / "tiny-clip"
    write_tiny_clip(directory)
    return directory


def vqa_rad_train_cases(shared_data: Path) -> dict[str, dict[str, str]]:
    """image name -> {caption, body_part} for train images never used by the test split."""
    root = shared_data / "vqa_rad"
    train = json.loads((root / "trainset.json").read_text(encoding="utf-8"))
    test = json.loads((root / "testset.json").read_text(encoding="utf-8"))
    test_images = {qa["image_name"] for qa in test}
    cases: dict[str, dict[str, str]] = {}
    for qa in train:
        name = qa["image_name"]
        if name in test_images:
            continue
        case = cases.setdefault(name, {"caption": "", "body_part": qa["image_organ"]})
        case["caption"] = f"{case['caption']} {qa['question']} {qa['answer']}.".strip()
    return cases


@pytest.fixture(scope="session")
def image_corpus(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageCorpus:
    cases = vqa_rad_train_cases(shared_data)
    names = sorted(cases)[:INDEXED_CASES]
    folder = tmp_path_factory.mktemp("vqa-rad-train")
    lines = []
    for name in names:
        shutil.copy(shared_data / "vqa_rad" / "images" / name, folder / name)
        case = cases[name]
        row = {"path": name, "id": Path(name).stem, "caption": case["caption"]}
        lines.append(json.dumps(row | {"body_part": case["body_part"], "source": "VQA-RAD"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = [Path(name).stem for name in names]
    return ImageCorpus(folder, manifest, ids, {Path(n).stem: cases[n]["caption"] for n in names})


def image_settings_for(home: Path, tiny_clip_dir: Path) -> Settings:
    return Settings(home=home, image_encoder=str(tiny_clip_dir), device="cpu", encode_batch_size=16)


@pytest.fixture(scope="session")
def image_settings(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Settings:
    """Settings with their own data home holding the session's image index."""
    return image_settings_for(tmp_path_factory.mktemp("image-home"), tiny_clip_dir)


@pytest.fixture(scope="session")
def image_index(image_settings: Settings, image_corpus: ImageCorpus) -> str:
    """Name of the session's image index, built once from ``image_corpus``."""
    from suwen.indexes.image_index import build_image_index

    summary = build_image_index(image_settings, INDEX_NAME, image_corpus.manifest)
    assert summary.added == len(image_corpus.case_ids), summary.skipped
    return INDEX_NAME
