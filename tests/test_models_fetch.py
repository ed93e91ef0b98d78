"""`suwen models fetch` / `suwen models list` against a hub stand-in on 127.0.0.1 serving the
tiny checkpoints under the real models' names: only the needed files are fetched, a dropped
connection and an interrupted run both resume without refetching what is on disk, the data
home's suwen.toml then points at the local copies (keeping the user's own keys), and the hub is
offline again for everything else."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen import models
from suwen.cli import app
from suwen.config import (
    LINGSHU_7B,
    MEDCPT_ARTICLE,
    MEDCPT_CROSS,
    MEDCPT_QUERY,
    Settings,
    load_settings,
)
from tests.fake_hub import HubState, serve_hub

COMMIT = "a" * 40
DECOYS = {"README.md": b"# model card", "onnx/model.onnx": b"onnx", "pytorch_model.bin": b"x"}


@pytest.fixture()
def hub_state(tiny_model_dir: Path, tiny_clip_dir: Path, minilm_path: Path) -> HubState:
    state = HubState()
    state.add_folder(LINGSHU_7B, tiny_model_dir, COMMIT, **DECOYS)
    # BiomedCLIP as the hub has it: the text tower is named by its hub id, whose config.json
    # lives in that other repository.
    clip_files = {
        path.name: path.read_bytes() for path in tiny_clip_dir.iterdir() if path.is_file()
    }
    config = json.loads(clip_files["open_clip_config.json"])
    config["model_cfg"]["text_cfg"]["hf_model_name"] = models.BIOMEDBERT
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = models.BIOMEDBERT
    clip_files["open_clip_config.json"] = json.dumps(config).encode()
    state.repos[models.BIOMEDCLIP_REPO] = models_repo(clip_files)
    tower = (tiny_clip_dir / "text_tower" / "config.json").read_bytes()
    state.repos[models.BIOMEDBERT] = models_repo(
        {"config.json": tower, "vocab.txt": b"[PAD]\n", "pytorch_model.bin": b"x"}
    )
    for repo_id in (MEDCPT_ARTICLE, MEDCPT_QUERY, MEDCPT_CROSS):
        state.add_folder(repo_id, minilm_path, COMMIT)
    return state


def models_repo(files: dict[str, bytes]):
    from tests.fake_hub import Repo

    return Repo(COMMIT, files)


@pytest.fixture()
def hub(hub_state: HubState, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubState]:
    """The stand-in, named by HF_ENDPOINT, with the hub offline as Suwen runs it."""
    from huggingface_hub import constants

    with serve_hub(hub_state) as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield hub_state


def suwen(home: Path, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), *args])


def test_only_the_files_a_model_needs_are_chosen():
    listing = {
        "config.json": 1,
        "model-00001-of-00002.safetensors": 10,
        "model-00002-of-00002.safetensors": 10,
        "model.safetensors.index.json": 1,
        "pytorch_model.bin": 10,
        "tokenizer.json": 1,
        "chat_template.jinja": 1,
        "README.md": 1,
        ".gitattributes": 1,
        "onnx/model.onnx": 10,
    }
    assert models.needed_files(listing) == [
        "chat_template.jinja",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
    ]
    bin_only = {"config.json": 1, "pytorch_model.bin": 9, "training_args.bin": 1, "vocab.txt": 1}
    assert models.needed_files(bin_only) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    assert models.needed_files(bin_only, config_only=True) == ["config.json"]


def test_names_expand_and_unknown_names_are_refused_in_one_line():
    assert [spec.name for spec in models.expand_names(["all", "medcpt"])] == [
        "lingshu-7b",
        "biomedclip",
        "medcpt",
    ]
    with pytest.raises(models.ModelFetchError, match="unknown model 'gpt-5'"):
        models.expand_names(["gpt-5"])
    with pytest.raises(models.ModelFetchError, match="fetch one model"):
        models.fetch_models(Settings(), ["biomedclip", "medcpt"], revision="v1")


@pytest.mark.slow
def test_fetch_all_writes_settings_and_then_runs_offline(hub: HubState, tmp_path: Path):
    from huggingface_hub import constants

    home = tmp_path / "home"
    home.mkdir()
    (home / "suwen.toml").write_text('# my settings\ntext_index = "mine"  # keep me\n')
    done = suwen(home, "models", "fetch", "all")
    assert done.exit_code == 0, done.output
    assert constants.HF_HUB_OFFLINE is True  # lifted for the fetch only

    lingshu = home / "models" / "lingshu-7b"
    assert not (lingshu / "README.md").exists() and not (lingshu / "onnx").exists()
    assert not (lingshu / "pytorch_model.bin").exists()  # safetensors are there
    assert (lingshu / "model.safetensors").read_bytes() == hub.repos[LINGSHU_7B].files[
        "model.safetensors"
    ]
    toml = (home / "suwen.toml").read_text()
    assert "# my settings" in toml and 'text_index = "mine"  # keep me' in toml
    assert stat.S_IMODE((home / "suwen.toml").stat().st_mode) == 0o600
    settings = load_settings(None, {"home": home}).settings
    assert settings.text_index == "mine"
    assert settings.vlm == str(lingshu.resolve())
    assert settings.text_encoder == str((home / "models" / "medcpt-article").resolve())
    assert settings.query_encoder == str((home / "models" / "medcpt-query").resolve())
    assert settings.cross_encoder == str((home / "models" / "medcpt-cross").resolve())

    # BiomedCLIP loads from its folder with the hub offline (its text tower's config included).
    from suwen.indexes.image_encoder import load_image_encoder

    encoder = load_image_encoder(settings.model_copy(update={"device": "cpu"}))
    assert encoder.encode_texts(["chest radiograph"]).shape[1] == encoder.dim

    listed = suwen(home, "models", "list", "--json")
    rows = [json.loads(line) for line in listed.output.splitlines() if line.strip()]
    assert {row["repo_id"] for row in rows} >= {LINGSHU_7B, models.BIOMEDBERT, MEDCPT_QUERY}
    assert all(row["commit"] == COMMIT and row["complete"] for row in rows)


@pytest.mark.slow
def test_a_dropped_connection_resumes_with_a_range_request(
    hub: HubState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    # huggingface_hub keeps what it has received in whole chunks (10 MB); the tiny weights are
    # 5 MB, so chunks are made small enough that the cut falls after several of them.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 10_000)
    weights = hub.repos[LINGSHU_7B].files["model.safetensors"]
    hub.cut_once["model.safetensors"] = 100_000
    done = suwen(tmp_path / "home", "models", "fetch", "lingshu-7b", "--revision", "v1.0")
    assert done.exit_code == 0, done.output
    assert hub.gets("/model.safetensors") == [None, "bytes=100000-"]
    assert (tmp_path / "home" / "models" / "lingshu-7b" / "model.safetensors").read_bytes() == (
        weights
    )
    record = models.records(load_settings(None, {"home": tmp_path / "home"}).settings)
    assert (record["lingshu-7b"].revision, record["lingshu-7b"].commit) == ("v1.0", COMMIT)


@pytest.mark.slow
def test_an_interrupted_fetch_resumes_without_refetching(hub: HubState, tmp_path: Path):
    home = tmp_path / "home"
    hub.broken.add("tokenizer.json")
    failed = suwen(home, "models", "fetch", "lingshu-7b")
    assert failed.exit_code != 0
    assert "Lingshu-7B" in failed.output and not (home / "suwen.toml").exists()
    assert (home / "models" / "lingshu-7b" / "model.safetensors").is_file()
    hub.broken.clear()
    before = len(hub.gets("/model.safetensors"))
    done = suwen(home, "models", "fetch", "lingshu-7b")
    assert done.exit_code == 0, done.output
    assert len(hub.gets("/model.safetensors")) == before  # kept, not fetched again
    assert (home / "models" / "lingshu-7b" / "tokenizer.json").read_bytes() == hub.repos[
        LINGSHU_7B
    ].files["tokenizer.json"]
    assert "vlm" in (home / "suwen.toml").read_text()


def test_a_missing_repository_is_one_line(hub: HubState, tmp_path: Path):
    del hub.repos[LINGSHU_7B]
    done = suwen(tmp_path / "home", "models", "fetch", "lingshu-7b")
    assert done.exit_code == 5  # a download error
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "lingshu-medical-mllm/Lingshu-7B@main" in lines[0]


def test_the_fetch_refuses_when_the_disk_is_too_small(
    hub: HubState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    done = suwen(tmp_path / "home", "models", "fetch", "lingshu-7b")
    assert done.exit_code == 5 and "only 1000 B free" in done.output
    assert not any((tmp_path / "home" / "models").glob("lingshu-7b/*.safetensors"))


def test_nothing_is_listed_before_a_fetch(tmp_path: Path):
    done = suwen(tmp_path / "home", "models", "list")
    assert done.exit_code == 0 and "no models fetched yet" in done.output
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
