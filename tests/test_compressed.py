"""The compressed vector store (IVF + 4-bit PQ shortlist, exact re-scoring from on-disk
vectors) against exact search, on synthetic vectors fitted to real MiniLM embeddings of real
PubMed abstracts; and the exact store behind the same interface."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from benchmarks.synthetic_vectors import EmbeddingMixture
from suwen.config import Settings
from suwen.errors import IndexMismatchError, InputError
from suwen.indexes import compressed, store, vectors
from suwen.indexes.compressed import (
    AppendableArray,
    CompressedParams,
    CompressedStore,
    ExactStore,
    choose_index_type,
    open_store,
)
from tests.fixtures_text import TEXT_INDEX

CORPUS = 20_000
QUERIES = 200


@pytest.fixture(scope="module")
def real_embeddings(text_index_home: Path) -> np.ndarray:
    """MiniLM vectors of the real abstracts in the session text index."""
    version, _ = store.open_version(Settings(home=text_index_home).indexes_dir, TEXT_INDEX)
    exact = ExactStore.open(version)
    return np.concatenate([matrix for matrix, _ in exact.iter_vectors()])


@pytest.fixture(scope="module")
def mixture(real_embeddings: np.ndarray) -> EmbeddingMixture:
    return EmbeddingMixture.fit(real_embeddings, subspace=48, clusters=12)


@pytest.fixture(scope="module")
def corpus(mixture: EmbeddingMixture) -> tuple[np.ndarray, np.ndarray]:
    """Indexed vectors and fresh queries (never indexed) from the fitted mixture."""
    return mixture.sample(CORPUS, seed=1), mixture.sample(QUERIES, seed=2)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, corpus: tuple[np.ndarray, np.ndarray]
) -> tuple[Path, compressed.RecallReport]:
    """A compressed store over the corpus (ids = 10 * row + 3), calibrated and saved."""
    vectors, _ = corpus
    directory = tmp_path_factory.mktemp("compressed")
    vector_store = CompressedStore.create(
        directory, CompressedParams.for_corpus(vectors.shape[1], len(vectors))
    )
    vector_store.train(vectors[compressed.training_rows(len(vectors), 50_000)])
    ids = np.arange(len(vectors), dtype=np.int64) * 10 + 3
    for start in range(0, len(vectors), 6_000):
        vector_store.add(vectors[start : start + 6_000], ids[start : start + 6_000])
    report = compressed.calibrate_and_measure(vector_store)
    vector_store.save()
    return directory, report


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    return flat.search(queries, 10)[1]


def writable_copy(directory: Path, tmp_path: Path) -> CompressedStore:
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return CompressedStore.open(target, writable=True)


def test_mixture_keeps_the_structure_of_real_embeddings(
    real_embeddings: np.ndarray, mixture: EmbeddingMixture
) -> None:
    """Synthetic vectors are as correlated as real ones, unlike isotropic noise."""

    def mean_cosine(matrix: np.ndarray) -> float:
        gram = matrix @ matrix.T
        return float((gram.sum() - np.trace(gram)) / (len(matrix) * (len(matrix) - 1)))

    sample = mixture.sample(len(real_embeddings), seed=5)
    noise = np.random.default_rng(5).standard_normal(sample.shape).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    real = mean_cosine(real_embeddings)
    assert real > 0.05
    assert abs(mean_cosine(sample) - real) < 0.05
    assert abs(mean_cosine(noise)) < 0.02
    assert np.allclose(np.linalg.norm(sample, axis=1), 1.0, atol=1e-4)
    assert mixture.describe()["subspace"] == 48


def test_compressed_recall_at_10_against_exact_search(
    corpus: tuple[np.ndarray, np.ndarray], built: tuple[Path, compressed.RecallReport]
) -> None:
    vectors, queries = corpus
    directory, report = built
    vector_store = CompressedStore.open(directory)
    truth = exact_top10(vectors, queries)
    _, ids = vector_store.search(queries, 10)
    rows = (ids - 3) // 10
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth, strict=True)])
    assert recall >= 0.95
    # The recall measured at build time on question-like queries says the same.
    assert report.recall_at_10 >= 0.95
    assert report.nprobe == vector_store.params.nprobe
    assert report.calibration[f"{report.shortlist}/{report.nprobe}"] >= compressed.TARGET_RECALL
    assert report.shortlist == vector_store.params.shortlist


def test_question_like_queries_sit_at_a_question_s_distance_from_their_document(
    corpus: tuple[np.ndarray, np.ndarray],
) -> None:
    documents = corpus[0][:300]
    asked = compressed.question_like(documents, np.random.default_rng(3))
    cosines = np.sum(asked * documents, axis=1)
    assert np.allclose(cosines, compressed.QUESTION_COSINE, atol=1e-4)
    assert np.allclose(np.linalg.norm(asked, axis=1), 1.0, atol=1e-5)
    # Not a copy of anything stored: the nearest other document is further than the own one.
    others = asked @ corpus[0][300:].T
    assert float(np.mean(others.max(axis=1) < cosines)) > 0.5


def test_recall_is_calibrated_on_question_like_queries_and_reported_beside_documents(
    corpus: tuple[np.ndarray, np.ndarray], built: tuple[Path, compressed.RecallReport]
) -> None:
    """The figure reported is question-like queries' recall, measured on queries the
    calibration never saw; the held-out documents' figure is reported beside it."""
    vectors, _ = corpus
    directory, report = built
    vector_store = CompressedStore.open(directory)
    asked = compressed.question_like(vectors[::97][:200], np.random.default_rng(11))
    truth = exact_top10(vectors, asked)
    rows = (vector_store.search(asked, 10)[1] - 3) // 10
    recall = np.mean([len(set(r) & set(t)) / 10 for r, t in zip(rows, truth, strict=True)])
    assert recall >= 0.95 and report.recall_at_10 >= 0.95
    assert abs(recall - report.recall_at_10) < 0.03
    assert 0.9 <= report.document_recall_at_10 <= 1.0
    assert vector_store.params.document_recall_at_10 == report.document_recall_at_10
    extra = report.manifest_extra()
    assert extra["document_recall_at_10"] == round(report.document_recall_at_10, 4)
    assert "question-like" in extra["recall_query_kind"]


def test_compressed_store_holds_a_fraction_of_the_exact_ram(
    built: tuple[Path, compressed.RecallReport],
) -> None:
    directory, _ = built
    vector_store = CompressedStore.open(directory)
    ivf = faiss.downcast_index(vector_store.index)
    assert isinstance(ivf, faiss.IndexIVFPQFastScan)
    assert ivf.code_size == compressed.CODE_BYTES
    exact_bytes = ExactStore.create(directory / "unused", 384).bytes_per_vector()
    # Codes + ids + this small corpus's share of the centroids and list padding.
    assert vector_store.bytes_per_vector() < exact_bytes / 10
    assert vector_store.bytes_per_vector() == pytest.approx(
        (directory / compressed.COMPRESSED_FILE).stat().st_size / CORPUS
    )


def test_saved_store_reloads_from_plain_files(
    corpus: tuple[np.ndarray, np.ndarray], built: tuple[Path, compressed.RecallReport]
) -> None:
    vectors, queries = corpus
    directory, _ = built
    reopened = open_store(directory)
    assert isinstance(reopened, CompressedStore) and reopened.count == CORPUS
    full = np.load(directory / compressed.FULL_VECTORS_FILE, mmap_mode="r", allow_pickle=False)
    assert full.shape == (CORPUS, 384) and full.dtype == np.float16
    assert np.allclose(full[:50], vectors[:50], atol=2e-3)
    row_ids = np.load(directory / compressed.ROW_IDS_FILE, allow_pickle=False)
    assert row_ids[:3].tolist() == [3, 13, 23]
    params = json.loads((directory / compressed.PARAMS_FILE).read_text(encoding="utf-8"))
    assert params["count"] == CORPUS and params["nprobe"] == reopened.params.nprobe
    scores, ids = reopened.search(vectors[:5], 3)
    assert ids[:, 0].tolist() == [3, 13, 23, 33, 43]  # each vector finds itself first
    assert np.allclose(scores[:, 0], 1.0, atol=2e-3)  # re-scored exactly (float16 on disk)
    with pytest.raises(Exception, match="read-only"):
        reopened.add(queries[:1], np.asarray([1], dtype=np.int64))


def test_removed_ids_are_never_returned(
    corpus: tuple[np.ndarray, np.ndarray],
    built: tuple[Path, compressed.RecallReport],
    tmp_path: Path,
) -> None:
    vectors, _ = corpus
    vector_store = writable_copy(built[0], tmp_path)
    gone = np.asarray([3, 13, 23], dtype=np.int64)
    assert vector_store.remove(gone) == 3
    assert vector_store.remove(gone) == 0
    _, ids = vector_store.search(vectors[:3], 10)
    assert not set(ids.ravel()) & set(gone.tolist())
    vector_store.save()
    again = CompressedStore.open(vector_store.directory)
    assert again.count == CORPUS - 3
    assert not set(again.search(vectors[:3], 10)[1].ravel()) & set(gone.tolist())
    assert not again.live_rows()[:3].any() and again.live_rows()[3:].all()


def test_rows_added_after_the_last_save_are_dropped_on_reopen(
    corpus: tuple[np.ndarray, np.ndarray],
    built: tuple[Path, compressed.RecallReport],
    tmp_path: Path,
) -> None:
    """A crash after vectors were appended but before save: the saved state comes back."""
    vectors, queries = corpus
    vector_store = writable_copy(built[0], tmp_path)
    vector_store.add(queries[:7], np.arange(10**6, 10**6 + 7, dtype=np.int64))
    appended = np.load(vector_store.directory / compressed.FULL_VECTORS_FILE, mmap_mode="r")
    assert appended.shape[0] == CORPUS + 7  # on disk, but never saved into the index
    reopened = CompressedStore.open(vector_store.directory, writable=True)
    assert reopened.rows == CORPUS and reopened.count == CORPUS
    on_disk = np.load(reopened.directory / compressed.FULL_VECTORS_FILE, mmap_mode="r")
    assert on_disk.shape[0] == CORPUS
    assert reopened.search(vectors[:1], 1)[1][0, 0] == 3


def test_discard_ids_above_rolls_back_newest_rows(
    corpus: tuple[np.ndarray, np.ndarray],
    built: tuple[Path, compressed.RecallReport],
    tmp_path: Path,
) -> None:
    """Rows whose metadata never committed (ids above the last committed one) are dropped,
    even after they were saved."""
    _, queries = corpus
    vector_store = writable_copy(built[0], tmp_path)
    last = int(vector_store.row_ids()[-1])
    vector_store.add(queries[:5], np.arange(last + 1, last + 6, dtype=np.int64))
    vector_store.save()
    assert vector_store.count == CORPUS + 5
    assert vector_store.discard_ids_above(last) == 5
    vector_store.save()
    reopened = CompressedStore.open(vector_store.directory)
    assert reopened.count == CORPUS and reopened.rows == CORPUS
    assert reopened.search(queries[:1], 1)[1][0, 0] <= last


def test_appendable_array_is_a_valid_npy_after_every_change(tmp_path: Path) -> None:
    path = tmp_path / "grow.npy"
    array = AppendableArray(path, "float16", 4)
    array.append(np.ones((3, 4)))
    assert np.load(path, allow_pickle=False).shape == (3, 4)
    array.append(np.full((1000, 4), 2.0))
    loaded = np.load(path, mmap_mode="r", allow_pickle=False)
    assert loaded.shape == (1003, 4) and loaded[-1, 0] == 2.0
    array.truncate(2)
    assert np.load(path, allow_pickle=False).tolist() == [[1.0] * 4] * 2
    ids = AppendableArray(tmp_path / "ids.npy", "int64", None)
    ids.append(np.arange(5))
    assert np.load(tmp_path / "ids.npy").tolist() == [0, 1, 2, 3, 4]


def test_read_rows_returns_the_stored_rows_without_mapping_the_file(tmp_path: Path) -> None:
    vectors = AppendableArray(tmp_path / "v.npy", "float16", 6)
    stored = np.random.default_rng(0).standard_normal((500, 6)).astype(np.float16)
    vectors.append(stored[:200])
    vectors.append(stored[200:])
    rows = np.asarray([0, 1, 2, 7, 199, 200, 201, 350, 499], dtype=np.int64)  # runs and gaps
    assert np.array_equal(vectors.read_rows(rows), stored[rows])
    assert vectors.read_rows(np.asarray([], dtype=np.int64)).shape == (0, 6)
    ids = AppendableArray(tmp_path / "ids.npy", "int64", None)
    ids.append(np.arange(100) * 7)
    assert ids.read_rows(np.asarray([3, 4, 90], dtype=np.int64)).tolist() == [21, 28, 630]
    assert _mapped(tmp_path) == []


def test_rows_the_page_cache_lacks_are_read_from_disk_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of rows not cached (the non-blocking read refuses it) is announced to the kernel
    and read with a blocking read; without the non-blocking flag every run is read that way."""
    vectors = AppendableArray(tmp_path / "v.npy", "float16", 6)
    stored = np.random.default_rng(1).standard_normal((300, 6)).astype(np.float16)
    vectors.append(stored)
    rows = np.asarray([0, 1, 5, 9, 10, 11, 120, 299], dtype=np.int64)  # five runs
    real_preadv, refused, advised = os.preadv, [], []

    def preadv(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if flags and len(refused) % 2 == 0:  # every other non-blocking read: not cached
            refused.append(offset)
            raise BlockingIOError(11, "Resource temporarily unavailable")
        if flags:
            refused.append(-1)
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, at, size, advice: advised.append(at))
    assert np.array_equal(vectors.read_rows(rows), stored[rows])
    missed = [at for at in refused if at >= 0]
    assert len(missed) == 3 and advised == missed
    monkeypatch.delattr(os, "RWF_NOWAIT")
    refused.clear()
    advised.clear()
    assert np.array_equal(vectors.read_rows(rows), stored[rows])
    assert refused == [] and len(advised) == 5


def test_float16_rows_are_scored_as_numpy_widens_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-scoring widens float16 rows with ONNX Runtime; the scores are numpy's, zeros,
    subnormals and the largest halves included, and numpy is used when the runtime is not."""
    rng = np.random.default_rng(3)
    rows = (rng.standard_normal((800, 768)) * 0.036).astype(np.float16)
    rows[0, :8] = [0, -0.0, 6e-8, -6e-8, 3e-5, 65504, -65504, 1]
    query = compressed.normalise(rng.standard_normal(768))[0]
    expected = rows.astype(np.float32) @ query
    assert vectors.inner_products(rows, query) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert vectors.inner_products(rows[:1], query) == pytest.approx(expected[:1], rel=1e-5)
    assert vectors.inner_products(rows[:0], query).shape == (0,)
    wide = rows.astype(np.float32)
    assert np.array_equal(vectors.inner_products(wide, query), wide @ query)

    def no_runtime() -> None:
        raise ImportError("onnxruntime")

    vectors._half_products.cache_clear()
    monkeypatch.setattr(vectors, "_build_half_products", no_runtime)
    try:
        assert np.array_equal(vectors.inner_products(rows, query), expected)
    finally:
        vectors._half_products.cache_clear()


def test_a_searcher_re_scores_exactly_without_mapping_the_vector_files(
    corpus: tuple[np.ndarray, np.ndarray], built: tuple[Path, compressed.RecallReport]
) -> None:
    """A search process's resident memory does not grow with the rows its searches touch:
    re-scoring reads them, it does not map them; the order is still the exact one."""
    directory, _ = built
    queries = compressed.normalise(corpus[1][:20])
    reopened = CompressedStore.open(directory)
    mapped_before = _mapped(directory)
    scores, ids = reopened.search(queries, 10)
    assert _mapped(directory) == mapped_before
    full = np.load(directory / compressed.FULL_VECTORS_FILE, allow_pickle=False)
    row_ids = np.load(directory / compressed.ROW_IDS_FILE, allow_pickle=False)
    _, shortlist = reopened.index.search(queries, reopened.params.shortlist)
    for qi, query in enumerate(queries):
        exact = full[shortlist[qi]].astype(np.float32) @ query
        best = np.argsort(-exact, kind="stable")[:10]
        assert ids[qi].tolist() == row_ids[shortlist[qi][best]].tolist()
        assert np.allclose(scores[qi], exact[best], atol=1e-5)


def _mapped(directory: Path) -> list[str]:
    """This process's memory mappings of files in ``directory`` (Linux; empty elsewhere)."""
    maps = Path("/proc/self/maps")
    text = maps.read_text(encoding="utf-8") if maps.is_file() else ""
    return sorted(line.split()[-1] for line in text.splitlines() if str(directory) in line)


def test_index_type_is_chosen_by_corpus_size_unless_set() -> None:
    assert choose_index_type("auto", 1_000, 200_000) == "exact"
    assert choose_index_type("auto", 200_001, 200_000) == "compressed"
    assert choose_index_type("exact", 10**8, 200_000) == "exact"
    assert choose_index_type("compressed", 50_000, 200_000) == "compressed"
    with pytest.raises(InputError, match="at least"):
        choose_index_type("compressed", 10, 200_000)


def test_parameters_follow_corpus_size_and_dimension() -> None:
    small = CompressedParams.for_corpus(384, 20_000)
    pubmed = CompressedParams.for_corpus(768, 24_000_000)
    assert small.factory == f"IVF{small.nlist},PQ128x4fsr"
    assert pubmed.pq_m == 128 and pubmed.dim % pubmed.pq_m == 0
    # The training sample bounds nlist: at least MIN_POINTS_PER_LIST vectors per centroid.
    assert pubmed.nlist * compressed.MIN_POINTS_PER_LIST <= compressed.MAX_TRAINING_VECTORS
    assert small.nlist < pubmed.nlist
    # Setting compressed_code_bytes: the largest even split of the dimension within the budget.
    assert CompressedParams.for_corpus(768, 24_000_000, 48).pq_m == 96
    assert CompressedParams.for_corpus(384, 20_000, 20).pq_m == 32


def test_exact_store_converts_to_compressed(mixture: EmbeddingMixture, tmp_path: Path) -> None:
    vectors = mixture.sample(6_000, seed=11)
    exact = ExactStore.create(tmp_path / "exact", vectors.shape[1])
    ids = np.arange(100, 100 + len(vectors), dtype=np.int64)
    exact.add(vectors, ids)
    converted, report = compressed.compress_exact(exact, tmp_path / "compressed")
    assert converted.count == len(vectors)
    assert converted.search(vectors[:4], 1)[1][:, 0].tolist() == [100, 101, 102, 103]
    assert report.recall_at_10 >= 0.9
    exact_ids = exact.search(vectors[10:14], 5)[1]
    assert (converted.search(vectors[10:14], 5)[1][:, 0] == exact_ids[:, 0]).all()


def test_a_store_refuses_vectors_of_another_dimension(
    built: tuple[Path, compressed.RecallReport], tmp_path: Path
) -> None:
    vector_store = writable_copy(built[0], tmp_path)
    with pytest.raises(IndexMismatchError, match="384"):
        compressed.check_dim(vector_store, 768, "MedCPT")
    with pytest.raises(IndexMismatchError):
        vector_store.add(np.ones((2, 768), np.float32), np.asarray([1, 2], dtype=np.int64))
    with pytest.raises(InputError, match="training vectors"):
        CompressedStore.create(tmp_path / "tiny", CompressedParams(dim=8, nlist=64, pq_m=4)).train(
            np.ones((10, 8), np.float32)
        )


@pytest.mark.slow
def test_index_benchmark_reports_both_index_types(
    tmp_path: Path, shared_data: Path, minilm_path: Path
) -> None:
    from benchmarks import index_bench

    mixture, fit = index_bench.fitted_mixture(shared_data, str(minilm_path), tmp_path, docs=60)
    assert fit["fitted_on"].startswith("60 real PubMed abstracts")
    data = index_bench.bench_data(mixture, 3000, 96)
    results = {r.index_type: r.as_json() for r in index_bench.run_index_bench(data)}
    for kind in ("exact", "compressed"):
        row = results[kind]
        assert {"bytes_per_vector", "recall@10", "p50_ms", "p95_ms", "build_s"} <= set(row)
        assert row["vectors"] == 3000 and row["dim"] == 96
    assert results["exact"]["recall@10"] == 1.0
    assert results["compressed"]["recall@10"] >= 0.9
    assert results["compressed"]["bytes_per_vector"] < results["exact"]["bytes_per_vector"]
    assert list(tmp_path.glob("mixture-*.npz"))  # the fit is reused next time
