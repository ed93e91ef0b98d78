"""PubMed at scale: the compressed index against exact search, side by side, at 10k, 100k and 1M
vectors; a text query end to end at 1M; and what bounds index build throughput.

1. Real embeddings: ``--fit-docs`` real PubMed abstracts from the shared data folder are encoded
   with the real all-MiniLM-L6-v2 (timed: the encoder's throughput) and a cluster mixture on a
   PCA subspace is fitted to them (``benchmarks/synthetic_vectors.py``: PCA-128 subspace, 64
   diagonal-Gaussian clusters, plus isotropic noise with the real residual variance).
2. Index types at each size, on vectors sampled from that mixture, queries sampled fresh (never
   indexed): MedRAG's exact ``IndexFlatIP`` (the reference toolkit's PubMed index), Suwen's exact
   store and Suwen's compressed store. RAM per vector, recall@10 against exact, build time,
   single-query latency p50/p95, and the memory and latency ratios.
3. End to end at 1M: the 1M vectors are written in NCBI's MedCPT chunk layout (with real abstract
   texts recycled as metadata), imported with ``suwen index pubmed-medcpt``'s code, and real
   PubMedQA questions are searched through ``TextSearcher`` (MiniLM query encoding + search +
   fetching the rows from SQLite), dense and hybrid.
4. Build throughput: ``suwen index text``'s code on real abstracts (chunks/s) and the encoder's
   FLOPs per token against the matmul throughput this CPU reaches.

    .venv/bin/python -m benchmarks.index_scale [--sizes 10000,100000,1000000] [--fit-docs 1000]
        [--work DIR]  (keep the end-to-end indexes in DIR and reuse them next time)

Prints tables and writes benchmarks/results/index_scale.json. The machine's load average is
recorded before and after each phase: the 2 cores are shared.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import index_bench, medcpt_shape
from benchmarks.common import (
    fresh_cli_process,
    minilm_or_exit,
    processor,
    shared_data_default,
    write_json,
)
from benchmarks.index_bench import BenchData, IndexMeasurement
from benchmarks.synthetic_vectors import EmbeddingMixture
from suwen.config import Settings
from suwen.files import atomic_path, atomic_write_text
from suwen.indexes import compressed, store
from suwen.privacy import private_dir

HERE = Path(__file__).resolve().parent
console = Console()
PUBMED_ARTICLES = 24_000_000
E2E_QUESTIONS = 100
E2E_PASSES = 2
BM25_QUESTIONS = 100
NCBI_CHUNK_ROWS = 250_000
ABSTRACT_SENTENCES = 8


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def say(message: str) -> None:
    console.print(f"[dim]{message}[/]  load {load()}", highlight=False)


# ---------------------------------------------------------------------------------------------
# 1 + 4: real encoder, FLOPs, build throughput


def minilm_config(path: str) -> dict[str, int]:
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return {
        "layers": int(config["num_hidden_layers"]),
        "hidden": int(config["hidden_size"]),
        "intermediate": int(config["intermediate_size"]),
    }


def token_lengths(path: str, texts: list[str]) -> tuple[list[int], int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = 256  # all-MiniLM-L6-v2's sentence-transformers max_seq_length
    lengths = [min(limit, len(ids)) for ids in tokenizer(texts)["input_ids"]]
    return lengths, limit


def padded_tokens(lengths: list[int], batch: int = 32) -> int:
    """Tokens the encoder actually computes: sentence-transformers sorts by length and pads each
    batch to its longest text."""
    ordered = sorted(lengths, reverse=True)
    return sum(
        max(part) * len(part)
        for part in (ordered[i : i + batch] for i in range(0, len(ordered), batch))
    )


def flops_per_token(config: dict[str, int], seq: float) -> float:
    """Multiply-adds x 2 per token of a BERT encoder: Q, K, V, O projections (4 h^2), the FFN
    (2 h f) and attention scores plus the weighted sum (2 s h), per layer. Layer norms, GELU and
    softmax are a few percent and left out."""
    h, f, layers = config["hidden"], config["intermediate"], config["layers"]
    return 2.0 * layers * (4 * h * h + 2 * h * f + 2 * seq * h)


def matmul_gflops(config: dict[str, int], threads: int) -> float:
    """FLOP/s of torch's float32 GEMM in the encoder's FFN shape, on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(32 * 128, config["hidden"])
        b = torch.randn(config["hidden"], config["intermediate"])
        for _ in range(3):
            a @ b
        rounds, started = 20, time.perf_counter()
        for _ in range(rounds):
            a @ b
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(before)
    return 2.0 * a.shape[0] * a.shape[1] * b.shape[1] * rounds / seconds / 1e9


def encoder_analysis(encoder: str, texts: list[str], seconds: float) -> dict[str, Any]:
    config = minilm_config(encoder)
    lengths, limit = token_lengths(encoder, texts)
    padded = padded_tokens(lengths)
    mean_padded_seq = padded / len(lengths)
    per_token = flops_per_token(config, mean_padded_seq)
    achieved = padded * per_token / seconds / 1e9
    peak = {str(t): round(matmul_gflops(config, t), 1) for t in (1, 2)}
    return {
        "model": config,
        "texts": len(texts),
        "seconds": round(seconds, 2),
        "texts_per_s": round(len(texts) / seconds, 2),
        "tokens": sum(lengths),
        "padded_tokens": padded,
        "max_seq_length": limit,
        "mean_tokens": round(float(np.mean(lengths)), 1),
        "truncated_share": round(float(np.mean([n >= limit for n in lengths])), 3),
        "mflops_per_token": round(per_token / 1e6, 2),
        "achieved_gflops": round(achieved, 1),
        "matmul_gflops": peak,
        "share_of_matmul_peak": round(achieved / max(peak.values()), 3),
    }


def build_throughput(settings: Settings, texts: list[str], workdir: Path) -> dict[str, Any]:
    """`suwen index text`'s code on real abstracts: chunks per second, end to end."""
    from suwen.indexes.text_index import build_text_index

    source = workdir / "abstracts.jsonl"
    rows = []
    for number, text in enumerate(texts):
        title, _, abstract = text.partition("\n")
        rows.append({"pmid": str(90_000_000 + number), "title": title, "abstract": abstract})
    atomic_write_text(source, "".join(json.dumps(row) + "\n" for row in rows))
    started = time.perf_counter()
    report = build_text_index(settings, "throughput", [source])
    seconds = time.perf_counter() - started
    return {
        "documents": report.documents,
        "chunks": report.chunks,
        "seconds": round(seconds, 2),
        "chunks_per_s": round(report.chunks / seconds, 2),
    }


# ---------------------------------------------------------------------------------------------
# 2: index types side by side


def measure_size(
    mixture: EmbeddingMixture,
    n: int,
    dim: int,
    other_code_bytes: Sequence[int] = (),
    include_exact: bool = True,
) -> tuple[BenchData, list[IndexMeasurement]]:
    say(f"{n} vectors, dim {dim}: sampling and exact ground truth")
    data = index_bench.bench_data(mixture, n, dim)
    results = index_bench.run_index_bench(
        data,
        include_reference=True,
        include_exact=include_exact,
        progress=say,
        other_code_bytes=other_code_bytes,
    )
    return data, results


def ratios(results: list[IndexMeasurement]) -> dict[str, float]:
    by_type = {r.index_type: r for r in results}
    flat, packed = by_type["medrag_flat_ip"], by_type["compressed"]
    return {
        "memory_flat_over_compressed": round(flat.bytes_per_vector / packed.bytes_per_vector, 1),
        "p50_flat_over_compressed": round(flat.p50_ms / packed.p50_ms, 1),
    }


# ---------------------------------------------------------------------------------------------
# 3: a text query end to end at 1M


def write_ncbi_chunks(folder: Path, vectors: np.ndarray, texts: list[str]) -> int:
    """``vectors`` in NCBI's MedCPT layout, with distinct article texts made of real ones.

    Each article takes one real title and eight sentences drawn from all the real abstracts, so
    no two articles are copies: with copies, the top BM25 scores are all ties of one abstract,
    which flatters an engine that skips blocks below the current top-k score."""
    private_dir(folder)
    titles = [text.partition("\n")[0] for text in texts]
    sentences = [
        sentence.strip() + "."
        for text in texts
        for sentence in text.partition("\n")[2].split(". ")
        if len(sentence.split()) >= 4
    ]
    rng = np.random.default_rng(11)
    chunks = 0
    for number, start in enumerate(range(0, len(vectors), NCBI_CHUNK_ROWS)):
        stop = min(start + NCBI_CHUNK_ROWS, len(vectors))
        pmids = [str(40_000_000 + row) for row in range(start, stop)]
        picks = rng.integers(0, len(sentences), size=(stop - start, ABSTRACT_SENTENCES))
        with atomic_path(folder / f"embeds_chunk_{number}.npy") as tmp, tmp.open("wb") as out:
            np.save(out, vectors[start:stop] * 30.0)
        atomic_write_text(folder / f"pmids_chunk_{number}.json", json.dumps(pmids))
        with (
            atomic_path(folder / f"pubmed_chunk_{number}.json") as tmp,
            tmp.open("w", encoding="utf-8") as handle,
        ):
            handle.write("{")
            for offset, pmid in enumerate(pmids):
                abstract = " ".join(sentences[i] for i in picks[offset])
                record = {"d": "20200101", "t": titles[(start + offset) % len(titles)]}
                record |= {"a": abstract, "m": ""}
                handle.write(("," if offset else "") + json.dumps(pmid) + ":" + json.dumps(record))
            handle.write("}")
        chunks += 1
    return chunks


def end_to_end(
    settings: Settings,
    label: str,
    sample: Callable[[], np.ndarray],
    texts: list[str],
    questions: list[str],
    workdir: Path,
    *,
    bm25: bool,
) -> dict[str, Any]:
    """Import ``sample()``'s vectors as an index named ``e2e-<label>`` built for
    ``settings.text_encoder`` and time real questions through ``TextSearcher`` with the query
    runtime ``settings`` selects."""

    name = f"e2e-{label}"
    result = imported(settings, name, sample, texts, workdir)
    result |= {"query_encoder": label, "query_runtime": settings.query_runtime}
    for method, threads, row in timed_searches(settings, name, questions):
        result[f"{method}_{threads}_thread"] = row
    for method in ("dense", "hybrid"):
        result[method] = min(
            (result[f"{method}_{t}_thread"] | {"threads": t} for t in (1, 2)),
            key=lambda row: row["p50_ms"],
        )
    result["search_process"] = search_process_rss(settings, name, questions[0])
    if bm25:
        result["bm25_engines"] = bm25_engines(settings, name, questions[-BM25_QUESTIONS:])
    return result


IMPORT_RECORD = "e2e-import.json"


def imported(
    settings: Settings, name: str, sample: Callable[[], np.ndarray], texts: list[str], workdir: Path
) -> dict[str, Any]:
    """Import ``sample()``'s vectors as index ``name`` into ``settings.home`` through NCBI's
    chunk layout and ``suwen index pubmed-medcpt``'s code, and what the import reported; an
    index a kept work folder (``--work``) already holds is reused with its import's record."""
    record = settings.home / IMPORT_RECORD
    if record.is_file():
        say(f"{name}: reusing the index imported earlier in {settings.home}")
        kept: dict[str, Any] = json.loads(record.read_text(encoding="utf-8"))
        return kept
    from suwen.indexes.medcpt_import import import_medcpt

    vectors = sample()
    say(f"{name}: writing {len(vectors)} vectors in NCBI's chunk layout")
    source = workdir / "ncbi"
    chunks = write_ncbi_chunks(source, vectors, texts)
    del vectors
    say(f"{name}: importing (suwen index pubmed-medcpt)")
    started = time.perf_counter()
    report = import_medcpt(settings, source, name, encoder=settings.text_encoder)
    import_s = time.perf_counter() - started
    shutil.rmtree(source)
    _, manifest = store.open_version(settings.indexes_dir, name)
    result = {
        "vectors": report.vectors,
        "dim": manifest.dim,
        "ncbi_chunks": chunks,
        "import_s": round(import_s, 1),
        "import_vectors_per_s": round(report.vectors / import_s, 1),
        "index_type": report.index_type,
        "bytes_per_vector": report.bytes_per_vector,
        "build_time_recall_at_10": report.recall_at_10,
        "build_time_recall_query_kind": manifest.extra.get("recall_query_kind"),
        "build_time_document_recall_at_10": manifest.extra.get("document_recall_at_10"),
    }
    atomic_write_text(record, json.dumps(result))
    return result


def timed_searches(
    settings: Settings, name: str, questions: list[str]
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """p50/p95 of whole searches (encode + search + fetch), dense and hybrid, 1 and 2 threads
    (ONNX Runtime's or PyTorch's, and FAISS's); the best of ``E2E_PASSES`` passes (others' jobs
    share the cores)."""
    from suwen.indexes.text_encoder import query_encoder
    from suwen.retrieval.text import TextSearcher

    fresh = iter(range(0, len(questions) - 10, E2E_QUESTIONS))
    for threads in (1, 2):
        threaded = settings.model_copy(update={"query_threads": threads})
        query_encoder(threaded)  # an export happens here, once, not inside a timed search
        with TextSearcher.open(threaded, name) as searcher:
            encoder = query_encoder(threaded)
            for method in ("dense", "hybrid"):
                passes = []
                with torch_threads(threads), compressed.faiss_threads(threads):
                    for _ in range(E2E_PASSES):
                        # Fresh questions every pass: the searcher caches query vectors.
                        start = next(fresh)
                        batch = questions[start : start + E2E_QUESTIONS]
                        say(f"{name}: {len(batch)} questions, {method}, {threads} thread(s)")
                        for question in questions[-10:]:
                            searcher.search(question, 10, method=method)  # type: ignore[arg-type]
                        times = []
                        for question in batch:
                            began = time.perf_counter()
                            hits = searcher.search(question, 10, method=method)  # type: ignore[arg-type]
                            times.append((time.perf_counter() - began) * 1000)
                            assert len(hits) == 10 and all(hit.text for hit in hits)
                        encode = []
                        for question in batch[:50]:
                            began = time.perf_counter()
                            encoder.encode_query(question)
                            encode.append((time.perf_counter() - began) * 1000)
                        passes.append(
                            {
                                "p50_ms": round(float(np.percentile(times, 50)), 2),
                                "p95_ms": round(float(np.percentile(times, 95)), 2),
                                "query_encode_p50_ms": round(float(np.percentile(encode, 50)), 2),
                                "load": load(),
                            }
                        )
                yield method, threads, min(passes, key=lambda row: row["p50_ms"])


def bm25_engines(settings: Settings, name: str, questions: list[str]) -> dict[str, Any]:
    """BM25 alone on the 1M chunks, side by side: Suwen's tantivy index against the SQLite FTS5
    table earlier versions used (built here from the same rows), same questions, top 200 each
    (what hybrid search takes), and how far their top 10 agree."""
    from benchmarks.fts5_baseline import copy_rows, create_fts5_table, fts5_bm25
    from suwen.indexes import bm25
    from suwen.indexes.text_store import TEXT_DB
    from suwen.retrieval.bm25 import STOPWORDS, Bm25Searcher, query_words

    version, _ = store.open_version(settings.indexes_dir, name)
    say(f"BM25 engines: building an FTS5 table of the same rows for {len(questions)} questions")
    db = copy_rows(version / TEXT_DB, settings.home / "fts5-baseline")
    started = time.perf_counter()
    create_fts5_table(db)
    fts5_build_s = time.perf_counter() - started
    searcher = Bm25Searcher(bm25.open_index(version))
    times: dict[str, list[float]] = {"tantivy": [], "fts5": []}
    overlap = []
    for question in questions:
        began = time.perf_counter()
        fast = searcher.search(query_words(question, STOPWORDS), 200)
        times["tantivy"].append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        slow = fts5_bm25(db, question, 200, STOPWORDS)
        times["fts5"].append((time.perf_counter() - began) * 1000)
        top = {chunk_id for chunk_id, _ in fast[:10]}
        overlap.append(len(top & {chunk_id for chunk_id, _ in slow[:10]}) / max(len(top), 1))
    db.close()
    result: dict[str, Any] = {"questions": len(questions), "fts5_build_s": round(fts5_build_s, 1)}
    for engine, measured in times.items():
        result[engine] = {
            "p50_ms": round(float(np.percentile(measured, 50)), 2),
            "p95_ms": round(float(np.percentile(measured, 95)), 2),
        }
    result["p50_fts5_over_tantivy"] = round(
        result["fts5"]["p50_ms"] / result["tantivy"]["p50_ms"], 1
    )
    result["top10_overlap"] = round(float(np.mean(overlap)), 3)
    return result


def search_process_rss(settings: Settings, name: str, question: str) -> dict[str, Any]:
    """Peak resident memory of a fresh ``suwen search text`` process answering one question
    over the index (the query encoder, the index, SQLite's and tantivy's pages; the re-scored
    rows are read, not mapped), and whether it imported torch."""
    env = {"SUWEN_TEXT_ENCODER": settings.text_encoder}
    args = ["search", "text", question, "--index", name, "-k", "10", "--method", "dense", "--json"]
    measured = fresh_cli_process(settings, args, env)
    return {key: measured[key] for key in ("peak_rss_mb", "torch_imported")}


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------


def print_tables(payload: dict[str, Any]) -> None:
    table = Table(
        title="index types side by side (synthetic vectors fitted to real MiniLM embeddings)"
    )
    for column in (
        "vectors",
        "dim",
        "type",
        "RAM B/vector",
        "recall@10",
        "question-like recall@10",
        "shortlist",
        "p50 ms",
        "p95 ms",
        "build s",
    ):
        table.add_column(column, justify="left" if column == "type" else "right")
    for size in payload.get("sizes", []):
        for row in size["results"]:
            table.add_row(
                str(size["vectors"]),
                str(size["dim"]),
                row["index_type"],
                f"{row['bytes_per_vector']:.1f}",
                f"{row['recall@10']:.3f}",
                str(row["details"].get("build_time_recall_at_10", "")),
                str(row["details"].get("shortlist", "")),
                f"{row['p50_ms']:.2f}",
                f"{row['p95_ms']:.2f}",
                f"{row['build_s']:.1f}",
            )
        r = size["ratios"]
        table.add_row(
            "", "", "[dim]flat / compressed[/]", f"{r['memory_flat_over_compressed']}x", "", "",
            "", f"{r['p50_flat_over_compressed']}x", "", "",
        )  # fmt: skip
    console.print(table)
    for label, e2e in payload.get("end_to_end", {}).items():
        process = e2e["search_process"]
        console.print(
            f"end to end, query encoder {label} ({e2e['query_runtime']} runtime), "
            f"{e2e['vectors']} x {e2e['dim']} ({e2e['index_type']}, {e2e['bytes_per_vector']} "
            f"B/vector, build-time recall@10 {e2e['build_time_recall_at_10']} on "
            f"{e2e['build_time_recall_query_kind']} queries, "
            f"{e2e['build_time_document_recall_at_10']} on held-out documents): dense p50 "
            f"{e2e['dense']['p50_ms']} ms (p95 {e2e['dense']['p95_ms']}, encoding "
            f"{e2e['dense']['query_encode_p50_ms']}), hybrid p50 {e2e['hybrid']['p50_ms']} ms "
            f"(p95 {e2e['hybrid']['p95_ms']}); best of 1 and 2 threads; a fresh `suwen search "
            f"text` peaks at {process['peak_rss_mb']} MB (torch imported: "
            f"{process['torch_imported']})"
        )
        if "torch_runtime" in e2e:
            torch_rows = e2e["torch_runtime"]
            console.print(f"  same index, PyTorch query runtime: {json.dumps(torch_rows)}")
        engines = e2e.get("bm25_engines")
        if engines:
            console.print(
                f"BM25 alone, top 200, {engines['questions']} questions: tantivy p50 "
                f"{engines['tantivy']['p50_ms']} ms (p95 {engines['tantivy']['p95_ms']}) vs "
                f"FTS5 p50 {engines['fts5']['p50_ms']} ms (p95 {engines['fts5']['p95_ms']}) = "
                f"{engines['p50_fts5_over_tantivy']}x; top-10 overlap {engines['top10_overlap']}"
            )
    enc = payload["encoder"]
    console.print(
        f"encoder: {enc['texts_per_s']} abstracts/s, {enc['mflops_per_token']} MFLOP/token, "
        f"{enc['achieved_gflops']} GFLOP/s achieved vs {enc['matmul_gflops']} GFLOP/s torch "
        f"GEMM (1/2 threads) = {enc['share_of_matmul_peak']:.0%} of it"
    )
    if "build" in payload:
        console.print(f"index text build {payload['build']['chunks_per_s']} chunks/s")
    if "pubmed_projection" in payload:
        console.print(f"PubMed projection: {payload['pubmed_projection']}")


def sweep(
    args: argparse.Namespace, mixture: EmbeddingMixture, sizes: list[int], payload: dict[str, Any]
) -> None:
    """Index types side by side at every size (and the largest at MedCPT's dimension)."""
    payload["sizes"] = []
    runs = [(n, args.dim) for n in sizes]
    if args.pubmed_dim and args.pubmed_dim != args.dim:
        runs.append((max(sizes), args.pubmed_dim))
    for n, dim in runs:
        _, results = measure_size(mixture, n, dim, args.code_bytes, args.exact)
        payload["sizes"].append(
            {
                "vectors": n,
                "dim": dim,
                "results": [r.as_json() for r in results],
                "ratios": ratios(results),
                "load_after": load(),
            }
        )
        write_json(args.output, payload)  # partial results survive a long run cut short
    compressed_768 = [
        row for size in payload["sizes"] if size["dim"] == args.pubmed_dim
        for row in size["results"] if row["index_type"] == "compressed"
    ]  # fmt: skip
    if compressed_768:
        per_vector = compressed_768[0]["bytes_per_vector"]
        payload["pubmed_projection"] = {
            "articles": PUBMED_ARTICLES,
            "dim": args.pubmed_dim,
            "compressed_gb": round(per_vector * PUBMED_ARTICLES / 1e9, 2),
            "flat_gb": round(4 * args.pubmed_dim * PUBMED_ARTICLES / 1e9, 1),
            "note": f"RAM per vector measured at {compressed_768[0]['vectors']} vectors "
            "(centroid and padding share falls as n grows); the float16 re-scoring "
            "vectors are on disk, memory-mapped, not RAM",
        }


@contextlib.contextmanager
def work_folder(kept: Path | None) -> Iterator[Path]:
    if kept is not None:
        private_dir(kept)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix="suwen-index-scale-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument(
        "--pubmed-dim",
        type=int,
        default=768,
        help="also measure the largest size at this dimension (0: skip)",
    )
    parser.add_argument("--fit-docs", type=int, default=1000)
    parser.add_argument("--build-docs", type=int, default=300)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument(
        "--e2e",
        default="medcpt_shape,minilm",
        help="query encoders timed end to end: medcpt_shape (BERT-base, random weights, on "
        "--pubmed-dim vectors) and/or minilm (the real weights, on --dim vectors)",
    )
    parser.add_argument(
        "--e2e-only", action="store_true", help="skip the index-type sweep and build throughput"
    )
    parser.add_argument(
        "--no-bm25-engines",
        dest="bm25_engines",
        action="store_false",
        help="skip timing SQLite FTS5 beside tantivy",
    )
    parser.add_argument(
        "--code-bytes",
        type=lambda text: [int(n) for n in text.split(",") if n],
        default=[],
        help="also build compressed indexes with these PQ code sizes (bytes per vector, "
        "setting compressed_code_bytes), beside the default's",
    )
    parser.add_argument(
        "--no-exact",
        dest="exact",
        action="store_false",
        help="skip Suwen's exact store in the index-type sweep (MedRAG's flat index stays as "
        "the reference): at 2M x 768 building it beside the sampled vectors needs over 24 GB",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "index_scale.json")
    parser.add_argument(
        "--work",
        type=Path,
        help="keep the end-to-end indexes in this folder and reuse them on the next run "
        "(default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = minilm_or_exit()
    sizes = [int(s) for s in args.sizes.split(",")]
    payload: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), **processor(), "load_at_start": load()}
    }

    with work_folder(args.work) as work:
        settings = Settings(home=work / "home", text_encoder=encoder, device="cpu")  # type: ignore[arg-type]
        say(f"encoding {args.fit_docs} real abstracts with MiniLM")
        texts = index_bench.shared_abstracts(args.data, max(args.fit_docs, args.build_docs))
        fit_texts = texts[: args.fit_docs]
        embeddings, throughput = index_bench.encode_abstracts(encoder, fit_texts)
        payload["encoder"] = encoder_analysis(encoder, fit_texts, throughput.seconds)
        mixture = EmbeddingMixture.fit(embeddings)
        payload["synthetic"] = {
            **mixture.describe(),
            "fitted_on": f"{len(fit_texts)} real PubMed abstracts (shared data), all-MiniLM-L6-v2",
        }
        if not args.e2e_only:
            say("index build throughput (suwen index text on real abstracts)")
            payload["build"] = {
                **build_throughput(settings, texts[: args.build_docs], work),
                "load": load(),
            }
            sweep(args, mixture, sizes, payload)
        if not args.no_e2e:
            questions = [
                str(record["QUESTION"])
                for record in json.loads(
                    (args.data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8")
                ).values()
            ]
            payload["end_to_end"] = {}
            shape = medcpt_shape.build(work / "medcpt-shape", Path(encoder))
            paths = {"medcpt_shape": (str(shape), args.pubmed_dim), "minilm": (encoder, args.dim)}
            for label in args.e2e.split(","):
                path, dim = paths[label]
                home = work / f"home-{label}"
                chosen = Settings(home=home, text_encoder=path, device="cpu", query_runtime="auto")  # type: ignore[arg-type]
                sample = functools.partial(
                    index_bench.sample_vectors, mixture, max(sizes), dim, seed=1
                )
                row = end_to_end(
                    chosen, label, sample, texts, questions, work, bm25=args.bm25_engines
                )
                if label == "minilm":  # the PyTorch query path on the same index, for comparison
                    torch_settings = chosen.model_copy(update={"query_runtime": "torch"})
                    name = f"e2e-{label}"
                    row["torch_runtime"] = {
                        f"{method}_{threads}_thread": timing
                        for method, threads, timing in timed_searches(
                            torch_settings, name, questions[::-1]
                        )
                    }
                    row["torch_runtime"]["search_process"] = search_process_rss(
                        torch_settings, name, questions[0]
                    )
                payload["end_to_end"][label] = {**row, "load": load()}
                if args.work is None:
                    shutil.rmtree(home, ignore_errors=True)
                write_json(args.output, payload)
    payload["machine"]["load_at_end"] = load()
    write_json(args.output, payload)
    print_tables(payload)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
