"""One content digest (suwen/digests.py) for the image index and the eval leakage guard."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.digests import sha256_of
from suwen.errors import InputError
from suwen.evaluate.benchmarks import load_benchmark
from suwen.indexes.image_index import build_image_index
from suwen.medimage import load_image
from suwen.retrieval.images import ImageSearcher
from tests.fixtures_images import image_settings_for


def test_a_file_digest_is_the_sha256_of_its_bytes(shared_data: Path) -> None:
    path = shared_data / "imaging" / "dicom" / "CT_small.dcm"
    assert sha256_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_series_digest_follows_its_slices_not_where_it_lies(
    shared_data: Path, tmp_path: Path
) -> None:
    series = shared_data / "imaging" / "dicom" / "monai_ct_series"
    copy = tmp_path / "elsewhere" / "series"
    shutil.copytree(series, copy)
    assert sha256_of(copy) == sha256_of(series)
    first = sorted(copy.iterdir())[0]
    first.rename(first.with_name(first.name + "-renamed"))
    assert sha256_of(copy) != sha256_of(series)


def test_an_unreadable_path_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.png: cannot read") as refused:
        sha256_of(tmp_path / "missing.png")
    assert "\n" not in str(refused.value)


@pytest.mark.slow
def test_the_leakage_guard_leaves_out_the_question_image_the_index_holds(
    shared_data: Path, tmp_path: Path, tiny_clip_dir: Path
) -> None:
    """An eval question's own image, indexed as a case (copied elsewhere, same bytes), is left
    out of its similar cases by the digest the benchmark loader records: the loader and the
    index agree on what the same image is."""
    samples = load_benchmark("VQA-RAD", shared_data, tmp_path / "cache")
    with_images = [s for s in samples if s.images]
    question = with_images[0]
    others = [s for s in with_images if s.images[0] != question.images[0]][:3]
    folder = tmp_path / "cases"
    folder.mkdir()
    rows = []
    for number, sample in enumerate([question, *others]):
        name = f"case{number}{Path(sample.images[0]).suffix}"
        shutil.copyfile(sample.images[0], folder / name)
        rows.append(json.dumps({"path": name, "id": f"case{number}", "caption": "x"}))
    (folder / "manifest.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings: Settings = image_settings_for(tmp_path / "home", tiny_clip_dir)
    build_image_index(settings, "guard", folder / "manifest.jsonl")
    searcher = ImageSearcher.open(settings, "guard")
    image = load_image(Path(question.images[0]))
    assert searcher.search_image(image, k=1)[0].case_id == "case0"
    guarded = searcher.search_image(image, k=4, exclude_sha256=question.exclude_image_sha256)
    assert "case0" not in {hit.case_id for hit in guarded} and len(guarded) == 3
