"""Chunking: whole abstracts when they fit, sentence-bounded overlapping pieces when not."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from suwen.indexes.chunking import approx_tokens, chunk_document
from suwen.sentences import split_sentences
from suwen.types import Document


def test_sentences_respect_abbreviations_and_sections() -> None:
    text = (
        "We gave drugs, e.g. Aspirin. It worked (Fig. 2). Smith et al. Found more.\n"
        "RESULTS: 12 died."
    )
    assert split_sentences(text) == [
        "We gave drugs, e.g. Aspirin.",
        "It worked (Fig. 2).",
        "Smith et al. Found more.",
        "RESULTS: 12 died.",
    ]


def test_abstract_that_fits_stays_whole() -> None:
    doc = Document(pmid="1", title="Short", text="One sentence. Another sentence.")
    [chunk] = chunk_document(doc, approx_tokens, max_tokens=256)
    assert chunk.id == "1#0"
    assert chunk.text == doc.text
    assert chunk.page is None


def test_long_text_is_split_with_overlap_within_budget() -> None:
    sentences = [f"Sentence {i} talks about finding number {i} in detail." for i in range(80)]
    doc = Document(pmid="9", title="A title of some words", text=" ".join(sentences))
    chunks = chunk_document(doc, approx_tokens, max_tokens=80, overlap_tokens=20)
    assert len(chunks) > 5
    assert [c.id for c in chunks] == [f"9#{n}" for n in range(len(chunks))]
    title_cost = approx_tokens(doc.title)
    for chunk in chunks:
        assert approx_tokens(chunk.text) + title_cost <= 80
        assert chunk.text.endswith(".")  # cut on sentence boundaries
    # Every sentence is in some chunk, in order, and consecutive chunks share a sentence.
    joined = " ".join(c.text for c in chunks)
    assert all(s in joined for s in sentences)
    for before, after in itertools.pairwise(chunks):
        assert before.text.split(". ")[-1] in after.text


def test_real_abstracts_fit_the_encoder(shared_data: Path, minilm_path: Path) -> None:
    """With MiniLM's tokenizer (256 tokens), every chunk of real abstracts fits the encoder."""
    from suwen.indexes.text_encoder import load_text_encoder

    encoder = load_text_encoder(str(minilm_path), device="cpu")
    data = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    docs = [
        Document(pmid=pmid, title="", text="\n".join(record["CONTEXTS"]))
        for pmid, record in sorted(data.items())[:25]
    ]
    whole = 0
    for doc in docs:
        chunks = chunk_document(doc, encoder.count_tokens, encoder.max_tokens)
        whole += len(chunks) == 1
        assert all(encoder.count_tokens(c.text) <= encoder.max_tokens for c in chunks)
        words = doc.text.split()
        assert words[0] in chunks[0].text and words[-1] in chunks[-1].text
    assert 0 < whole < len(docs)  # some fit whole, some needed splitting


def test_pdf_chunks_name_their_page() -> None:
    doc = Document(
        pmid="pdf-1",
        title="Report",
        text="",
        pages=["First page text.", "", " ".join(f"Third page sentence {i}." for i in range(60))],
    )
    chunks = chunk_document(doc, approx_tokens, max_tokens=64)
    assert chunks[0].page == 1 and chunks[0].text == "First page text."
    assert {c.page for c in chunks[1:]} == {3}  # the empty page gives no chunk
    assert len(chunks) > 2


def test_title_only_record_gets_one_chunk() -> None:
    [chunk] = chunk_document(Document(pmid="5", title="Only a title"), approx_tokens, 256)
    assert chunk.text == ""
