"""One query's encoding, side by side: PyTorch (eager, frozen trace) against ONNX Runtime
(float32, 8-bit blocks), for MedCPT's query-encoder shape and the real all-MiniLM-L6-v2.

1. Latency of one PubMedQA question (about 20 tokens) on 1 and 2 threads, best of repeated
   passes, for a randomly initialised BERT-base with MedCPT-Query-Encoder's configuration
   (``benchmarks/medcpt_shape.py``; the default query encoder) and for MiniLM; ONNX Runtime also
   with queries padded to fixed buckets (16/32/64 tokens) instead of their own length.
   ONNX Runtime's dynamic int8 graph (the usual recipe) is timed too: it is the fastest, and
   part 2 shows why Suwen does not keep it.
2. Agreement with the eager model on the real MiniLM weights, all 1000 PubMedQA questions:
   cosine of the float32 graph, of the 8-bit block-32 graph Suwen keeps, and of ONNX Runtime's
   dynamic int8 graph (per-channel weights, per-tensor activations).
3. Retrieval quality with the query runtime Suwen uses (ONNX) against PyTorch: the retrieval
   benchmark's recall on the 1000 PubMedQA questions and 50 paraphrases (``--no-retrieval`` to
   skip; the index is built once in ``SUWEN_HOME``).
4. Resident memory of a fresh process that loads the query encoder and encodes one query:
   ONNX Runtime against PyTorch with the frozen trace.

    .venv/bin/python -m benchmarks.query_encoder [--passes 3] [--no-retrieval]

Prints tables and writes benchmarks/results/query_encoder.json; records the load average: the
2 cores are shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import medcpt_shape, quant_candidates
from benchmarks.common import minilm_or_exit, portable, processor, shared_data_default, write_json
from suwen.config import Settings, load_settings
from suwen.indexes import onnx_encoder, smoothquant
from suwen.indexes.onnx_encoder import ExportRecord, OnnxQueryEncoder
from suwen.indexes.text_encoder import TextEncoder, load_text_encoder, onnx_query_encoder

HERE = Path(__file__).resolve().parent
console = Console()
TIMED_QUESTIONS = 100
BUCKETS = (16, 32, 64)
RUNTIMES = (
    "torch_eager",
    "torch_trace",
    "onnx_float32",
    "onnx_int8",
    "onnx_int8_buckets",
    "onnx_int8_sleeping_workers",
    "onnx_dynamic_int8",
    "onnx_dynamic_int8_weights",
    "onnx_per_token_int8",
    "onnx_smooth_per_token_int8",
    "onnx_int8_per_token",
    "onnx_int8_blocks_64",
)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def say(message: str) -> None:
    console.print(f"[dim]{message}[/]  load {load()}", highlight=False)


def pubmedqa_questions(data: Path) -> list[str]:
    records = json.loads((data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    return [str(record["QUESTION"]) for record in records.values()]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def best_p50(encode: Callable[[str], object], questions: list[str], passes: int) -> dict[str, Any]:
    """p50/p95 of one query at a time, the pass with the lowest p50 (others' jobs share the
    cores: the best pass is the closest to this code's own cost)."""
    for question in questions[:5]:
        encode(question)
    runs = []
    for _ in range(passes):
        times = []
        cpu = time.process_time()  # this process, every thread: the cores it really used
        for question in questions:
            started = time.perf_counter()
            encode(question)
            times.append((time.perf_counter() - started) * 1000)
        cpu_ms = (time.process_time() - cpu) * 1000 / len(questions)
        runs.append((float(np.percentile(times, 50)), float(np.percentile(times, 95)), cpu_ms))
    p50, p95, cpu_ms = min(runs)
    return {
        "p50_ms": round(p50, 2),
        "p95_ms": round(p95, 2),
        "cpu_ms_per_query": round(cpu_ms, 2),
        "load": load(),
    }


# ---------------------------------------------------------------------------------------------
# ONNX graphs of both precisions (the product export keeps one)


CANDIDATES = (
    "dynamic_int8_weights",
    "per_token_int8",
    "smooth_per_token_int8",
    "int8_blocks_64",
)
PRECISIONS = ("float32", "int8", "int8_per_token", "dynamic_int8", *CANDIDATES)


def graphs(
    eager: TextEncoder, folder: Path, *, rejected: bool = False
) -> dict[str, tuple[Path, ExportRecord]]:
    """The float32 graph of ``eager``'s transformer, the 8-bit block graph Suwen keeps, ONNX
    Runtime's dynamic int8 graph (per-channel int8 weights, activations quantised per tensor at
    run time, every MatMul and Gather) and the candidates of ``benchmarks/quant_candidates.py``
    (with ``rejected``, its ``REJECTED`` schemes too), each in its own folder."""
    model: Any = eager._model
    pooling = onnx_encoder._supported_pooling(model)
    assert pooling is not None, "the benchmark's models are CLS- or mean-pooled"
    precisions = (*PRECISIONS, *(quant_candidates.REJECTED if rejected else ()))
    directories = {precision: folder / precision for precision in precisions}
    for directory in directories.values():
        directory.mkdir(parents=True, exist_ok=True)
        model.tokenizer.backend_tokenizer.save(str(directory / onnx_encoder.TOKENIZER_FILE))
    graph = {precision: d / onnx_encoder.MODEL_FILE for precision, d in directories.items()}
    inputs = onnx_encoder._export_graph(model, graph["float32"])
    onnx_encoder._quantise(graph["float32"], graph["int8"])
    onnx_encoder._quantise(graph["float32"], graph["int8_blocks_64"], block=64)
    quant_candidates.dynamic_int8_all(graph["float32"], graph["dynamic_int8"])
    if rejected:
        onnx_encoder._quantise(graph["float32"], graph["int8_blocks_128"], block=128)
        quant_candidates.dynamic_variants(graph["float32"], graph)
    quant_candidates.dynamic_int8_weights(graph["float32"], graph["dynamic_int8_weights"])
    smoothquant.per_token_int8(graph["float32"], graph["per_token_int8"])
    tokenizer = directories["float32"] / onnx_encoder.TOKENIZER_FILE
    maxima = smoothquant.activation_maxima(
        graph["float32"], tokenizer, inputs, smoothquant.sample_abstracts()
    )  # measured once for every smoothed graph
    smoothquant.quantise_with(graph["float32"], graph["int8_per_token"], maxima)
    quant_candidates.smoothed_graphs(graph["float32"], maxima, graph)
    made: dict[str, tuple[Path, ExportRecord]] = {}
    for precision, directory in directories.items():
        record = ExportRecord(
            model=eager.name,
            fingerprint="benchmark",
            pooling=pooling,
            dim=eager.dim,
            max_tokens=eager.max_tokens,
            inputs=inputs,
            precision=precision,  # type: ignore[arg-type]
            min_cosine=0.0,
            onnxruntime="",
            model_bytes=sum(f.stat().st_size for f in directory.glob("model.*")),
        )
        made[precision] = (directory, record)
    return made


def latencies(
    label: str,
    eager: TextEncoder,
    folder: Path,
    questions: list[str],
    passes: int,
    thread_counts: tuple[int, ...],
) -> dict[str, Any]:
    """Every runtime's p50 for one query of ``eager``'s model, on each thread count."""
    rows: dict[str, Any] = {}
    for threads in thread_counts:
        with torch_threads(threads):
            say(f"{label}: PyTorch, {threads} thread(s)")
            rows[f"torch_eager_{threads}t"] = best_p50(
                lambda q: eager.encode([q]), questions, passes
            )
            rows[f"torch_trace_{threads}t"] = best_p50(eager.encode_query, questions, passes)
    made = graphs(eager, folder)
    for precision, (directory, record) in made.items():
        for threads in thread_counts:
            say(f"{label}: ONNX Runtime {precision}, {threads} thread(s)")
            encoder = OnnxQueryEncoder(directory, record, threads=threads)
            rows[f"onnx_{precision}_{threads}t"] = best_p50(encoder.encode_query, questions, passes)
            if precision == "int8":
                bucketed = OnnxQueryEncoder(directory, record, threads=threads, buckets=BUCKETS)
                rows[f"onnx_int8_buckets_{threads}t"] = best_p50(
                    bucketed.encode_query, questions, passes
                )
                sleeping = OnnxQueryEncoder(directory, record, threads=threads, spin=False)
                rows[f"onnx_int8_sleeping_workers_{threads}t"] = best_p50(
                    sleeping.encode_query, questions, passes
                )
        rows[f"onnx_{precision}_model_mb"] = round(record.model_bytes / 2**20, 1)
    tokens = [eager.count_tokens(q) for q in questions]
    rows["tokens_p50"] = float(np.percentile(tokens, 50))
    rows["best"] = best_of(rows, thread_counts)
    return rows


def best_of(rows: dict[str, Any], thread_counts: tuple[int, ...]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for runtime in RUNTIMES:
        threads = min(thread_counts, key=lambda t: rows[f"{runtime}_{t}t"]["p50_ms"])
        best[runtime] = {**rows[f"{runtime}_{threads}t"], "threads": threads}
    return best


# ---------------------------------------------------------------------------------------------
# Agreement with the eager model on the real MiniLM weights


def agreement(eager: TextEncoder, folder: Path, questions: list[str]) -> dict[str, Any]:
    """Cosine of each graph's vector to the eager model's: on every PubMedQA question, and on
    the probe texts the export's gate checks (the minimum over both decides ``kept``)."""
    reference = eager.encode(questions)
    probes = list(onnx_encoder.PROBES)
    probe_reference = np.vstack([eager.encode([probe]) for probe in probes])
    result: dict[str, Any] = {"questions": len(questions), "probes": len(probes)}
    for name, (directory, rec) in graphs(eager, folder, rejected=True).items():
        encoder = OnnxQueryEncoder(directory, rec)
        got = np.vstack([encoder.encode_query(q) for q in questions])
        cosines = np.sum(got * reference, axis=1)
        on_probes = np.sum(
            np.vstack([encoder.encode_query(p) for p in probes]) * probe_reference, 1
        )
        result[name] = {
            "probes_min_cosine": round(float(on_probes.min()), 5),
            "min_cosine": round(float(cosines.min()), 5),
            "p01_cosine": round(float(np.percentile(cosines, 1)), 5),
            "mean_cosine": round(float(cosines.mean()), 5),
            "kept": bool(min(cosines.min(), on_probes.min()) >= onnx_encoder.INT8_MIN_COSINE),
        }
    return result


# ---------------------------------------------------------------------------------------------
# Retrieval quality and memory


def retrieval(data: Path, minilm: str) -> dict[str, Any]:
    from benchmarks.retrieval import run_retrieval_benchmark

    result: dict[str, Any] = {}
    for runtime in ("torch", "auto"):
        say(f"retrieval benchmark, query_runtime={runtime}")
        settings = load_settings(
            cli_values={"text_encoder": minilm, "query_runtime": runtime, "device": "cpu"}
        ).settings
        found = run_retrieval_benchmark(
            settings, data, paraphrases=HERE / "data" / "pubmedqa_paraphrases.json"
        )
        label = "onnx" if runtime == "auto" else "torch"
        result[label] = {
            "pubmedqa": {method: found[method] for method in ("dense", "hybrid")},
            "paraphrases": {method: found["paraphrase"][method] for method in ("dense", "hybrid")},
        }
    return result


_RSS_PROBE = """
import json, os, sys
from pathlib import Path

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
if sys.argv[1] == "onnx":
    from suwen.indexes.onnx_encoder import OnnxQueryEncoder
    encoder = OnnxQueryEncoder.open(Path(sys.argv[2]))
else:
    from suwen.indexes.text_encoder import load_text_encoder
    encoder = load_text_encoder(sys.argv[2], device="cpu")
encoder.encode_query("Do statins reduce mortality after a first myocardial infarction?")
print(json.dumps({"before": before, "after_query": rss(), "torch": "torch" in sys.modules}))
"""


def fresh_process_rss(runtime: str, target: str) -> dict[str, Any]:
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, runtime, target],
        capture_output=True,
        text=True,
        check=True,
    )
    sizes = json.loads(probe.stdout.strip().splitlines()[-1])
    return {
        "python_mb": round(sizes["before"] / 2**20, 1),
        "after_query_mb": round(sizes["after_query"] / 2**20, 1),
        "torch_imported": sizes["torch"],
    }


# ---------------------------------------------------------------------------------------------


def print_tables(payload: dict[str, Any]) -> None:
    threads = payload["thread_counts"]
    table = Table(
        title="one query encoded (PubMedQA questions): p50 ms wall on "
        + " / ".join(f"{t}" for t in threads)
        + " thread(s); min cosine to eager on the real MiniLM (probes / 1000 questions)"
    )
    table.add_column("runtime")
    for label in payload["latency"]:
        table.add_column(label, justify="right")
    table.add_column("min cosine", justify="right")
    agree = payload.get("agreement_minilm", {})
    for runtime in RUNTIMES:
        row = agree.get(runtime.removeprefix("onnx_"), {})
        table.add_row(
            runtime,
            *(
                " / ".join(f"{rows[f'{runtime}_{t}t']['p50_ms']:.1f}" for t in threads)
                for rows in payload["latency"].values()
            ),
            f"{row['probes_min_cosine']} / {row['min_cosine']}" if row else "",
        )
    console.print(table)
    for scheme in quant_candidates.REJECTED:
        row = agree.get(scheme)
        if row:
            console.print(
                f"agreement only, {scheme}: min cosine {row['probes_min_cosine']} (probes) / "
                f"{row['min_cosine']} (questions)"
            )
    for label, row in payload.get("fresh_process_rss", {}).items():
        console.print(f"fresh process, {label}: {row}")
    if "retrieval" in payload:
        for runtime, rows in payload["retrieval"].items():
            console.print(f"retrieval with query runtime {runtime}: {json.dumps(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--questions", type=int, default=TIMED_QUESTIONS, help="timed per run")
    parser.add_argument("--no-retrieval", action="store_true")
    parser.add_argument(
        "--threads",
        default="1,2",
        help="thread counts to time (on an oversubscribed machine two spinning threads can be "
        "far slower than one)",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "query_encoder.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    minilm = minilm_or_exit()
    questions = pubmedqa_questions(args.data)
    timed = questions[: args.questions]
    thread_counts = tuple(int(t) for t in args.threads.split(","))
    payload: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), **processor(), "load_at_start": load()},
        "medcpt_shape": {
            **medcpt_shape.MEDCPT_QUERY_CONFIG,
            "weights": "random (shape only)",
            "tokenizer": "BERT uncased WordPiece, 30522 tokens (the MiniLM package's vocab)",
        },
        "minilm": portable(minilm),
        "timed_questions": len(timed),
        "passes": args.passes,
        "thread_counts": list(thread_counts),
        "latency": {},
    }
    with tempfile.TemporaryDirectory(prefix="suwen-query-encoder-") as tmp:
        work = Path(tmp)
        shape_dir = medcpt_shape.build(work / "medcpt-shape", Path(minilm))
        models = {"medcpt_shape": str(shape_dir), "minilm": minilm}
        for label, path in models.items():
            eager = load_text_encoder(path, device="cpu")
            payload["latency"][label] = latencies(
                label, eager, work / label, timed, args.passes, thread_counts
            )
            write_json(args.output, payload)
        say("agreement with the eager model on the real MiniLM, all PubMedQA questions")
        minilm_eager = load_text_encoder(minilm, device="cpu")
        payload["agreement_minilm"] = agreement(minilm_eager, work / "agreement", questions)
        payload["product_export"] = {}
        payload["fresh_process_rss"] = {}
        for label, path in models.items():
            settings = Settings(home=work / "home", text_encoder=path, device="cpu")  # type: ignore[arg-type]
            started = time.perf_counter()  # first use: load the eager model, export, check
            exported = onnx_query_encoder(settings)
            assert exported is not None, f"{label}: no export"
            payload["product_export"][label] = {
                "export_s": round(time.perf_counter() - started, 1),
                "precision": exported.precision,
                "probe_min_cosine": exported.record.min_cosine,
                "candidates": exported.record.candidates,
            }
            say(f"{label}: resident memory of a fresh process")
            payload["fresh_process_rss"][f"{label}_onnx"] = fresh_process_rss(
                "onnx", str(exported.directory)
            )
            payload["fresh_process_rss"][f"{label}_torch_trace"] = fresh_process_rss("torch", path)
        write_json(args.output, payload)
    if not args.no_retrieval:
        payload["retrieval"] = retrieval(args.data, minilm)
    payload["machine"]["load_at_end"] = load()
    write_json(args.output, payload)
    print_tables(payload)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
