"""Which encoder searches an index: its own when that model is on this machine (with one line
saying so), the configured one when they are the same model (a fetched folder is its hub id),
and a one-line refusal when the index names a model that would have to be downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from suwen import models
from suwen.config import MEDCPT_ARTICLE, MEDCPT_QUERY, Settings
from suwen.errors import IndexMismatchError
from suwen.indexes import store
from suwen.indexes.store import IndexManifest


def manifest(
    kind: str, encoder: str, query: str | None = None, name: str = "demo"
) -> IndexManifest:
    # Sealed with no files: the encoder choice is read before any file is opened.
    return IndexManifest(
        name=name, kind=kind, encoder=encoder, query_encoder=query, dim=8, files={}
    )


def fetched(home: Path, folder: str, repo_id: str) -> Path:
    """A complete fetched model folder with its record, as `suwen models fetch` leaves it."""
    path = home / "models" / folder
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    record = models.FetchedRepo(
        model="medcpt",
        repo_id=repo_id,
        folder=folder,
        revision="main",
        commit="c" * 40,
        files=["config.json"],
        bytes=2,
        endpoint="http://127.0.0.1",
        fetched="now",
    )
    models.save_record(Settings(home=home), record)
    return path


def test_a_local_encoder_the_index_names_is_used_with_one_line(tmp_path: Path, minilm_path: Path):
    settings = Settings(home=tmp_path)  # configured: MedCPT from the hub
    choice = models.resolve_query_encoder(
        manifest("text", str(minilm_path), str(minilm_path)), settings
    )
    assert choice.settings.query_encoder == str(minilm_path.resolve())
    assert choice.settings.text_encoder == str(minilm_path)
    assert choice.notice is not None and "\n" not in choice.notice
    assert str(minilm_path) in choice.notice and MEDCPT_QUERY in choice.notice


def test_the_configured_encoder_is_used_silently_when_it_is_the_same_model(
    tmp_path: Path, minilm_path: Path
):
    settings = Settings(home=tmp_path, text_encoder=str(minilm_path), text_query_encoder=None)
    choice = models.resolve_query_encoder(manifest("text", str(minilm_path)), settings)
    assert choice.notice is None
    # The venv may be reached through a symlink (CI links .venv to a cached one): same folder.
    assert Path(choice.settings.query_encoder).resolve() == minilm_path.resolve()


def test_a_fetched_folder_is_the_same_model_as_its_hub_id(tmp_path: Path):
    query = fetched(tmp_path, "medcpt-query", MEDCPT_QUERY)
    settings = Settings(home=tmp_path, text_query_encoder=str(query))
    # An index imported from NCBI's embeddings names the hub ids.
    choice = models.resolve_query_encoder(manifest("text", MEDCPT_ARTICLE, MEDCPT_QUERY), settings)
    assert choice.notice is None
    assert choice.settings.query_encoder == str(query.resolve())
    # And with the hub ids configured, the fetched folder is what loads, without a network.
    default = Settings(home=tmp_path)
    choice = models.resolve_query_encoder(manifest("text", MEDCPT_ARTICLE, MEDCPT_QUERY), default)
    assert choice.notice is None and choice.settings.query_encoder == str(query.resolve())
    choice = models.resolve_query_encoder(
        manifest("text", MEDCPT_ARTICLE, MEDCPT_QUERY),
        Settings(home=tmp_path, text_encoder="sentence-transformers/other"),
    )
    assert choice.settings.query_encoder == str(query.resolve()) and choice.notice


def test_an_encoder_that_is_not_local_is_refused_in_one_line(tmp_path: Path):
    settings = Settings(home=tmp_path)
    for index in (
        manifest("text", "someone/not-on-this-machine"),
        manifest("text", str(tmp_path / "gone")),
        manifest("image", "hf-hub:someone/not-a-clip"),
    ):
        with pytest.raises(IndexMismatchError) as caught:
            models.resolve_query_encoder(index, settings)
        message = str(caught.value)
        assert "not on this machine" in message and "\n" not in message


def test_an_image_index_uses_its_own_local_clip(tmp_path: Path, tiny_clip_dir: Path):
    settings = Settings(home=tmp_path)  # configured: BiomedCLIP from the hub
    choice = models.resolve_query_encoder(manifest("image", str(tiny_clip_dir)), settings)
    assert choice.settings.image_encoder == str(tiny_clip_dir.resolve())
    assert choice.notice is not None and "image encoder" in choice.notice
    same = Settings(home=tmp_path, image_encoder=str(tiny_clip_dir))
    assert models.resolve_query_encoder(manifest("image", str(tiny_clip_dir)), same).notice is None


# -- end to end: indexes built with another encoder than the configured default -------------


def search(home: Path, *args: str):
    from typer.testing import CliRunner

    from suwen.cli import app

    return CliRunner().invoke(app, ["--home", str(home), "search", *args])


@pytest.mark.slow
def test_search_text_uses_the_index_encoder_and_says_so(text_index_home: Path):
    # Configured: the MedCPT defaults (not on this machine); the index was built with MiniLM.
    done = search(text_index_home, "text", "pulmonary embolism", "--index", "pubmed", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)
    notes = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and "searching with its own text encoder" in notes[0]


@pytest.mark.slow
def test_search_image_uses_the_index_encoder(
    image_settings: Settings, image_index: str, image_corpus
):
    query = image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg"
    done = search(image_settings.home, "image", str(query), "--index", image_index, "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)[0]["id"] == f"case:{image_corpus.case_ids[0]}"
    assert "its own image encoder" in done.stderr


def test_an_index_naming_a_model_that_is_not_here_is_refused_by_search(text_home_copy: Path):
    # A real, intact index whose manifest names an encoder this machine does not have (the
    # manifest is not among the digested files, so the index itself stays intact).
    version = store.current_version(text_home_copy / "indexes" / "pubmed")
    assert version is not None
    built = store.read_manifest(version)
    elsewhere = built.model_copy(update={"encoder": "someone/elsewhere", "query_encoder": None})
    store.write_manifest(version, elsewhere)
    done = search(text_home_copy, "text", "anything", "--index", "pubmed")
    assert done.exit_code != 0
    assert "someone/elsewhere" in done.output and "not on this machine" in done.output


def test_ask_and_chat_say_which_encoder_an_index_uses(tmp_path: Path, minilm_path: Path):
    """open_agent (behind ask, chat, batch) says it once per index, before searching."""
    import asyncio

    from suwen.runtime import open_agent
    from tests.test_ask_runtime import Recorder

    version = tmp_path / "indexes" / "demo-pubmed" / "v000001"
    version.mkdir(parents=True)
    store.write_manifest(version, manifest("text", str(minilm_path), name="demo-pubmed"))
    (tmp_path / "indexes" / "demo-pubmed" / store.CURRENT).write_text("v000001")
    notices: list[str] = []
    settings = Settings(home=tmp_path, vllm_url=["http://127.0.0.1:8111/v1"])

    async def run() -> None:
        async with open_agent(
            settings,
            text_index="demo-pubmed",
            sessions=False,
            backends=Recorder().backends(),
            on_notice=notices.append,
        ):
            pass

    asyncio.run(run())
    assert [n for n in notices if "demo-pubmed" in n] == [
        f"index 'demo-pubmed': searching with its own text encoder {minilm_path} "
        f"(the configured one is {MEDCPT_QUERY})"
    ]
