"""Measure vector index types side by side: RAM per vector, recall@10 against exact search, build
time and single-query latency, for ``benchmarks/index_scale.py``.

Vectors come from an :class:`EmbeddingMixture` fitted to real MiniLM embeddings of the shared
PubMed abstracts (see ``benchmarks/synthetic_vectors.py``); queries are further samples of the
same mixture that are *not* in the index.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

from benchmarks.synthetic_vectors import EmbeddingMixture
from suwen.files import atomic_path, atomic_write_json
from suwen.indexes import compressed
from suwen.indexes.compressed import CompressedStore, ExactStore
from suwen.indexes.vectors import FloatArray
from suwen.privacy import private_dir

Progress = Callable[[str], None]
LATENCY_QUERIES = 300
RECALL_QUERIES = 500
DEFAULT_FIT_DOCS = 600


@dataclass
class IndexMeasurement:
    index_type: str
    vectors: int
    dim: int
    bytes_per_vector: float
    rss_bytes_per_vector: float | None
    recall_at_10: float
    p50_ms: float
    p95_ms: float
    build_s: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["recall@10"] = row.pop("recall_at_10")
        return row


# ---------------------------------------------------------------------------------------------
# Real embeddings and the fitted mixture


def shared_abstracts(data: Path, limit: int) -> list[str]:
    """Title + abstract of up to ``limit`` real PubMed abstracts from the shared data folder
    (PubTator corpora first, then PubMedQA contexts), read with Suwen's own source readers."""
    from suwen.indexes.text_sources import read_source
    from suwen.types import Document

    files = sorted((data / "abstracts").glob("*/*.txt"))
    files = [f for f in files if f.name.lower() not in ("readme.txt", "license")]
    files.append(data / "pubmedqa" / "ori_pqal.json")
    texts: dict[str, str] = {}
    for path in files:
        for record in read_source(path, "pubmedqa" if path.suffix == ".json" else "pubtator"):
            if isinstance(record, Document) and record.pmid not in texts:
                texts[record.pmid] = f"{record.title}\n{record.text}".strip()
            if len(texts) >= limit:
                return list(texts.values())
    return list(texts.values())


@dataclass(frozen=True)
class EncodeThroughput:
    texts: int
    tokens: int
    seconds: float

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def encode_abstracts(
    encoder_path: str, texts: Sequence[str], *, batch_size: int = 32
) -> tuple[FloatArray, EncodeThroughput]:
    """Embed ``texts`` with a sentence-transformers model on the CPU, timed."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(encoder_path, device="cpu")
    tokenizer = model.tokenizer
    limit = int(model.max_seq_length or 512)
    tokens = sum(
        min(limit, len(ids))
        for ids in tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
    )
    model.encode(list(texts[:batch_size]), batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    matrix = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True
    )
    seconds = time.perf_counter() - started
    return np.asarray(matrix, dtype=np.float32), EncodeThroughput(len(texts), tokens, seconds)


def fitted_mixture(
    data: Path,
    encoder_path: str,
    cache_dir: Path,
    *,
    docs: int = DEFAULT_FIT_DOCS,
    progress: Progress | None = None,
) -> tuple[EmbeddingMixture, dict[str, Any]]:
    """A mixture fitted to ``docs`` real abstracts' embeddings, cached by encoder and count."""
    key = hashlib.sha256(f"{encoder_path}|{docs}|{data.resolve()}".encode()).hexdigest()[:16]
    path = cache_dir / f"mixture-{key}.npz"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        info: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        return EmbeddingMixture.load(path), info
    texts = shared_abstracts(data, docs)
    if progress:
        progress(f"encoding {len(texts)} real abstracts with {encoder_path}")
    embeddings, throughput = encode_abstracts(encoder_path, texts)
    mixture = EmbeddingMixture.fit(embeddings, subspace=min(128, len(texts) // 4))
    info = {
        "fitted_on": f"{len(texts)} real PubMed abstracts from {data}",
        "encoder": encoder_path,
        **mixture.describe(),
        "encode_texts_per_s": round(throughput.texts_per_s, 2),
    }
    private_dir(cache_dir)
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        mixture.save(handle)
    atomic_write_json(meta_path, info)
    return mixture, info


def to_dim(vectors: FloatArray, dim: int, seed: int = 7) -> FloatArray:
    """Vectors carried into ``dim`` dimensions by a fixed random orthonormal map (an isometry
    when ``dim`` is larger; a Johnson-Lindenstrauss projection when smaller), renormalised."""
    source = vectors.shape[1]
    if dim == source:
        return vectors
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((max(dim, source), min(dim, source))))
    mapping = basis.T if dim > source else basis  # (source, dim)
    out = (vectors @ mapping.astype(np.float32)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def sample_vectors(
    mixture: EmbeddingMixture, n: int, dim: int, *, seed: int, batch: int = 131_072
) -> FloatArray:
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        out[start:stop] = to_dim(mixture.sample(stop - start, seed=seed * 1_000_003 + start), dim)
    return out


# ---------------------------------------------------------------------------------------------
# Measuring


def rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), or None elsewhere."""
    try:
        fields = Path("/proc/self/statm").read_text(encoding="ascii").split()
    except OSError:
        return None
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


# Self-contained (no import of this module): the child may not have the checkout on its path.
_RSS_PROBE = """
import os, sys
from pathlib import Path
from suwen.indexes.compressed import open_store

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
store = open_store(Path(sys.argv[1]))
print(rss() - before)
"""


def rss_of_loading(directory: Path) -> int | None:
    """Resident memory a fresh process gains by opening the store in ``directory``: the index's
    real RAM, measured where no freed memory from building it can be reused."""
    if rss_bytes() is None:
        return None
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(probe.stdout.strip().splitlines()[-1])


def exact_neighbours(vectors: FloatArray, queries: FloatArray, k: int = 10) -> npt.NDArray[Any]:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, ids = flat.search(queries, k)
    return ids


def recall_at_10(found: npt.NDArray[np.int64], truth: npt.NDArray[Any]) -> float:
    hits = sum(
        len(set(f[:10].tolist()) & set(t[:10].tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / (10 * len(truth))


def latencies_ms(search: Callable[[FloatArray], object], queries: FloatArray) -> list[float]:
    for query in queries[:20]:
        search(query[None, :])  # warm-up: page cache, lazy allocations
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query[None, :])
        times.append((time.perf_counter() - started) * 1000)
    return times


def _percentiles(times: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def best_latency(
    search: Callable[[FloatArray], object], queries: FloatArray
) -> tuple[float, float, int]:
    """(p50, p95, threads) of single-query searches with 1 and with 2 FAISS threads, whichever
    has the lower p50: on a shared machine OpenMP's spinning barriers can make two threads far
    slower than one, and each index type deserves its better setting."""
    measured = []
    for threads in (1, 2):
        with compressed.faiss_threads(threads):
            p50, p95 = _percentiles(latencies_ms(search, queries))
        measured.append((p50, p95, threads))
    return min(measured)


def measure_flat_reference(
    vectors: FloatArray, queries: FloatArray, truth: npt.NDArray[Any]
) -> IndexMeasurement:
    """A bare ``faiss.IndexFlatIP``: the exact index MedRAG builds over PubMed's MedCPT vectors."""
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    build = time.perf_counter() - started
    _, found = flat.search(queries[:RECALL_QUERIES], 10)
    p50, p95, threads = best_latency(lambda q: flat.search(q, 10), queries[:LATENCY_QUERIES])
    n = len(vectors)
    measurement = IndexMeasurement(
        "medrag_flat_ip",
        n,
        vectors.shape[1],
        float(flat.code_size),  # the float32 vectors themselves, all in RAM
        None,
        recall_at_10(found, truth),
        p50,
        p95,
        build,
        {"faiss": "IndexFlatIP", "threads": threads},
    )
    return measurement


def measure_exact(
    vectors: FloatArray, queries: FloatArray, truth: npt.NDArray[Any], workdir: Path
) -> IndexMeasurement:
    """Suwen's exact store (``IndexIDMap2(IndexFlatIP)``), saved and reloaded like an index."""
    started = time.perf_counter()
    exact = ExactStore.create(workdir, vectors.shape[1])
    exact.add(vectors, np.arange(len(vectors), dtype=np.int64))
    build = time.perf_counter() - started
    exact.save()
    del exact
    gc.collect()
    loaded_rss = rss_of_loading(workdir)
    loaded = ExactStore.open(workdir)
    _, found = loaded.search(queries[:RECALL_QUERIES], 10)
    p50, p95, threads = best_latency(lambda q: loaded.search(q, 10), queries[:LATENCY_QUERIES])
    n = len(vectors)
    measurement = IndexMeasurement(
        "exact",
        n,
        vectors.shape[1],
        (workdir / compressed.EXACT_FILE).stat().st_size / n,
        None if loaded_rss is None else loaded_rss / n,
        recall_at_10(found, truth),
        p50,
        p95,
        build,
        {"faiss": "IndexIDMap2(IndexFlatIP)", "threads": threads},
    )
    return measurement


def build_compressed(
    vectors: FloatArray,
    workdir: Path,
    progress: Progress | None = None,
    code_bytes: int = compressed.CODE_BYTES,
) -> tuple[CompressedStore, dict[str, Any], float]:
    """Train, add and calibrate a compressed store over ``vectors`` with ``code_bytes`` of PQ
    code per vector (setting compressed_code_bytes); (store, details, build_s)."""
    n, dim = vectors.shape
    params = compressed.CompressedParams.for_corpus(dim, n, code_bytes)
    started = time.perf_counter()
    store = CompressedStore.create(workdir, params)
    rows = compressed.training_rows(n, compressed.MAX_TRAINING_VECTORS)
    if progress:
        progress(f"compressed: training {params.factory} on {len(rows)} vectors")
    store.train(vectors[rows])
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        store.add(vectors[start:stop], np.arange(start, stop, dtype=np.int64))
    build = time.perf_counter() - started
    started = time.perf_counter()
    report = compressed.calibrate_and_measure(store, progress=progress)
    store.save()
    details = {
        "factory": params.factory,
        "code_bytes": code_bytes,
        "nlist": params.nlist,
        "nprobe": report.nprobe,
        "shortlist": report.shortlist,
        "calibration_s": round(time.perf_counter() - started, 2),
        "build_time_recall_at_10": round(report.recall_at_10, 4),
        "disk_bytes_per_vector": store.disk_bytes_per_vector(),
    }
    return store, details, build


def measure_compressed(
    vectors: FloatArray,
    queries: FloatArray,
    truth: npt.NDArray[Any],
    workdir: Path,
    progress: Progress | None = None,
    code_bytes: int = compressed.CODE_BYTES,
) -> IndexMeasurement:
    """The compressed store, labelled ``compressed`` with the default code size and
    ``compressed_{code_bytes}B`` with another."""
    store, details, build = build_compressed(vectors, workdir, progress, code_bytes)
    del store
    gc.collect()
    loaded_rss = rss_of_loading(workdir)
    loaded = compressed.CompressedStore.open(workdir)
    _, found = loaded.search(queries[:RECALL_QUERIES], 10)
    p50, p95, threads = best_latency(lambda q: loaded.search(q, 10), queries[:LATENCY_QUERIES])
    details["threads"] = threads
    n = len(vectors)
    label = "compressed" if code_bytes == compressed.CODE_BYTES else f"compressed_{code_bytes}B"
    measurement = IndexMeasurement(
        label,
        n,
        vectors.shape[1],
        loaded.bytes_per_vector(),
        None if loaded_rss is None else loaded_rss / n,
        recall_at_10(found, truth),
        p50,
        p95,
        build,
        details,
    )
    return measurement


@dataclass
class BenchData:
    vectors: FloatArray
    queries: FloatArray
    truth: npt.NDArray[Any]


def bench_data(mixture: EmbeddingMixture, n: int, dim: int, *, seed: int = 1) -> BenchData:
    vectors = sample_vectors(mixture, n, dim, seed=seed)
    queries = sample_vectors(mixture, max(RECALL_QUERIES, LATENCY_QUERIES), dim, seed=seed + 100)
    return BenchData(vectors, queries, exact_neighbours(vectors, queries[:RECALL_QUERIES]))


def run_index_bench(
    data: BenchData,
    *,
    include_reference: bool = False,
    include_exact: bool = True,
    progress: Progress | None = None,
    workdir: Path | None = None,
    other_code_bytes: Sequence[int] = (),
) -> list[IndexMeasurement]:
    """Measure ``exact`` (unless left out) and ``compressed`` (and MedRAG's bare flat index,
    and compressed stores with ``other_code_bytes`` of code per vector) on the same data."""
    results = []
    with _workdir(workdir) as base:
        if include_reference:
            if progress:
                progress("measuring MedRAG's IndexFlatIP")
            results.append(measure_flat_reference(data.vectors, data.queries, data.truth))
        if include_exact:
            if progress:
                progress("measuring exact")
            results.append(measure_exact(data.vectors, data.queries, data.truth, base / "exact"))
        if progress:
            progress("measuring compressed")
        results.append(
            measure_compressed(
                data.vectors, data.queries, data.truth, base / "compressed", progress
            )
        )
        for code_bytes in other_code_bytes:
            if progress:
                progress(f"measuring compressed with {code_bytes}-byte codes")
            folder = base / f"compressed-{code_bytes}"
            results.append(
                measure_compressed(
                    data.vectors, data.queries, data.truth, folder, progress, code_bytes
                )
            )
    return results


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    """``path`` (kept, for inspection) or a temporary directory removed afterwards."""
    if path is not None:
        private_dir(path / "exact")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="suwen-index-bench-") as tmp:
        (Path(tmp) / "exact").mkdir()
        yield Path(tmp)
