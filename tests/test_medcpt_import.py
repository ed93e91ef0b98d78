"""`suwen index pubmed-medcpt`: NCBI's MedCPT embedding chunks imported into a text index.

The tests write small chunks in NCBI's layout (embeds_chunk_N.npy, pmids_chunk_N.json,
pubmed_chunk_N.json) from real abstracts and their real MiniLM vectors (taken from the session
text index), scaled to un-normalised norms like MedCPT's raw [CLS] vectors.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from benchmarks.index_bench import to_dim
from benchmarks.synthetic_vectors import EmbeddingMixture
from suwen.cli import app
from suwen.config import MEDCPT_ARTICLE, MEDCPT_QUERY, Settings
from suwen.errors import IndexMismatchError
from suwen.indexes import medcpt_import, store
from suwen.indexes.compressed import CompressedStore, ExactStore, open_store
from suwen.indexes.medcpt_import import ImportProgress, ImportReport, import_medcpt
from suwen.indexes.text_store import TEXT_DB
from tests.fixtures_text import TEXT_INDEX, bm25_chunk_ids, text_settings_for

SIZES = (41, 40, 40)
NAME = "medcpt"


@dataclass(frozen=True)
class Article:
    pmid: str
    title: str
    abstract: str
    year: int | None


@dataclass(frozen=True)
class RealCorpus:
    articles: list[Article]
    vectors: np.ndarray  # raw, un-normalised, row-aligned with articles


@pytest.fixture(scope="module")
def real_corpus(text_index_home: Path) -> RealCorpus:
    """Real abstracts and their MiniLM vectors from the session text index (first chunk of each
    article), scaled by a per-article norm between 20 and 40."""
    version, _ = store.open_version(Settings(home=text_index_home).indexes_dir, TEXT_INDEX)
    vectors = dict(_stored_vectors(ExactStore.open(version)))
    db = sqlite3.connect(version / TEXT_DB)
    rows = db.execute(
        "SELECT c.id, d.pmid, d.title, c.text, d.year FROM chunks c "
        "JOIN documents d ON d.pmid = c.pmid WHERE c.chunk_no = 0 ORDER BY c.id"
    ).fetchall()
    db.close()
    articles = [Article(pmid, title, text, year) for _, pmid, title, text, year in rows]
    matrix = np.stack([vectors[chunk_id] for chunk_id, *_ in rows])
    scale = np.random.default_rng(0).uniform(20, 40, size=(len(matrix), 1))
    assert len(articles) >= sum(SIZES)
    return RealCorpus(articles[: sum(SIZES)], (matrix * scale).astype(np.float32)[: sum(SIZES)])


def _stored_vectors(exact: ExactStore) -> list[tuple[int, np.ndarray]]:
    return [
        (int(i), vector)
        for matrix, ids in exact.iter_vectors()
        for vector, i in zip(matrix, ids, strict=True)
    ]


def write_chunks(
    folder: Path, articles: list[Article], vectors: np.ndarray, sizes: tuple[int, ...] = SIZES
) -> Path:
    """The NCBI layout: one npy, one PMID list and one metadata dict per chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for number, size in enumerate(sizes):
        part = articles[start : start + size]
        np.save(folder / f"embeds_chunk_{number}.npy", vectors[start : start + size])
        (folder / f"pmids_chunk_{number}.json").write_text(json.dumps([a.pmid for a in part]))
        records = {
            a.pmid: {"d": f"{a.year or 2000}0101", "t": a.title, "a": a.abstract, "m": "A;B"}
            for a in part
        }
        (folder / f"pubmed_chunk_{number}.json").write_text(json.dumps(records))
        start += size
    return folder


@pytest.fixture()
def chunks_dir(tmp_path: Path, real_corpus: RealCorpus) -> Path:
    return write_chunks(tmp_path / "medcpt", real_corpus.articles, real_corpus.vectors)


def settings_at(home: Path, minilm_path: Path, **values: object) -> Settings:
    return text_settings_for(home, minilm_path, **values)


def run_import(
    home: Path, source: Path, minilm_path: Path, progress: Callable[..., None] | None = None
) -> ImportReport:
    return import_medcpt(
        settings_at(home, minilm_path), source, NAME, encoder=str(minilm_path), progress=progress
    )


@dataclass(frozen=True)
class Snapshot:
    """What a finished import holds, for comparing an interrupted run with a clean one."""

    pmids: list[str]
    duplicates: list[str]
    documents: int
    chunks: int
    vectors: int
    titles: dict[str, str]
    neighbours: list[list[str]]
    bm25_holds_every_chunk_once: bool


def snapshot(home: Path, queries: np.ndarray) -> Snapshot:
    version, manifest = store.open_version(home / "indexes", NAME)
    vector_store = open_store(version)
    db = sqlite3.connect(version / TEXT_DB)
    pmid_of = dict(db.execute("SELECT id, pmid FROM chunks").fetchall())
    _, ids = vector_store.search(queries, 5)
    result = Snapshot(
        pmids=sorted(p for (p,) in db.execute("SELECT pmid FROM documents")),
        duplicates=[
            p for (p,) in db.execute("SELECT pmid FROM chunks GROUP BY pmid HAVING count(*) > 1")
        ],
        documents=db.execute("SELECT count(*) FROM documents").fetchone()[0],
        chunks=db.execute("SELECT count(*) FROM chunks").fetchone()[0],
        vectors=vector_store.count,
        titles=dict(db.execute("SELECT pmid, title FROM documents").fetchall()),
        neighbours=[[pmid_of[int(i)] for i in row if i >= 0] for row in ids],
        bm25_holds_every_chunk_once=bm25_chunk_ids(version) == sorted(pmid_of),
    )
    db.close()
    assert result.chunks == result.vectors == manifest.count
    return result


@pytest.fixture()
def reference(
    tmp_path: Path, chunks_dir: Path, minilm_path: Path, real_corpus: RealCorpus
) -> Snapshot:
    """A clean, uninterrupted import of the three chunks."""
    home = tmp_path / "reference"
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published and not report.errors
    return snapshot(home, real_corpus.vectors[::10])


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) at the n-th event of a stage."""

    def __init__(self, stage: str, nth: int) -> None:
        self.stage, self.nth, self.seen = stage, nth, 0

    def __call__(self, event: ImportProgress) -> None:
        if event.stage == self.stage:
            self.seen += 1
            if self.seen == self.nth:
                raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------


def test_import_builds_a_searchable_hybrid_text_index(
    tmp_path: Path, chunks_dir: Path, minilm_path: Path, real_corpus: RealCorpus
) -> None:
    from suwen.retrieval.text import TextSearcher

    home = tmp_path / "home"
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published and report.errors == []
    assert (report.chunks_found, report.chunks_imported) == (3, 3)
    assert report.documents == report.vectors == report.articles_added == sum(SIZES)
    assert report.index_type == "exact" and report.recall_at_10 is None
    _, manifest = store.open_version(home / "indexes", NAME)
    assert (manifest.kind, manifest.dim, manifest.count) == ("text", 384, sum(SIZES))
    assert manifest.encoder == manifest.query_encoder == str(minilm_path)
    assert not (home / "indexes" / NAME / medcpt_import.STAGING).exists()

    target = real_corpus.articles[57]
    with TextSearcher.open(settings_at(home, minilm_path), NAME) as searcher:
        dense = searcher.search(target.title, 3, method="dense")
        hybrid = searcher.search(target.title, 3)
    assert dense[0].pmid == target.pmid and dense[0].title == target.title
    assert dense[0].score <= 1.0 + 1e-5  # the raw MedCPT-style vectors were normalised
    assert hybrid[0].pmid == target.pmid and "bm25" in hybrid[0].methods
    assert dense[0].source.endswith("pubmed_chunk_1.json")


def test_medcpt_encoders_are_recorded_and_other_encoders_refused(
    tmp_path: Path, real_corpus: RealCorpus, minilm_path: Path
) -> None:
    """By default the vectors are NCBI's MedCPT ones: the index says so, its queries go through
    MedCPT-Query-Encoder, and searching it with another encoder is refused."""
    from suwen.retrieval.text import TextSearcher

    wide = to_dim(real_corpus.vectors, 768) * 30
    source = write_chunks(tmp_path / "src", real_corpus.articles, wide)
    home = tmp_path / "home"
    report = import_medcpt(Settings(home=home), source, NAME)
    assert report.published
    _, manifest = store.open_version(home / "indexes", NAME)
    assert (manifest.encoder, manifest.query_encoder, manifest.dim) == (
        MEDCPT_ARTICLE,
        MEDCPT_QUERY,
        768,
    )
    with pytest.raises(IndexMismatchError, match="MedCPT-Article-Encoder"):
        TextSearcher.open(settings_at(home, minilm_path), NAME)


def test_medcpt_chunks_of_the_wrong_dimension_are_refused(tmp_path: Path, chunks_dir: Path) -> None:
    report = import_medcpt(Settings(home=tmp_path / "home"), chunks_dir, NAME)
    assert not report.published
    assert len(report.errors) == 3
    assert "384-d vectors" in report.errors[0] and "768-d" in report.errors[0]
    assert store.current_version(tmp_path / "home" / "indexes" / NAME) is None


def test_query_encoder_of_another_dimension_is_refused(
    tmp_path: Path, real_corpus: RealCorpus, minilm_path: Path
) -> None:
    from suwen.retrieval.text import TextSearcher

    narrow = to_dim(real_corpus.vectors, 64)
    home = tmp_path / "home"
    run_import(home, write_chunks(tmp_path / "src", real_corpus.articles, narrow), minilm_path)
    with pytest.raises(IndexMismatchError, match="64-d"):
        TextSearcher.open(settings_at(home, minilm_path), NAME)


def test_import_into_an_index_of_another_encoder_is_refused(
    tmp_path: Path, text_home_copy: Path, chunks_dir: Path
) -> None:
    with pytest.raises(IndexMismatchError, match="cannot be mixed"):
        import_medcpt(Settings(home=text_home_copy), chunks_dir, TEXT_INDEX, encoder="other/model")


@pytest.mark.parametrize(
    ("stage", "nth"),
    [
        ("scan", 2),  # while checking the files
        ("chunk", 1),  # before the first chunk's metadata
        ("chunk", 2),  # after chunk 0's rows were written, before its vectors are saved
        ("chunk", 4),  # in the middle of chunk 1
        ("publish", 1),  # all chunks committed, before the manifest
        ("publish", 2),  # right before the staging directory is renamed into place
    ],
)
def test_interrupted_import_resumes_without_loss_or_duplicates(
    tmp_path: Path,
    chunks_dir: Path,
    minilm_path: Path,
    real_corpus: RealCorpus,
    reference: Snapshot,
    stage: str,
    nth: int,
) -> None:
    home = tmp_path / "home"
    with pytest.raises(KeyboardInterrupt):
        run_import(home, chunks_dir, minilm_path, progress=Interrupt(stage, nth))
    assert store.current_version(home / "indexes" / NAME) is None  # nothing half-published
    assert (home / "indexes" / NAME / medcpt_import.STAGING).is_dir()  # the work survives
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published and not report.errors
    assert snapshot(home, real_corpus.vectors[::10]) == reference


def test_kill_between_saving_vectors_and_committing_rows_is_undone(
    tmp_path: Path,
    chunks_dir: Path,
    minilm_path: Path,
    real_corpus: RealCorpus,
    reference: Snapshot,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The narrowest window: chunk 1's vectors are saved in the store, its rows not committed.
    The restart must drop those vectors and import the chunk again, once."""
    commit = medcpt_import._ChunkWriter._commit
    calls = {"n": 0}

    def dying_commit(self: medcpt_import._ChunkWriter, ids: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        commit(self, ids)

    monkeypatch.setattr(medcpt_import._ChunkWriter, "_commit", dying_commit)
    home = tmp_path / "home"
    with pytest.raises(KeyboardInterrupt):
        run_import(home, chunks_dir, minilm_path)
    staging = home / "indexes" / NAME / medcpt_import.STAGING
    assert ExactStore.open(staging).count == SIZES[0] + SIZES[1]  # saved, but not committed
    monkeypatch.setattr(medcpt_import._ChunkWriter, "_commit", commit)
    report = run_import(home, chunks_dir, minilm_path)
    assert (report.chunks_already_done, report.chunks_imported) == (1, 2)
    assert snapshot(home, real_corpus.vectors[::10]) == reference


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from suwen.config import Settings
from suwen.indexes.medcpt_import import import_medcpt

home, source, encoder, at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
seen = 0

def progress(event):
    global seen
    seen += 1
    if seen == at:
        os.kill(os.getpid(), signal.SIGKILL)

import_medcpt(Settings(home=home, text_encoder=encoder, device="cpu"), source, "medcpt",
              encoder=encoder, progress=progress)
"""


@pytest.mark.slow
@pytest.mark.parametrize("at_event", [3, 5, 7, 9])
def test_sigkill_at_any_point_resumes_without_loss_or_duplicates(
    tmp_path: Path,
    chunks_dir: Path,
    minilm_path: Path,
    real_corpus: RealCorpus,
    reference: Snapshot,
    at_event: int,
) -> None:
    home = tmp_path / "home"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(home), str(chunks_dir), str(minilm_path),
         str(at_event)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published and not report.errors
    assert snapshot(home, real_corpus.vectors[::10]) == reference


BM25_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from suwen.config import Settings
from suwen.indexes import bm25
from suwen.indexes.medcpt_import import import_medcpt

home, source, encoder = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
add = bm25.Bm25Writer.add
added = 0

def dying_add(self, chunk_id, title, text):
    global added
    added += 1
    if added == 50:
        os.kill(os.getpid(), signal.SIGKILL)
    add(self, chunk_id, title, text)

bm25.Bm25Writer.add = dying_add
import_medcpt(Settings(home=home, text_encoder=encoder, device="cpu"), source, "medcpt",
              encoder=encoder)
"""


@pytest.mark.slow
def test_sigkill_while_building_the_bm25_index_resumes_to_a_complete_one(
    tmp_path: Path, chunks_dir: Path, minilm_path: Path, real_corpus: RealCorpus,
    reference: Snapshot,
) -> None:  # fmt: skip
    home = tmp_path / "home"
    killed = subprocess.run(
        [sys.executable, "-c", BM25_KILL_SCRIPT, str(home), str(chunks_dir), str(minilm_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert store.current_version(home / "indexes" / NAME) is None  # nothing half-built is live
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published and report.chunks_already_done == len(SIZES)
    assert snapshot(home, real_corpus.vectors[::10]) == reference


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _not_json(path: Path) -> None:
    path.write_text("[1, 2, oops", encoding="utf-8")


def _one_pmid_short(path: Path) -> None:
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8"))[:-1]))


def _nan_vectors(path: Path) -> None:
    array = np.load(path)
    array[len(array) // 2] = np.nan
    np.save(path, array)


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("filename", "damage", "message"),
    [
        ("embeds_chunk_1.npy", _truncate, "not a readable .npy"),
        ("pmids_chunk_1.json", _not_json, "not a readable JSON list"),
        ("pmids_chunk_1.json", _one_pmid_short, "39 PMIDs for 40 vectors"),
        ("pubmed_chunk_1.json", _truncate, "corrupt or truncated metadata"),
        ("embeds_chunk_1.npy", _nan_vectors, "non-finite"),
        ("pubmed_chunk_1.json", _remove, "missing pubmed_chunk_1.json"),
    ],
)
def test_corrupt_chunk_is_reported_and_skipped_then_imported_once_fixed(
    tmp_path: Path,
    chunks_dir: Path,
    minilm_path: Path,
    real_corpus: RealCorpus,
    reference: Snapshot,
    filename: str,
    damage: Callable[[Path], None],
    message: str,
) -> None:
    good = (chunks_dir / filename).read_bytes()
    damage(chunks_dir / filename)
    home = tmp_path / "home"
    report = run_import(home, chunks_dir, minilm_path)
    assert report.published
    assert len(report.errors) == 1
    assert report.errors[0].startswith("chunk 1:") and message in report.errors[0]
    assert report.errors[0].endswith("skipped")
    partial = snapshot(home, real_corpus.vectors[::10])
    chunk_1 = {a.pmid for a in real_corpus.articles[SIZES[0] : SIZES[0] + SIZES[1]]}
    assert partial.documents == SIZES[0] + SIZES[2] and not chunk_1 & set(partial.pmids)

    (chunks_dir / filename).write_bytes(good)
    again = run_import(home, chunks_dir, minilm_path)
    assert (again.chunks_already_done, again.chunks_imported, again.errors) == (2, 1, [])
    assert snapshot(home, real_corpus.vectors[::10]) == reference


def test_a_pmid_in_a_later_chunk_replaces_the_earlier_record(
    tmp_path: Path, minilm_path: Path, real_corpus: RealCorpus
) -> None:
    articles = list(real_corpus.articles)
    vectors = real_corpus.vectors.copy()
    first = articles[0]
    articles[-1] = Article(first.pmid, "Updated title", first.abstract, 2024)
    vectors[-1] = vectors[0] * 2
    home = tmp_path / "home"
    report = run_import(home, write_chunks(tmp_path / "src", articles, vectors), minilm_path)
    assert report.articles_replaced == 1
    result = snapshot(home, vectors[:1])
    assert result.documents == sum(SIZES) - 1 and result.duplicates == []
    assert result.titles[first.pmid] == "Updated title"
    assert result.neighbours[0].count(first.pmid) == 1


def test_new_chunks_are_added_to_a_published_import(
    tmp_path: Path,
    chunks_dir: Path,
    minilm_path: Path,
    real_corpus: RealCorpus,
    reference: Snapshot,
) -> None:
    later = tmp_path / "later"
    later.mkdir()
    for name in ("embeds_chunk_2.npy", "pmids_chunk_2.json", "pubmed_chunk_2.json"):
        (chunks_dir / name).rename(later / name)
    home = tmp_path / "home"
    first = run_import(home, chunks_dir, minilm_path)
    assert first.published and first.documents == SIZES[0] + SIZES[1]
    for path in later.iterdir():
        path.rename(chunks_dir / path.name)
    second = run_import(home, chunks_dir, minilm_path)
    assert (second.chunks_already_done, second.chunks_imported) == (2, 1)
    assert snapshot(home, real_corpus.vectors[::10]) == reference


# ---------------------------------------------------------------------------------------------
# Compressed


@pytest.fixture(scope="module")
def synthetic_chunks(
    tmp_path_factory: pytest.TempPathFactory, real_corpus: RealCorpus
) -> tuple[Path, np.ndarray]:
    """3 x 1,000 vectors from a mixture fitted to the real vectors: enough to train on."""
    normalised = real_corpus.vectors / np.linalg.norm(real_corpus.vectors, axis=1, keepdims=True)
    mixture = EmbeddingMixture.fit(normalised, subspace=48, clusters=12)
    vectors = mixture.sample(3_000, seed=4) * 25
    articles = [
        Article(str(30_000_000 + i), f"Synthetic article {i}", f"Abstract number {i}.", 2020)
        for i in range(len(vectors))
    ]
    folder = write_chunks(
        tmp_path_factory.mktemp("synthetic"), articles, vectors, (1_000, 1_000, 1_000)
    )
    return folder, vectors


def test_compressed_import_measures_recall_and_resumes(
    tmp_path: Path, minilm_path: Path, synthetic_chunks: tuple[Path, np.ndarray]
) -> None:
    source, vectors = synthetic_chunks

    def run(home: Path, progress: Callable[..., None] | None = None) -> ImportReport:
        settings = settings_at(home, minilm_path, index_type="compressed")
        return import_medcpt(settings, source, NAME, encoder=str(minilm_path), progress=progress)

    clean = run(tmp_path / "clean")
    assert clean.published and clean.index_type == "compressed"
    assert clean.recall_at_10 is not None and clean.recall_at_10 >= 0.9
    version, manifest = store.open_version(tmp_path / "clean" / "indexes", NAME)
    assert manifest.index_type == "compressed" and manifest.recall_at_10 == clean.recall_at_10
    assert manifest.bytes_per_vector is not None and manifest.bytes_per_vector < 4 * 384
    assert manifest.extra["nprobe"] >= 1 and manifest.extra["pq"].endswith("PQ128x4fsr")
    assert manifest.extra["code_bytes_per_vector"] == 64
    assert isinstance(open_store(version), CompressedStore)

    home = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(home, progress=Interrupt("chunk", 4))  # trained, chunk 0 done, inside chunk 1
    staging = home / "indexes" / NAME / medcpt_import.STAGING
    assert CompressedStore.open(staging).trained
    resumed = run(home)
    assert resumed.chunks_already_done == 1 and resumed.published
    assert snapshot(home, vectors[::100]) == snapshot(tmp_path / "clean", vectors[::100])


def test_cli_imports_and_index_info_shows_it(
    tmp_path: Path, chunks_dir: Path, minilm_path: Path
) -> None:
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["--home", str(home), "index", "pubmed-medcpt", str(chunks_dir), "--name", NAME,
         "--encoder", str(minilm_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "articles in the index" in result.stdout and str(sum(SIZES)) in result.stdout
    info = runner.invoke(app, ["--home", str(home), "index", "info", NAME, "--json"])
    described = json.loads(info.stdout)
    assert described["index_type"] == "exact" and described["count"] == sum(SIZES)

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = runner.invoke(app, ["--home", str(home), "index", "pubmed-medcpt", str(empty)])
    assert failed.exit_code != 0
    assert "no embeds_chunk_N.npy" in failed.stderr


def test_compressed_import_is_searched_through_the_text_searcher(
    tmp_path: Path, minilm_path: Path, synthetic_chunks: tuple[Path, np.ndarray]
) -> None:
    from suwen.retrieval.text import TextSearcher

    source, _ = synthetic_chunks
    home = tmp_path / "home"
    settings = settings_at(home, minilm_path, index_type="compressed")
    import_medcpt(settings, source, NAME, encoder=str(minilm_path))
    with TextSearcher.open(settings, NAME) as searcher:
        assert isinstance(searcher._index, CompressedStore)
        bm25 = searcher.search("Synthetic article 1234", 1, method="bm25")
        dense = searcher.search("cardiac arrhythmia after surgery", 5, method="dense")
        hybrid = searcher.search("Synthetic article 1234", 5)
    assert bm25[0].pmid == str(30_000_000 + 1234)
    assert len(dense) == 5 and all(h.pmid and h.title for h in dense)
    assert len({h.pmid for h in hybrid}) == 5


@pytest.mark.slow
@pytest.mark.parametrize("first_type", ["compressed", "exact"])
def test_text_ingest_adds_to_an_imported_index_and_compresses_past_the_threshold(
    tmp_path: Path,
    minilm_path: Path,
    synthetic_chunks: tuple[Path, np.ndarray],
    text_corpus: Path,
    pubmedqa_subset: dict[str, dict[str, object]],
    first_type: str,
) -> None:
    """`suwen index text` into an imported index: a compressed one takes the new vectors; an
    exact one past compressed_threshold is compressed at publish, with recall measured. Either
    way its codes take the bytes per vector the setting compressed_code_bytes gives (16 here,
    a quarter of the default), and recall is still measured and kept."""
    from suwen.indexes.text_index import build_text_index
    from suwen.retrieval.text import TextSearcher

    source, _ = synthetic_chunks
    home = tmp_path / "home"
    small = {"compressed_code_bytes": 16}
    import_medcpt(
        settings_at(home, minilm_path, index_type=first_type, **small),
        source,
        NAME,
        encoder=str(minilm_path),
    )
    settings = settings_at(
        home, minilm_path, index_type="auto", compressed_threshold=2_000, **small
    )
    report = build_text_index(settings, NAME, [text_corpus])
    assert not report.errors and report.chunks > 3_000
    version, manifest = store.open_version(home / "indexes", NAME)
    assert manifest.index_type == "compressed" and manifest.count == report.chunks
    assert manifest.recall_at_10 is not None and manifest.recall_at_10 >= 0.9
    assert not (version / "vectors.faiss").exists()
    vectors = CompressedStore.open(version)
    assert faiss.downcast_index(vectors.index).code_size == 16
    assert vectors.params.pq_m == 32 and manifest.extra["code_bytes_per_vector"] == 16
    pmid, record = next(iter(pubmedqa_subset.items()))
    with TextSearcher.open(settings, NAME) as searcher:
        assert searcher.search(str(record["QUESTION"]), 3, method="dense")[0].pmid == pmid


def test_rerunning_a_finished_import_changes_nothing_and_a_refreshed_chunk_is_reimported(
    tmp_path: Path, chunks_dir: Path, minilm_path: Path, real_corpus: RealCorpus
) -> None:
    home = tmp_path / "home"
    run_import(home, chunks_dir, minilm_path)
    version, _ = store.open_version(home / "indexes", NAME)
    again = run_import(home, chunks_dir, minilm_path)
    assert again.up_to_date and not again.published and again.chunks_already_done == 3
    assert store.open_version(home / "indexes", NAME)[0] == version  # nothing republished

    # NCBI refreshes a chunk: same PMIDs, new content. It is imported again, replacing them.
    refreshed = chunks_dir / "pubmed_chunk_2.json"
    records = json.loads(refreshed.read_text(encoding="utf-8"))
    for record in records.values():
        record["t"] = f"Revised {record['t']}"
    refreshed.write_text(json.dumps(records), encoding="utf-8")
    third = run_import(home, chunks_dir, minilm_path)
    assert (third.chunks_already_done, third.chunks_imported) == (2, 1)
    assert third.articles_replaced == SIZES[2] and third.articles_added == 0
    result = snapshot(home, real_corpus.vectors[::10])
    assert result.documents == sum(SIZES) and result.duplicates == []
    revised = [p for p, title in result.titles.items() if title.startswith("Revised")]
    assert len(revised) == SIZES[2]
