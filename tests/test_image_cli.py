"""`suwen index images` and `suwen search image` from the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen.cli import app
from suwen.config import Settings
from tests.fixtures_images import ImageCorpus

HIT_KEYS = {"id", "score", "source", "path", "caption", "text"}


@pytest.fixture()
def cli_env(suwen_home: Path, tiny_clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data home and the tiny model, through the environment as a user would set them."""
    monkeypatch.setenv("SUWEN_IMAGE_ENCODER", str(tiny_clip_dir))
    monkeypatch.setenv("SUWEN_DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return suwen_home


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def small_manifest(corpus: ImageCorpus, folder: Path, count: int = 3) -> tuple[Path, list[str]]:
    folder.mkdir()
    ids = corpus.case_ids[:count]
    lines = []
    for case_id in ids:
        shutil.copy(corpus.folder / f"{case_id}.jpg", folder / f"{case_id}.jpg")
        lines.append(
            json.dumps(
                {"path": f"{case_id}.jpg", "id": case_id, "caption": corpus.captions[case_id]}
            )
        )
    lines.append(json.dumps({"path": "gone.jpg", "caption": "missing"}))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, ids


def test_index_then_search_json(cli_env: Path, image_corpus: ImageCorpus, tmp_path: Path):
    manifest, ids = small_manifest(image_corpus, tmp_path / "data")
    code, out, err = run("index", "images", "--name", "cli", str(manifest))
    assert code == 0, err
    assert "3 added" in out and "1 skipped" in out
    assert "gone.jpg" in err and "no such file" in err

    query = tmp_path / "data" / f"{ids[1]}.jpg"
    code, out, err = run("search", "image", str(query), "--index", "cli", "-k", "2", "--json")
    assert code == 0, err
    hits = json.loads(out)
    assert isinstance(hits, list) and len(hits) == 2
    assert all(set(hit) == HIT_KEYS for hit in hits)
    assert hits[0]["id"] == f"case:{ids[1]}"
    assert hits[0]["caption"] == image_corpus.captions[ids[1]] == hits[0]["text"]
    assert Path(hits[0]["path"]) == query
    assert hits[0]["score"] >= hits[1]["score"]

    code, out, _ = run("search", "image", str(query), "--index", "cli", "--exclude-self", "--json")
    assert code == 0 and f"case:{ids[1]}" not in {hit["id"] for hit in json.loads(out)}


def test_search_table_uses_the_default_index_name(
    cli_env: Path, image_corpus: ImageCorpus, tmp_path: Path
):
    manifest, ids = small_manifest(image_corpus, tmp_path / "data", count=2)
    assert run("index", "images", str(manifest))[0] == 0  # --name defaults to image_index
    code, out, err = run("search", "image", str(tmp_path / "data" / f"{ids[0]}.jpg"), "-k", "1")
    assert code == 0, err
    assert ids[0] in out and "score" in out


def test_empty_folder_exits_non_zero_with_a_clear_message(cli_env: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run("index", "images", "--name", "x", str(empty))
    assert code != 0
    assert "no images found" in err and str(empty) in " ".join(err.split())


def test_search_errors_are_one_line(cli_env: Path, tmp_path: Path, shared_data: Path):
    query = shared_data / "imaging" / "dicom" / "CT_small.dcm"
    code, _, err = run("search", "image", str(query), "--index", "nothing-here")
    assert code != 0 and "not found" in err
    not_image = tmp_path / "fake.png"
    not_image.write_text("hello")
    code, _, err = run("search", "image", str(not_image))
    assert code != 0 and "not a readable image" in err


def test_dev_tiny_clip_writes_a_model_the_encoder_loads(tmp_path: Path, shared_data: Path):
    from suwen.indexes.image_encoder import load_image_encoder
    from suwen.medimage import load_image

    model = tmp_path / "tiny-clip"
    code, _, err = run("dev", "tiny-clip", str(model))
    assert code == 0, err
    assert (model / "open_clip_config.json").is_file()
    encoder = load_image_encoder(Settings(home=tmp_path / "home", image_encoder=str(model)))
    image = load_image(shared_data / "imaging" / "dicom" / "CT_small.dcm")
    assert encoder.encode_images([image]).shape == (1, encoder.dim)
    again = CliRunner().invoke(app, ["dev", "tiny-clip", str(model)])
    assert again.exit_code != 0, "never overwrites a directory"
    assert "not an empty directory" in f"{again.stderr} {again.exception}"


@pytest.mark.slow
def test_console_script_searches_offline(
    image_corpus: ImageCorpus, image_settings: Settings, image_index: str
):
    """The installed `suwen` script, as a user runs it, on the session index; hub access off."""
    script = Path(sys.executable).with_name("suwen")
    env = dict(os.environ, HF_HUB_OFFLINE="1", SUWEN_HOME=str(image_settings.home))
    env["SUWEN_IMAGE_ENCODER"] = image_settings.image_encoder
    case_id = image_corpus.case_ids[3]
    query = image_corpus.folder / f"{case_id}.jpg"
    found = subprocess.run(
        [str(script), "search", "image", str(query), "--index", image_index, "-k", "3", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert [set(hit) for hit in hits] == [HIT_KEYS] * 3
    assert hits[0]["id"] == f"case:{case_id}"
