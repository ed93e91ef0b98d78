"""Bad input during an ingest: each bad file is one line naming it, the good ones go in."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from suwen.indexes import store
from suwen.indexes.text_index import build_text_index
from tests.fixtures_text import text_settings_for


def _bad_sources(folder: Path, shared_data: Path) -> dict[str, Path]:
    xml = (shared_data / "pubmed_xml" / "pubmed-29768149.xml").read_bytes()
    files = {
        "truncated_gz": ("cut.xml.gz", gzip.compress(xml)[:300]),
        "corrupt_gz": ("noise.xml.gz", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4),
        "malformed_xml": ("broken.xml", xml[: len(xml) // 2]),
        "unsupported": ("table.csv", b"a,b,c\n1,2,3\n"),
        "empty": ("empty.jsonl", b""),
        "not_utf8": ("latin1.txt", "1|t|Caf\u00e9\n1|a|R\u00e9sum\u00e9\n".encode("latin-1")),
        "fake_pdf": ("paper.pdf", b"<html>not a pdf</html>"),
    }
    paths = {}
    for key, (name, content) in files.items():
        paths[key] = folder / name
        paths[key].write_bytes(content)
    return paths


def test_each_bad_file_is_reported_and_the_rest_is_ingested(
    tmp_path: Path, minilm_path: Path, shared_data: Path
) -> None:
    bad = _bad_sources(tmp_path, shared_data)
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"pmid": "42", "title": "Good", "abstract": "A valid abstract."})
        + "\n{broken line\n",
        encoding="utf-8",
    )
    empty_folder = tmp_path / "nothing_here"
    empty_folder.mkdir()
    settings = text_settings_for(tmp_path / "home", minilm_path)

    report = build_text_index(settings, "mixed", [*bad.values(), good, empty_folder])

    by_path = {row.path: row for row in report.sources}
    for path in [*bad.values(), empty_folder]:
        row = by_path[str(path)]
        assert row.error and str(path) in row.error and "\n" not in row.error, row
        assert row.documents == 0
    assert by_path[str(good)].added == 1 and by_path[str(good)].skipped == 1
    assert report.files_failed == len(bad) + 1
    assert len(report.errors) == len(bad) + 2  # + the folder + the broken JSONL line
    assert report.ingested_anything
    _, manifest = store.open_version(settings.indexes_dir, "mixed")
    assert manifest.extra["documents"] == 1


def test_nothing_ingestable_publishes_nothing(
    tmp_path: Path, minilm_path: Path, shared_data: Path
) -> None:
    bad = _bad_sources(tmp_path, shared_data)
    settings = text_settings_for(tmp_path / "home", minilm_path)
    report = build_text_index(settings, "empty", list(bad.values()))
    assert not report.ingested_anything
    assert report.files_failed == len(bad)
    assert store.list_indexes(settings.indexes_dir) == []
