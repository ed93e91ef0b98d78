"""Image index and search on real VQA-RAD train images with the tiny offline open_clip model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from suwen.config import BIOMEDCLIP, Settings, load_settings
from suwen.digests import sha256_of
from suwen.errors import IndexMismatchError, InputError, ModelError
from suwen.indexes import store
from suwen.indexes.image_encoder import encoder_id, load_image_encoder
from suwen.indexes.image_index import build_image_index
from suwen.indexes.image_store import IMAGES_DB as DB_FILE
from suwen.medimage import load_image
from suwen.retrieval.images import ImageSearcher
from tests.fixtures_images import ImageCorpus, image_settings_for


@pytest.fixture()
def fresh_settings(tmp_path: Path, tiny_clip_dir: Path) -> Settings:
    """A data home of the test's own, for tests that build or change indexes."""
    return image_settings_for(tmp_path / "home", tiny_clip_dir)


def write_manifest(folder: Path, rows: list[dict[str, str]]) -> Path:
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


def copy_images(corpus: ImageCorpus, folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = corpus.case_ids[:count]
    for case_id in ids:
        shutil.copy(corpus.folder / f"{case_id}.jpg", folder / f"{case_id}.jpg")
    return ids


# --- the tiny model ---------------------------------------------------------------------------


def test_tiny_clip_has_biomedclip_towers_and_no_pickle(tiny_clip_dir: Path, shared_data: Path):
    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    real = json.loads(
        (
            shared_data
            / "configs"
            / "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.open_clip_config.json"
        ).read_text()
    )
    for tower in ("vision_cfg", "text_cfg"):
        assert set(real["model_cfg"][tower]) <= set(config["model_cfg"][tower])
    assert (
        config["model_cfg"]["vision_cfg"]["timm_pool"]
        == real["model_cfg"]["vision_cfg"]["timm_pool"]
    )
    assert config["model_cfg"]["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    files = {p.name for p in tiny_clip_dir.rglob("*") if p.is_file()}
    assert "open_clip_model.safetensors" in files
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}


def test_tiny_clip_loads_from_environment_offline(
    tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SUWEN_IMAGE_ENCODER", str(tiny_clip_dir))
    settings = load_settings().settings
    assert settings.image_encoder == str(tiny_clip_dir)
    encoder = load_image_encoder(settings)
    assert encoder.id == str(tiny_clip_dir.resolve())
    texts = encoder.encode_texts(["chest x-ray with a left pleural effusion", "axial CT head"])
    assert texts.shape == (2, encoder.dim)
    assert np.allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_image_embeddings_are_deterministic_and_batch_independent(
    image_settings: Settings, image_corpus: ImageCorpus
):
    encoder = load_image_encoder(image_settings)
    images = [load_image(image_corpus.folder / f"{i}.jpg") for i in image_corpus.case_ids[:5]]
    batched = encoder.encode_images(images)
    one_by_one = np.concatenate([encoder.encode_images([image]) for image in images])
    assert batched.shape == (5, encoder.dim)
    assert np.allclose(batched, one_by_one, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(batched[0], batched[1]), "different images, different embeddings"


def test_default_hub_encoder_without_network_or_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    settings = Settings(home=tmp_path / "home")
    assert settings.image_encoder == BIOMEDCLIP
    with pytest.raises(ModelError) as excinfo:
        load_image_encoder(settings)
    message = str(excinfo.value)
    assert "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in message
    assert "suwen models fetch biomedclip" in message and "image_encoder" in message
    assert "\n" not in message


def test_encoder_id_is_stable_across_spellings(tiny_clip_dir: Path):
    assert encoder_id(str(tiny_clip_dir) + "/") == encoder_id(f"local-dir:{tiny_clip_dir}")
    assert encoder_id("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224") == (
        "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    )


# --- the session index ------------------------------------------------------------------------


def test_index_stores_cases_with_file_hashes(
    image_settings: Settings, image_index: str, image_corpus: ImageCorpus
):
    version, manifest = store.open_version(image_settings.indexes_dir, image_index)
    assert manifest.kind == "image"
    assert manifest.encoder == encoder_id(image_settings.image_encoder)
    assert manifest.count == len(image_corpus.case_ids)
    with sqlite3.connect(version / DB_FILE) as db:
        rows = db.execute("SELECT case_id, path, caption, body_part, sha256 FROM images").fetchall()
    assert sorted(r[0] for r in rows) == sorted(image_corpus.case_ids)
    for case_id, path, caption, body_part, sha256 in rows:
        assert sha256 == sha256_of(Path(path))
        assert caption == image_corpus.captions[case_id]
        assert body_part in {"HEAD", "CHEST", "ABD"}


def test_image_search_returns_the_indexed_image_itself_first(
    image_settings: Settings, image_index: str, image_corpus: ImageCorpus
):
    searcher = ImageSearcher.open(image_settings, image_index)
    for case_id in image_corpus.case_ids[:8]:
        hits = searcher.search_image(load_image(image_corpus.folder / f"{case_id}.jpg"), k=3)
        assert len(hits) == 3
        assert hits[0].case_id == case_id and hits[0].key == f"case:{case_id}"
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].score >= hits[1].score >= hits[2].score
        assert hits[0].kind == "image" and hits[0].index == image_index
        assert hits[0].caption == image_corpus.captions[case_id] == hits[0].text
        assert len({hit.case_id for hit in hits}) == 3


def test_excluded_hash_leaves_the_query_image_out(
    image_settings: Settings, image_index: str, image_corpus: ImageCorpus
):
    searcher = ImageSearcher.open(image_settings, image_index)
    path = image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg"
    hits = searcher.search_image(load_image(path), k=5, exclude_sha256={sha256_of(path)})
    assert len(hits) == 5
    assert image_corpus.case_ids[0] not in {hit.case_id for hit in hits}


def test_text_search_returns_image_hits(image_settings: Settings, image_index: str):
    searcher = ImageSearcher.open(image_settings, image_index)
    hits = searcher.search_text("axial CT of the brain showing a hemorrhage", k=4)
    assert len(hits) == 4
    assert all(hit.kind == "image" and hit.path and Path(hit.path).is_file() for hit in hits)
    assert all(hit.methods == ["text->image"] for hit in hits)
    with pytest.raises(InputError):
        searcher.search_text("   ")


def test_concurrent_searches_agree_with_sequential_ones(
    image_settings: Settings, image_index: str, image_corpus: ImageCorpus
):
    searcher = ImageSearcher.open(image_settings, image_index)
    images = [load_image(image_corpus.folder / f"{i}.jpg") for i in image_corpus.case_ids[:6]]
    expected = [[h.case_id for h in searcher.search_image(image, k=4)] for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(
            pool.map(lambda im: [h.case_id for h in searcher.search_image(im, k=4)], images * 2)
        )
    assert got == expected * 2


def test_an_image_file_asked_about_again_is_embedded_once_until_it_changes(
    image_settings: Settings,
    image_index: str,
    image_corpus: ImageCorpus,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    import os

    searcher = ImageSearcher.open(image_settings, image_index)
    first, other = image_corpus.case_ids[:2]
    question = tmp_path / "question.jpg"
    shutil.copy(image_corpus.folder / f"{first}.jpg", question)
    encoded: list[int] = []
    real = searcher.encoder.encode_images

    def counting(images, progress=None):  # type: ignore[no-untyped-def]
        encoded.append(len(images))
        return real(images, progress)

    monkeypatch.setattr(searcher.encoder, "encode_images", counting)
    hits = [searcher.search_image(load_image(question), k=3) for _ in range(3)]
    assert len(encoded) == 1  # three questions load the file, one embedding
    assert hits[0] == hits[1] == hits[2] and hits[0][0].case_id == first
    # The file replaced by another case's image: embedded afresh, the other case found.
    stamp = question.stat().st_mtime_ns
    shutil.copy(image_corpus.folder / f"{other}.jpg", question)
    os.utime(question, ns=(stamp + 10**9, stamp + 10**9))
    assert searcher.search_image(load_image(question), k=3)[0].case_id == other
    assert len(encoded) == 2
    # An image made from a loaded one is not the file's image: embedded itself.
    searcher.search_image(load_image(question).rotate(90), k=3)
    assert len(encoded) == 3


def test_questions_asking_about_one_file_at_once_share_its_embedding(
    image_settings: Settings,
    image_index: str,
    image_corpus: ImageCorpus,
    monkeypatch: pytest.MonkeyPatch,
):
    import threading

    searcher = ImageSearcher.open(image_settings, image_index)
    first = image_corpus.case_ids[0]
    encoded: list[int] = []
    started, release = threading.Event(), threading.Event()
    real = searcher.encoder.encode_images

    def slow(images, progress=None):  # type: ignore[no-untyped-def]
        encoded.append(len(images))
        started.set()
        release.wait(10)
        return real(images, progress)

    monkeypatch.setattr(searcher.encoder, "encode_images", slow)
    image = load_image(image_corpus.folder / f"{first}.jpg")
    again = load_image(image_corpus.folder / f"{first}.jpg")  # another question, same file
    with ThreadPoolExecutor(max_workers=4) as pool:
        owner = pool.submit(searcher.search_image, image, 3)
        assert started.wait(10)
        waiters = [pool.submit(searcher.search_image, again, 3) for _ in range(3)]
        release.set()
        hits = [owner.result(10), *(w.result(10) for w in waiters)]
    assert encoded == [1]  # four questions at once, one embedding
    assert all(h == hits[0] for h in hits) and hits[0][0].case_id == first

    # A failed embedding is every waiter's error, and the next question tries afresh.
    started.clear()
    release.clear()
    monkeypatch.setattr(searcher, "_queries", type(searcher._queries)())

    def failing(images, progress=None):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(10)
        raise RuntimeError("encoder broke")

    monkeypatch.setattr(searcher.encoder, "encode_images", failing)
    with ThreadPoolExecutor(max_workers=2) as pool:
        owner = pool.submit(searcher.search_image, image, 3)
        assert started.wait(10)
        waiter = pool.submit(searcher.search_image, again, 3)
        release.set()
        for future in (owner, waiter):
            with pytest.raises(RuntimeError, match="encoder broke"):
                future.result(10)
    monkeypatch.setattr(searcher.encoder, "encode_images", real)
    assert searcher.search_image(again, k=3)[0].case_id == first


def test_searcher_uses_the_encoder_the_index_was_built_with(
    image_settings: Settings, image_index: str, tmp_path: Path, tiny_clip_dir: Path
):
    other = tmp_path / "other-clip"
    shutil.copytree(tiny_clip_dir, other)
    mismatched = image_settings.model_copy(update={"image_encoder": str(other)})
    searcher = ImageSearcher.open(mismatched, image_index)
    assert searcher.encoder.id == ImageSearcher.open(image_settings, image_index).encoder.id
    # An index whose encoder is not on this machine is refused (never downloaded).
    elsewhere = tmp_path / "other-home"
    shutil.copytree(image_settings.home, elsewhere)
    moved = image_settings.model_copy(update={"home": elsewhere})
    manifest_path = next((elsewhere / "indexes" / image_index).glob("v*/manifest.json"))
    manifest_path.write_text(
        manifest_path.read_text().replace(str(tiny_clip_dir), str(tmp_path / "gone"))
    )
    with pytest.raises(IndexMismatchError, match="not on this machine"):
        ImageSearcher.open(moved, image_index)


# --- building ---------------------------------------------------------------------------------


def test_manifest_lines_naming_missing_or_outside_files_are_skipped(
    fresh_settings: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    folder = tmp_path / "data"
    ids = copy_images(image_corpus, folder, 3)
    outside = tmp_path / "outside.jpg"
    shutil.copy(folder / f"{ids[0]}.jpg", outside)
    rows = [{"path": f"{i}.jpg", "caption": f"case {i}"} for i in ids]
    rows.insert(1, {"path": "missing.jpg", "caption": "gone"})
    rows.insert(2, {"path": "../outside.jpg", "caption": "escapes the folder"})
    warnings: list[str] = []
    summary = build_image_index(
        fresh_settings, "m", write_manifest(folder, rows), warn=warnings.append
    )
    assert summary.added == 3 and len(summary.skipped) == 2
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "missing.jpg" in warnings[0] and "no such file" in warnings[0]
    assert "../outside.jpg" in warnings[1] and "outside" in warnings[1]
    assert ":3:" in warnings[1], "the message names the manifest line"
    searcher = ImageSearcher.open(fresh_settings, "m")
    assert searcher.size == 3


def test_csv_manifest_with_reports_and_an_unreadable_image(
    fresh_settings: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    folder = tmp_path / "data"
    ids = copy_images(image_corpus, folder, 2)
    (folder / "broken.png").write_text("not an image")
    manifest = folder / "cases.csv"
    manifest.write_text(
        "path,report,modality,id\n"
        f"{ids[0]}.jpg,Report one,CT,a\n"
        "broken.png,Report two,MR,b\n"
        f"{ids[1]}.jpg,Report three,XR,c\n",
        encoding="utf-8",
    )
    warnings: list[str] = []
    summary = build_image_index(fresh_settings, "csv", manifest, warn=warnings.append)
    assert summary.added == 2 and len(warnings) == 1 and "broken.png" in warnings[0]
    searcher = ImageSearcher.open(fresh_settings, "csv")
    hit = searcher.search_image(load_image(folder / f"{ids[1]}.jpg"), k=1)[0]
    assert (hit.case_id, hit.caption, hit.modality) == ("c", "Report three", "XR")


def test_folder_with_sidecar_captions_series_and_volume(
    fresh_settings: Settings, image_corpus: ImageCorpus, shared_data: Path, tmp_path: Path
):
    folder = tmp_path / "folder"
    ids = copy_images(image_corpus, folder, 2)
    (folder / f"{ids[0]}.txt").write_text("Sidecar caption for the first image.\n")
    shutil.copytree(shared_data / "imaging" / "dicom" / "monai_ct_series", folder / "ct_series")
    (folder / "ct_series.txt").write_text("Head CT series.")
    shutil.copy(shared_data / "imaging" / "nifti" / "anatomical.nii", folder / "brain.nii")
    (folder / "README.md").write_text("not an image, ignored")
    summary = build_image_index(fresh_settings, "folder", folder)
    assert summary.added == 4 and not summary.skipped
    assert summary.frames == 2 + 3 + 3  # two images, 3 of 4 slices, 3 planes
    assert summary.uncaptioned == 2
    version, _ = store.open_version(fresh_settings.indexes_dir, "folder")
    with sqlite3.connect(version / DB_FILE) as db:
        rows = dict(db.execute("SELECT case_id || '|' || frame, caption FROM images").fetchall())
    assert rows[f"{ids[0]}.jpg|"] == "Sidecar caption for the first image."
    assert rows["ct_series|slice 1/4"] == "Head CT series."
    assert "brain.nii|axial 13/25" in rows and "brain.nii|sagittal 17/33" in rows
    searcher = ImageSearcher.open(fresh_settings, "folder")
    hits = searcher.search_image(load_image(folder / "brain.nii"), k=4)
    assert hits[0].case_id == "brain.nii"
    assert len({hit.case_id for hit in hits}) == 4, "one hit per case, not per frame"


def test_empty_folder_is_an_error_and_builds_nothing(fresh_settings: Settings, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images found"):
        build_image_index(fresh_settings, "empty", empty)
    assert store.list_indexes(fresh_settings.indexes_dir) == []


def test_nothing_ingestable_is_an_error(fresh_settings: Settings, tmp_path: Path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("text")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    warnings: list[str] = []
    with pytest.raises(InputError, match="nothing could be ingested"):
        build_image_index(fresh_settings, "bad", folder, warn=warnings.append)
    assert len(warnings) == 2
    assert store.list_indexes(fresh_settings.indexes_dir) == []


def test_re_adding_updates_cases_and_adding_is_incremental(
    fresh_settings: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    folder = tmp_path / "data"
    ids = copy_images(image_corpus, folder, 4)
    first = write_manifest(folder, [{"path": f"{i}.jpg", "caption": "old"} for i in ids[:3]])
    build_image_index(fresh_settings, "inc", first)

    # Same ids again: new caption for one, another image under an existing id, one new case.
    rows = [
        {"path": f"{ids[0]}.jpg", "caption": "new caption", "id": ids[0] + ".jpg"},
        {"path": f"{ids[3]}.jpg", "caption": "replaced image", "id": ids[1] + ".jpg"},
        {"path": f"{ids[3]}.jpg", "caption": "brand new", "id": "extra"},
    ]
    summary = build_image_index(fresh_settings, "inc", write_manifest(folder, rows))
    assert (summary.added, summary.updated, summary.unchanged) == (1, 1, 1)
    assert summary.cases_total == 4 and summary.vectors_total == 4

    searcher = ImageSearcher.open(fresh_settings, "inc")
    assert searcher.size == 4
    top = searcher.search_image(load_image(folder / f"{ids[0]}.jpg"), k=1)[0]
    assert (top.case_id, top.caption) == (f"{ids[0]}.jpg", "new caption")
    hits = searcher.search_image(load_image(folder / f"{ids[3]}.jpg"), k=2)
    assert {h.case_id for h in hits} == {f"{ids[1]}.jpg", "extra"}
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) == pytest.approx(hits[1].score, abs=1e-4)
    _, manifest = store.open_version(fresh_settings.indexes_dir, "inc")
    assert len(manifest.sources) == 1  # the same manifest path, recorded once


def test_interrupted_build_keeps_the_previous_version_searchable(
    fresh_settings: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    folder = tmp_path / "data"
    ids = copy_images(image_corpus, folder, 6)
    build_image_index(
        fresh_settings, "keep", write_manifest(folder, [{"path": f"{i}.jpg"} for i in ids[:2]])
    )
    root = store.index_root(fresh_settings.indexes_dir, "keep")
    live_before = store.current_version(root)

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "encode":
            raise KeyboardInterrupt  # Ctrl-C in the middle of embedding

    more = write_manifest(folder, [{"path": f"{i}.jpg"} for i in ids])
    settings = fresh_settings.model_copy(update={"encode_batch_size": 2})
    with pytest.raises(KeyboardInterrupt):
        build_image_index(settings, "keep", more, progress=interrupt)

    assert store.current_version(root) == live_before
    assert not list(root.glob(".staging-*")), "no half-built version left behind"
    searcher = ImageSearcher.open(fresh_settings, "keep")
    assert searcher.size == 2
    assert searcher.search_image(load_image(folder / f"{ids[1]}.jpg"), k=1)[0].case_id == (
        f"{ids[1]}.jpg"
    )


def test_adding_with_another_encoder_is_refused(
    fresh_settings: Settings, image_corpus: ImageCorpus, tmp_path: Path, tiny_clip_dir: Path
):
    folder = tmp_path / "data"
    ids = copy_images(image_corpus, folder, 1)
    manifest = write_manifest(folder, [{"path": f"{ids[0]}.jpg"}])
    build_image_index(fresh_settings, "enc", manifest)
    other = tmp_path / "other-clip"
    shutil.copytree(tiny_clip_dir, other)
    with pytest.raises(IndexMismatchError):
        build_image_index(
            fresh_settings.model_copy(update={"image_encoder": str(other)}), "enc", manifest
        )
