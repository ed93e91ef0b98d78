"""The image query encoder's ONNX Runtime export: made once, checked against open_clip on probe
images, cached privately in the data home, and used by a search process that never imports
PyTorch (the text tower, for searching images by words, still loads it when asked)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from suwen.config import Settings
from suwen.indexes import image_encoder, onnx_encoder, onnx_image_encoder
from suwen.indexes.image_encoder import ImageEncoder, load_image_encoder, query_image_encoder
from suwen.indexes.onnx_image_encoder import OnnxImageEncoder, read_image_record
from suwen.medimage import load_image
from suwen.retrieval.images import ImageSearcher
from tests.fixtures_images import INDEX_NAME, ImageCorpus


def with_runtime(settings: Settings, home: Path, runtime: str) -> Settings:
    return settings.model_copy(update={"home": home, "query_runtime": runtime})


@pytest.fixture()
def onnx_home(image_settings: Settings, image_index: str, tmp_path: Path) -> Settings:
    """A copy of the session's image home, searched with the ONNX runtime allowed."""
    home = tmp_path / "home"
    shutil.copytree(image_settings.home, home, ignore=shutil.ignore_patterns("encoders"))
    return with_runtime(image_settings, home, "auto")


def export_of(home: Path) -> Path:
    (directory,) = [p for p in (home / "encoders").iterdir() if p.is_dir()]
    return directory


def test_first_search_exports_privately_and_records_its_check(onnx_home: Settings) -> None:
    searcher = ImageSearcher.open(onnx_home, INDEX_NAME)
    try:
        assert isinstance(searcher.encoder, OnnxImageEncoder)
    finally:
        searcher.close()
    directory = export_of(onnx_home.home)
    assert (onnx_home.home / "encoders").stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [
        "export.json",
        "model.data",
        "model.onnx",
    ]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    record = read_image_record(directory)
    assert record is not None and record.min_cosine >= onnx_image_encoder.MIN_COSINE
    assert (record.size, record.resize, record.interpolation) == (160, "shortest", "bicubic")


def test_pixels_and_vectors_match_open_clip_on_real_images(
    onnx_home: Settings, shared_data: Path
) -> None:
    """VQA-RAD radiographs of several sizes, one stretched and one tiny image: open_clip's own
    preprocessing gives the same pixels, the eager model the same vectors."""
    fast = query_image_encoder(onnx_home)
    eager = load_image_encoder(onnx_home)
    assert isinstance(fast, OnnxImageEncoder) and isinstance(eager, ImageEncoder)
    files = sorted((shared_data / "vqa_rad" / "images").iterdir())[:12]
    images = [load_image(file) for file in files]
    images += [images[0].resize((500, 90)), images[1].resize((7, 11)), images[2].convert("L")]
    assert len({image.size for image in images}) > 3
    for image in images:
        theirs = eager.preprocess(image.convert("RGB")).numpy()
        np.testing.assert_allclose(fast.pixels(image), theirs, atol=1e-5)
    cosines = np.sum(fast.encode_images(images) * eager.encode_images(images), axis=1)
    assert cosines.min() >= 0.99999, cosines.min()


def test_a_second_process_searches_without_torch(
    onnx_home: Settings, image_corpus: ImageCorpus
) -> None:
    """`suwen search image` in a fresh process over the real index: the export an earlier
    process made, the same hits as PyTorch, and neither torch nor open_clip imported."""
    query_image_encoder(onnx_home)  # the earlier process's export
    query = image_corpus.folder / f"{image_corpus.case_ids[3]}.jpg"
    script = (
        "import json, sys\n"
        "from suwen.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'open_clip')}))\n"
    )
    env = {
        **os.environ,
        "SUWEN_HOME": str(onnx_home.home),
        "SUWEN_IMAGE_ENCODER": onnx_home.image_encoder,
        "SUWEN_DEVICE": "cpu",
        "SUWEN_QUERY_RUNTIME": "auto",
    }
    args = ["search", "image", str(query), "--index", INDEX_NAME, "-k", "3", "--json"]
    run = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    *answer, modules = run.stdout.strip().splitlines()
    assert json.loads(modules) == {"torch": False, "open_clip": False}
    got = [hit["id"] for hit in json.loads("\n".join(answer))]
    eager = ImageSearcher.open(with_runtime(onnx_home, onnx_home.home, "torch"), INDEX_NAME)
    try:
        assert isinstance(eager.encoder, ImageEncoder)
        expected = [hit.key for hit in eager.search_image(load_image(query), k=3)]
    finally:
        eager.close()
    assert got == expected and got[0] == f"case:{image_corpus.case_ids[3]}"


def test_searching_by_words_still_uses_the_text_tower(onnx_home: Settings) -> None:
    fast = ImageSearcher.open(onnx_home, INDEX_NAME)
    eager = ImageSearcher.open(with_runtime(onnx_home, onnx_home.home, "torch"), INDEX_NAME)
    try:
        assert isinstance(fast.encoder, OnnxImageEncoder)
        assert [h.key for h in fast.search_text("chest x-ray", k=4)] == [
            h.key for h in eager.search_text("chest x-ray", k=4)
        ]
    finally:
        fast.close()
        eager.close()


def test_a_rejected_export_falls_back_to_pytorch_once(
    onnx_home: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No export matches (a threshold above 1): images stay on PyTorch, and later processes do
    not pay for the export again."""
    monkeypatch.setattr(onnx_image_encoder, "MIN_COSINE", 1.1)
    assert isinstance(query_image_encoder(onnx_home), ImageEncoder)
    made = [p.name for p in (onnx_home.home / "encoders").iterdir()]
    markers = [name for name in made if not name.endswith(onnx_encoder.LOCK_SUFFIX)]
    assert len(markers) == 1 and markers[0].endswith(".rejected"), made

    def no_second_try(*_args: object) -> None:
        raise AssertionError("export tried again")

    monkeypatch.setattr(onnx_image_encoder, "export_image_tower", no_second_try)
    image_encoder._ONNX_CACHE.opened.clear()
    assert isinstance(query_image_encoder(onnx_home), ImageEncoder)


def test_query_runtime_torch_never_uses_the_export(onnx_home: Settings) -> None:
    query_image_encoder(onnx_home)
    torch_settings = with_runtime(onnx_home, onnx_home.home, "torch")
    assert isinstance(query_image_encoder(torch_settings), ImageEncoder)


def test_damaged_or_foreign_exports_are_not_used(onnx_home: Settings, tmp_path: Path) -> None:
    query_image_encoder(onnx_home)
    directory = tmp_path / "copy"
    shutil.copytree(export_of(onnx_home.home), directory)
    assert read_image_record(directory) is not None
    manifest = json.loads((directory / "export.json").read_text(encoding="utf-8"))
    for damaged in (
        {**manifest, "model_bytes": 5},
        {**manifest, "format": 99},
        {**manifest, "tower": "text"},
        {**manifest, "std": [0.2, 0.0, 0.3]},
        {**manifest, "size": 10**9},
        {**manifest, "size": "160"},
        {**manifest, "resize": "longest"},
        {"format": 1, "tower": "image"},
    ):
        (directory / "export.json").write_text(json.dumps(damaged), encoding="utf-8")
        assert read_image_record(directory) is None, damaged
    (directory / "export.json").write_text(" " * (onnx_encoder.MANIFEST_MAX_BYTES + 1))
    assert read_image_record(directory) is None


def model_with(**changes: object) -> object:
    config = {
        "size": (224, 224),
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    visual = type("Visual", (), {"preprocess_cfg": {**config, **changes}})()
    return type("Model", (), {"visual": visual})()


def test_transforms_not_redone_here_are_not_exported() -> None:
    """open_clip's 'longest' mode pads to a square, a non-square size crops otherwise: such
    models keep PyTorch rather than risk other pixels."""
    config = onnx_image_encoder._transform_config(model_with())
    assert config is not None and config["size"] == 224
    assert onnx_image_encoder._transform_config(model_with(resize_mode="squash")) is not None
    for change in ({"resize_mode": "longest"}, {"size": (224, 192)}, {"interpolation": "x"}):
        assert onnx_image_encoder._transform_config(model_with(**change)) is None, change


def test_probe_images_are_the_same_every_time() -> None:
    first, second = onnx_image_encoder.probe_images(), onnx_image_encoder.probe_images()
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, second, strict=True)
    )
    assert {image.mode for image in first} == {"RGB", "L"}
    assert isinstance(first[0], Image.Image)


def test_asking_about_an_image_never_imports_torch(
    onnx_home: Settings,
    text_index_home: Path,
    minilm_path: Path,
    image_corpus: ImageCorpus,
) -> None:
    """`suwen ask --image` over a real text index and a real image index, both query encoders
    exported by an earlier process, against a stand-in model server: the agent looks, searches
    both indexes, rereads and answers, and its process never loads PyTorch (about 0.8 GB less
    resident than before)."""
    from benchmarks.coordinator import stand_in
    from suwen.indexes.text_encoder import query_encoder

    shutil.copytree(text_index_home / "indexes", onnx_home.home / "indexes", dirs_exist_ok=True)
    settings = onnx_home.model_copy(update={"text_encoder": str(minilm_path)})
    query_encoder(settings)  # the earlier process's exports
    query_image_encoder(settings)
    query = image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg"
    env = {
        **os.environ,
        "SUWEN_HOME": str(settings.home),
        "SUWEN_TEXT_ENCODER": str(minilm_path),
        "SUWEN_IMAGE_ENCODER": settings.image_encoder,
        "SUWEN_IMAGE_INDEX": INDEX_NAME,
        "SUWEN_DEVICE": "cpu",
        "SUWEN_QUERY_RUNTIME": "auto",
    }
    script = (
        "import sys\n"
        "from suwen.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    with stand_in() as url:
        args = ["ask", "--image", str(query), "Is there a fracture?", "--vllm-url", url, "--json"]
        run = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env
        )
    assert run.returncode == 0, run.stderr
    assert "torch imported: False" in run.stderr
    result = json.loads(run.stdout)
    assert result["mode"] == "agent" and result["answer"]
    searched = {item["hit"]["index"] for item in result["evidence"]}
    assert {INDEX_NAME, "pubmed"} <= searched, searched
