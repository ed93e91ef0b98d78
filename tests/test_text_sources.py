"""Readers of PubMed XML, PubTator, JSONL, PubMedQA and PDF sources, on real files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from suwen.errors import InputError
from suwen.indexes.text_sources import (
    Deletion,
    SkippedRecord,
    detect_format,
    expand_sources,
    pdf_document_id,
    read_source,
)
from suwen.types import Document
from tests.fixtures_text import write_pdf


def _documents(path: Path, fmt: str | None = None) -> list[Document]:
    return [r for r in read_source(path, fmt) if isinstance(r, Document)]  # type: ignore[arg-type]


def test_pubmed_xml_fields(shared_data: Path) -> None:
    [doc] = _documents(shared_data / "pubmed_xml" / "pubmed-29768149.xml")
    assert doc.pmid == "29768149"
    assert doc.title == "Inhaled Combined Budesonide-Formoterol as Needed in Mild Asthma."
    assert doc.year == 2018
    assert doc.journal == "The New England journal of medicine"
    assert "Asthma" in doc.mesh and "Budesonide" in doc.mesh
    # Structured abstracts keep their section labels, one section per line.
    sections = doc.text.split("\n")
    assert [s.split(":")[0] for s in sections] == [
        "BACKGROUND",
        "METHODS",
        "RESULTS",
        "CONCLUSIONS",
    ]
    # Text inside markup (<sub>2</sub>) is kept; cited PMIDs of CommentsCorrections are not ids.
    assert "β 2-agonist" in doc.text


def test_pubmed_xml_gz_and_delete_citation(tmp_path: Path, shared_data: Path) -> None:
    xml = (shared_data / "pubmed_xml" / "pubmed-29768149.xml").read_text(encoding="utf-8")
    update = xml.replace(
        "</PubmedArticleSet>",
        "<DeleteCitation><PMID Version='1'>111</PMID><PMID Version='1'>222</PMID>"
        "</DeleteCitation></PubmedArticleSet>",
    )
    path = tmp_path / "pubmed24n0001.xml.gz"
    path.write_bytes(gzip.compress(update.encode("utf-8")))
    assert detect_format(path) == "pubmed-xml"
    records = list(read_source(path))
    assert [type(r) for r in records] == [Document, Deletion, Deletion]
    assert [r.pmid for r in records if isinstance(r, Deletion)] == ["111", "222"]


def test_pubtator_reads_every_abstract(shared_data: Path) -> None:
    path = shared_data / "abstracts" / "ncbi_disease" / "NCBIdevelopset_corpus.txt"
    assert detect_format(path) == "pubtator"
    docs = _documents(path)
    assert len(docs) == 100
    assert len({d.pmid for d in docs}) == 100
    first = docs[0]
    assert first.pmid == "8808605"
    assert first.title.startswith("Somatic-cell selection is a major determinant")
    assert first.text.startswith("X-chromosome inactivation in mammals")
    # Annotation lines (tab-separated mentions) never leak into the text.
    assert all("\t" not in d.text and "SpecificDisease" not in d.text for d in docs)


def test_pubmedqa_has_contexts_but_no_title_or_answer(shared_data: Path) -> None:
    path = shared_data / "pubmedqa" / "ori_pqal.json"
    assert detect_format(path) == "pubmedqa"
    docs = _documents(path)
    assert len(docs) == 1000
    raw = json.loads(path.read_text(encoding="utf-8"))
    doc = next(d for d in docs if d.pmid == "21645374")
    record = raw["21645374"]
    assert doc.title == ""  # the question is the benchmark query, not a title
    assert doc.year == 2011
    assert doc.mesh == record["MESHES"]
    assert doc.text.startswith("BACKGROUND: Programmed cell death")
    assert record["LONG_ANSWER"][:60] not in doc.text


def test_jsonl_with_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "articles.jsonl"
    lines = [
        json.dumps({"pmid": 123, "title": "T", "abstract": "A", "year": "2020", "mesh": "X; Y"}),
        "{not json",
        json.dumps({"title": "no pmid"}),
        "",
        json.dumps({"pmid": "456", "title": "Second", "abstract": "B", "journal": "J"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert detect_format(path) == "jsonl"
    records = list(read_source(path))
    docs = [r for r in records if isinstance(r, Document)]
    skipped = [r for r in records if isinstance(r, SkippedRecord)]
    assert [(d.pmid, d.year, d.mesh, d.journal) for d in docs] == [
        ("123", 2020, ["X", "Y"], None),
        ("456", None, [], "J"),
    ]
    assert [s.message.split(":")[1] for s in skipped] == ["2", "3"]  # line numbers
    assert all(str(path) in s.message for s in skipped)


def test_jsonl_with_long_first_line_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"abstract": "word " * 5000, "pmid": "1"}) + "\n", encoding="utf-8")
    assert detect_format(path) == "jsonl"


def test_pdf_pages_and_stable_id(tmp_path: Path) -> None:
    path = tmp_path / "paper.pdf"
    write_pdf(path, ["Page one about asthma.", "Page two about gout."], title="A PDF")
    [doc] = _documents(path)
    assert doc.pages == ["Page one about asthma.", "Page two about gout."]
    assert doc.title == "A PDF"
    assert doc.pmid == pdf_document_id(path.read_bytes())
    moved = tmp_path / "renamed.pdf"
    moved.write_bytes(path.read_bytes())
    assert _documents(moved)[0].pmid == doc.pmid  # same bytes, same document


def test_expand_sources_skips_non_sources_and_reports_empty(tmp_path: Path) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("1|t|x\n", encoding="utf-8")
    (tmp_path / "corpus" / "LICENSE").write_text("MIT", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    files, errors = expand_sources(
        [tmp_path / "corpus", tmp_path / "empty", tmp_path / "missing.xml"]
    )
    assert files == [tmp_path / "corpus" / "a.txt"]
    assert [path for path, _ in errors] == [tmp_path / "empty", tmp_path / "missing.xml"]
    assert "no source files" in errors[0][1] and "no such file" in errors[1][1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty file"),
        ("notes.txt", b"just some notes\n", "unsupported format"),
        ("fake.pdf", b"this is not a pdf", "not a PDF"),
        ("other.xml", b"<?xml version='1.0'?><html></html>", "not a PubMed article set"),
        ("bad.gz", b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
        ("q.json", b'{"a": [1, 2]}', "neither JSONL"),
    ],
)
def test_detect_format_errors_name_the_file(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        detect_format(path)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_format_override_beats_detection(tmp_path: Path) -> None:
    path = tmp_path / "data.dat"
    path.write_text('{"pmid": "7", "title": "t", "abstract": "a"}\n', encoding="utf-8")
    assert [d.pmid for d in _documents(path, "jsonl")] == ["7"]


def test_truncated_gzip_keeps_whole_records_and_raises(tmp_path: Path, shared_data: Path) -> None:
    xml = (shared_data / "pubmed_xml" / "pubmed-29768149.xml").read_text(encoding="utf-8")
    head, rest = xml.split("<PubmedArticle>", 1)
    article = "<PubmedArticle>" + rest.split("</PubmedArticleSet>")[0]
    # Distinct articles (different PMIDs and text) so the compressed file is long.
    articles = [
        article.replace("29768149", str(10_000_000 + n)).replace("mild asthma", f"case {n}")
        for n in range(200)
    ]
    data = gzip.compress((head + "".join(articles) + "</PubmedArticleSet>").encode("utf-8"))
    path = tmp_path / "cut.xml.gz"
    path.write_bytes(data[: len(data) // 2])
    docs: list[Document] = []
    with pytest.raises(InputError, match="truncated or corrupt") as caught:
        for record in read_source(path):
            assert isinstance(record, Document)
            docs.append(record)
    assert str(path) in str(caught.value)
    # Records before the cut come through whole; the cut one and everything after do not.
    assert 10 < len(docs) < 200
    assert [d.pmid for d in docs] == [str(10_000_000 + n) for n in range(len(docs))]
    assert all(d.text.split("\n")[-1].startswith("CONCLUSIONS:") for d in docs)


def test_non_utf8_pubtator_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("1|t|Caf\u00e9 study\n1|a|abstract\n\n2|t|Na\u00efve\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8") as caught:
        list(read_source(path))
    assert str(path) in str(caught.value)
