"""`suwen index text`, `suwen search text`, `suwen index list|info` from the command line."""

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
from suwen.indexes import store
from tests.fixtures_text import TEXT_INDEX

HIT_KEYS = {"id", "score", "source", "pmid", "title", "text", "page"}
SUWEN = Path(sys.executable).with_name("suwen")


@pytest.fixture()
def cli_env(minilm_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The encoder, device and offline mode through the environment, as a user sets them."""
    values = {
        "SUWEN_TEXT_ENCODER": str(minilm_path),
        "SUWEN_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_search_json_shape(cli_env: dict[str, str], text_index_home: Path) -> None:
    code, out, err = run(
        "--home", str(text_index_home), "search", "text", "budesonide formoterol asthma",
        "--index", TEXT_INDEX, "-k", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    hits = json.loads(out)
    assert len(hits) == 3
    assert all(set(hit) == HIT_KEYS for hit in hits)
    assert hits[0]["pmid"] == "29768149"
    assert hits[0]["id"].startswith("pmid:29768149#")
    assert hits[0]["title"].startswith("Inhaled Combined Budesonide-Formoterol")
    assert hits[0]["source"].endswith("pubmed.xml")
    assert isinstance(hits[0]["score"], float)


def test_search_table_and_exclude(cli_env: dict[str, str], text_index_home: Path) -> None:
    code, out, _ = run(
        "--home", str(text_index_home), "search", "text", "budesonide formoterol asthma",
        "-k", "2", "--exclude", "29768149", "--method", "bm25",
    )  # fmt: skip
    assert code == 0
    assert "29768149" not in out and "text hits for" in out


def test_index_then_add_then_list_and_info(
    cli_env: dict[str, str], suwen_home: Path, tmp_path: Path
) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(
        json.dumps({"pmid": "1", "title": "Gout and urate", "abstract": "Serum urate targets."})
        + "\n",
        encoding="utf-8",
    )
    bad = tmp_path / "broken.xml"
    bad.write_text("<PubmedArticleSet><PubmedArticle>", encoding="utf-8")
    code, out, err = run("index", "text", "--name", "cli", str(good), str(bad))
    assert code == 0, err
    assert "1 added" in out and "1 files skipped" in out
    assert str(bad) in err and "malformed XML" in err

    more = tmp_path / "b.jsonl"
    more.write_text(
        json.dumps({"pmid": "2", "title": "Asthma", "abstract": "Inhaled steroids."})
        + "\n"
        + json.dumps({"pmid": "1", "title": "Gout and urate", "abstract": "Serum urate goals."})
        + "\n",
        encoding="utf-8",
    )
    code, out, _ = run("index", "text", "--name", "cli", str(more))
    assert code == 0 and "1 added, 1 updated" in out and "2 documents" in out

    # An image index next to it must be listed too (written here as its manifest only).
    with store.new_version(suwen_home / "indexes", "pics", copy_current=False) as staging:
        store.write_manifest(
            staging, store.IndexManifest(name="pics", kind="image", encoder="clip", dim=512)
        )
    code, out, _ = run("index", "list", "--json")
    assert code == 0
    listed = {m["name"]: m for m in json.loads(out)}
    assert listed["cli"]["kind"] == "text" and listed["cli"]["extra"]["documents"] == 2
    assert listed["pics"]["kind"] == "image"
    code, out, _ = run("index", "list")
    assert code == 0 and "cli" in out and "pics" in out

    code, out, _ = run("index", "info", "cli", "--json")
    info = json.loads(out)
    assert code == 0 and info["count"] >= 2 and str(good) in info["sources"]
    # info opens the index's files too: a manifest without an images database is refused.
    code, _, err = run("index", "info", "pics")
    assert code == 3 and "'pics'" in err and "images.sqlite" in err  # an index error


def test_nothing_ingested_exits_non_zero(
    cli_env: dict[str, str], suwen_home: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n", encoding="utf-8")
    code, _, err = run("index", "text", "--name", "nothing", str(bad), str(tmp_path / "missing"))
    assert code == 1
    assert "unsupported format" in err and "no such file" in err
    assert "nothing could be ingested" in err


def test_bad_format_option(cli_env: dict[str, str], suwen_home: Path, tmp_path: Path) -> None:
    code, _, err = run("index", "text", "--format", "docx", str(tmp_path))
    assert code == 2 and "--format 'docx'" in err


def test_console_script_errors_are_one_line(
    cli_env: dict[str, str], suwen_home: Path, text_index_home: Path, tmp_path: Path
) -> None:
    env = {**os.environ, **cli_env, "SUWEN_HOME": str(suwen_home)}
    missing = subprocess.run(
        [str(SUWEN), "search", "text", "anything", "--index", "nope"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert missing.returncode == 3  # an index error
    assert missing.stderr.strip().count("\n") == 0
    assert "index 'nope' not found" in missing.stderr

    # Another configured encoder: the index is searched with its own, saying so in one line.
    env["SUWEN_HOME"] = str(text_index_home)
    env["SUWEN_TEXT_ENCODER"] = "some/other-encoder"
    own = subprocess.run(
        [str(SUWEN), "search", "text", "anything", "--index", TEXT_INDEX, "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
    assert own.stderr.strip().count("\n") == 0 and "its own text encoder" in own.stderr
    # An index naming an encoder that is not on this machine is refused in one line.
    moved = tmp_path / "moved"
    shutil.copytree(text_index_home, moved)
    manifest = next((moved / "indexes" / TEXT_INDEX).glob("v*/manifest.json"))
    built = json.loads(manifest.read_text())["encoder"]
    manifest.write_text(manifest.read_text().replace(json.dumps(built), '"someone/elsewhere"'))
    env["SUWEN_HOME"] = str(moved)
    mismatch = subprocess.run(
        [str(SUWEN), "search", "text", "anything", "--index", TEXT_INDEX, "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert mismatch.returncode == 3
    assert mismatch.stderr.strip().count("\n") == 0
    assert "was built with text encoder someone/elsewhere" in mismatch.stderr
    assert "not on this machine" in mismatch.stderr
    assert mismatch.stdout == ""
