"""`suwen index images` on case libraries as people have them: a Hugging Face dataset saved on
disk (parquet, or save_to_disk's arrow stream) built from real VQA-RAD images, and a
study-per-folder export built from the shared DICOM series, each study's report inside it."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from suwen.cli import app
from suwen.config import Settings
from suwen.errors import InputError
from suwen.indexes import image_sources, store
from tests.fixtures_images import ImageCorpus

ROWS = 10


def dataset_table(corpus: ImageCorpus, rows: int = ROWS) -> pa.Table:
    """The layout `datasets` gives an Image feature: a struct of bytes and path per row."""
    ids = corpus.case_ids[:rows]
    images = [
        {"bytes": (corpus.folder / f"{case_id}.jpg").read_bytes(), "path": f"{case_id}.jpg"}
        for case_id in ids
    ]
    return pa.table(
        {
            "image": images,
            "caption": [corpus.captions[case_id] for case_id in ids],
            "uid": [f"vqa-{case_id}" for case_id in ids],
            "modality": ["radiograph"] * len(ids),
        }
    )


def cases_of(settings: Settings, name: str) -> dict[str, tuple[str, str | None]]:
    version, _ = store.open_version(settings.indexes_dir, name)
    db = sqlite3.connect(version / "images.sqlite")
    try:
        rows = db.execute("SELECT DISTINCT case_id, caption, modality FROM images").fetchall()
    finally:
        db.close()
    return {case_id: (caption, modality) for case_id, caption, modality in rows}


@pytest.fixture()
def cli_home(tmp_path: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    home = tmp_path / "home"
    monkeypatch.setenv("SUWEN_HOME", str(home))
    monkeypatch.setenv("SUWEN_IMAGE_ENCODER", str(tiny_clip_dir))
    monkeypatch.setenv("SUWEN_DEVICE", "cpu")
    return Settings(home=home, image_encoder=str(tiny_clip_dir), device="cpu")


def index_images(*args: str):
    return CliRunner().invoke(app, ["index", "images", *args])


@pytest.mark.slow
def test_a_parquet_dataset_is_indexed_with_its_columns(
    cli_home: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    table = dataset_table(image_corpus)
    parquet = tmp_path / "vqa-rad.parquet"
    pq.write_table(table, parquet, row_group_size=4)
    args = [str(parquet), "--name", "vqa", "--id-column", "uid", "--modality-column", "modality"]
    done = index_images(*args)
    assert done.exit_code == 0, done.output
    cases = cases_of(cli_home, "vqa")
    first = image_corpus.case_ids[0]
    assert len(cases) == ROWS
    assert cases[f"vqa-{first}"] == (image_corpus.captions[first], "radiograph")
    # A re-run writes no image again and changes nothing.
    extracted = image_sources.extraction_dir(cli_home.home, parquet)
    assert extracted.parent == cli_home.home / "case_images"
    mtimes = {p: p.stat().st_mtime_ns for p in extracted.rglob("*.jpg")}
    assert len(mtimes) == ROWS
    again = index_images(*args)
    assert again.exit_code == 0 and f"{ROWS} unchanged" in again.output
    assert {p: p.stat().st_mtime_ns for p in extracted.rglob("*.jpg")} == mtimes


@pytest.mark.slow
def test_a_saved_arrow_dataset_is_read_in_small_batches(
    cli_home: Settings, image_corpus: ImageCorpus, tmp_path: Path
):
    saved = tmp_path / "saved" / "train"
    saved.mkdir(parents=True)
    table = dataset_table(image_corpus)
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)  # one big batch, as save_to_disk writes
    (saved / "dataset_info.json").write_text("{}")
    batches = list(
        image_sources._batches(saved / "data-00000-of-00001.arrow", image_sources.DatasetColumns())
    )
    assert max(batch.num_rows for batch in batches) <= image_sources.BATCH_ROWS
    done = index_images(str(tmp_path / "saved"), "--name", "saved")
    assert done.exit_code == 0, done.output
    ids = set(cases_of(cli_home, "saved"))
    assert ids == {f"data-00000-of-00001:{n}" for n in range(ROWS)}


def test_dataset_problems_are_one_line_and_bad_rows_are_skipped(tmp_path: Path):
    parquet = tmp_path / "bad.parquet"
    pq.write_table(
        pa.table(
            {
                "img": [b"\x89PNG\r\n\x1a\n" + b"0" * 10, b"not an image", None],
                "caption": ["a", "b", "c"],
            }
        ),
        parquet,
    )
    warnings: list[str] = []
    with pytest.raises(InputError) as caught:
        image_sources.extract_dataset(
            parquet, tmp_path / "out", image_sources.DatasetColumns(), warnings.append
        )
    assert "no column 'image'" in str(caught.value) and "columns: img, caption" in str(caught.value)
    columns = image_sources.DatasetColumns(image="img")
    manifest, rows = image_sources.extract_dataset(
        parquet, tmp_path / "out", columns, warnings.append
    )
    assert rows == 1
    assert [line.split(":")[1].split(" ")[0] for line in warnings] == ["1", "2"]
    assert json.loads(manifest.read_text())["caption"] == "a"


def test_an_image_path_outside_the_dataset_is_refused(tmp_path: Path, shared_data: Path):
    folder = tmp_path / "ds"
    folder.mkdir()
    shutil.copy(shared_data / "vqa_rad" / "images" / "synpic54610.jpg", folder / "in.jpg")
    pq.write_table(
        pa.table({"image": ["in.jpg", "../../etc/passwd"], "caption": ["x", "y"]}),
        folder / "d.parquet",
    )
    warnings: list[str] = []
    _, rows = image_sources.extract_dataset(
        folder, tmp_path / "out", image_sources.DatasetColumns(), warnings.append
    )
    assert rows == 1 and "not a file inside" in warnings[0]


@pytest.mark.slow
def test_a_study_per_folder_export_is_captioned_by_each_report(
    cli_home: Settings, shared_data: Path, tmp_path: Path
):
    export = tmp_path / "export"
    series = export / "patient-1" / "study-ct"
    shutil.copytree(shared_data / "imaging" / "dicom" / "monai_ct_series", series)
    (series / "report.txt").write_text("CT head: no acute haemorrhage.")
    single = export / "patient-2" / "study-ct"
    single.mkdir(parents=True)
    shutil.copy(shared_data / "imaging" / "dicom" / "CT_small.dcm", single / "IM0001")
    (single / "findings.txt").write_text("Small CT slice, unremarkable.")
    pictures = export / "patient-3" / "study-cxr"
    pictures.mkdir(parents=True)
    for name in ("synpic54610.jpg", "synpic100132.jpg"):
        shutil.copy(shared_data / "vqa_rad" / "images" / name, pictures / name)
    (pictures / "report.txt").write_text("Chest radiographs, PA and lateral: clear lungs.")
    done = index_images(str(export), "--name", "studies")
    assert done.exit_code == 0, done.output
    cases = {case_id: caption for case_id, (caption, _) in cases_of(cli_home, "studies").items()}
    assert cases == {
        "patient-1/study-ct": "CT head: no acute haemorrhage.",
        "patient-2/study-ct": "Small CT slice, unremarkable.",
        "patient-3/study-cxr/synpic100132.jpg": "Chest radiographs, PA and lateral: clear lungs.",
        "patient-3/study-cxr/synpic54610.jpg": "Chest radiographs, PA and lateral: clear lungs.",
    }
