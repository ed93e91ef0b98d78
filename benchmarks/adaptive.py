"""What plain, agent and adaptive mode cost per question, side by side in one run.

The same questions (VQA-RAD yes/no with their images, PubMedQA multiple choice; leakage guard
on) go through ``SuwenAgent.run`` in each mode, one at a time, and per question the script
records model calls, prompt and completion tokens, wall time, the confidence and, for
adaptive mode, which path it took. Adaptive answers plainly when the plain answer's
confidence reaches the threshold and runs the agent otherwise, so its cost is plain's on the
confident questions and plain + agent on the rest: it costs less than agent mode as soon as
some plain answers are confident (the script checks this and says so).

The threshold defaults to the median confidence of the plain run on these questions (greedy
decoding makes adaptive's plain pass identical), so about half the questions are confident;
``--threshold`` sets it instead. This measures COST only: on the tiny random checkpoint the
answers are noise, so whether adaptive beats both modes on accuracy and calibration needs
Lingshu on a GPU (see the README for that command).

Model: a running vLLM (``--url``), else a managed one on ``--vlm`` (default: the tiny
Qwen2.5-VL checkpoint built offline in a temporary folder, served on the CPU). Searches: small
in-memory searchers over the shared PubMedQA abstracts and VQA-RAD training captions (what
retrieval finds is not what this measures).

    flock /tmp/suwen-vllm.lock .venv/bin/python -m benchmarks.adaptive --per-set 6

Prints a table and writes benchmarks/results/adaptive.json.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from benchmarks.agent_overhead import fake_searchers, questions
from benchmarks.common import portable, shared_data_default, write_json
from suwen.agent.confidence import PROBE_PURPOSE
from suwen.agent.graph import SuwenAgent
from suwen.config import Settings
from suwen.llm.base import CallLog, recording
from suwen.types import AgentResult, Mode

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "adaptive.json"
MODES: tuple[Mode, ...] = ("plain", "agent", "adaptive")


def tiny_settings(model: str, home: Path, url: str | None) -> Settings:
    """The tests' settings for the tiny checkpoint on a CPU (tests/fixtures_vllm.py)."""
    return Settings.model_validate(
        {
            "home": home,
            "vlm": model,
            "vllm_url": [url] if url else [],
            "vllm_cpu_kvcache_gib": 1,
            "vllm_extra_args": ["--enforce-eager"],
            "vllm_startup_timeout": 900.0,
            "request_timeout": 300.0,
            "max_tokens": 64,
            "rounds": 1,
        }
    )


def row_of(sample_id: str, result: AgentResult, wall: float, log: CallLog) -> dict[str, Any]:
    probes = [r for r in log.records if r.purpose == PROBE_PURPOSE]
    return {
        "id": sample_id,
        "model_calls": result.model_calls,
        "prompt_tokens": result.tokens.prompt,
        "completion_tokens": result.tokens.completion,
        "wall": round(wall, 4),
        "confidence": result.confidence,
        "confidence_source": result.confidence_source,
        "short_answer": result.short_answer,
        "path": result.route.path if result.route else None,
        "probe_calls": len(probes),
        "probe_prompt_tokens": sum(r.prompt_tokens for r in probes),
        "probe_completion_tokens": sum(r.completion_tokens for r in probes),
        "probe_seconds": round(sum(r.seconds for r in probes), 4),
        "changed": result.route.changed if result.route else None,
    }


async def run_mode(agent: SuwenAgent, samples: list[Any], mode: Mode) -> list[dict[str, Any]]:
    rows = []
    for sample in samples:
        started = time.perf_counter()
        with recording() as log:
            result = await agent.run(sample.to_question(), mode=mode)
        rows.append(row_of(sample.id, result, time.perf_counter() - started, log))
        print(f"  {mode} {sample.id}: {rows[-1]['wall']:.2f}s", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return statistics.fmean(float(row[key]) for row in rows)

    routed = [row["path"] for row in rows if row["path"] is not None]
    return {
        "questions": len(rows),
        "calls_per_question": mean("model_calls"),
        "prompt_tokens_per_question": mean("prompt_tokens"),
        "completion_tokens_per_question": mean("completion_tokens"),
        "wall_per_question": mean("wall"),
        "probe_calls_per_question": mean("probe_calls"),
        "probe_prompt_tokens_per_question": mean("probe_prompt_tokens"),
        "probe_completion_tokens_per_question": mean("probe_completion_tokens"),
        "probe_seconds_per_question": mean("probe_seconds"),
        "retrieved_share": routed.count("agent") / len(routed) if routed else None,
    }


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from suwen.llm.server import open_model

    work = Path(tempfile.mkdtemp(prefix="suwen-adaptive-"))
    vlm = args.vlm
    if vlm is None:
        from suwen.devtools.tiny_qwen import write_tiny_model

        vlm = str(work / "tiny-qwen")
        write_tiny_model(Path(vlm))
    settings = tiny_settings(vlm, work / "home", args.url)
    samples = questions(args.data, args.per_set, work / "cache")
    text, images = fake_searchers(args.data)
    runs: dict[str, list[dict[str, Any]]] = {}
    async with AsyncExitStack() as stack:
        model = await stack.enter_async_context(open_model(settings, settings.vllm_url))
        # One untimed question: first-use set-up is not per-question cost.
        await SuwenAgent(settings, model, text, images).run(samples[0].to_question())
        runs["plain"] = await run_mode(SuwenAgent(settings, model, text, images), samples, "plain")
        confidences = [r["confidence"] for r in runs["plain"] if r["confidence"] is not None]
        threshold = args.threshold
        if threshold is None:
            threshold = statistics.median(confidences) if confidences else 1.0
        adaptive_settings = settings.model_copy(update={"adaptive_threshold": threshold})
        runs["agent"] = await run_mode(SuwenAgent(settings, model, text, images), samples, "agent")
        adaptive = SuwenAgent(adaptive_settings, model, text, images)
        runs["adaptive"] = await run_mode(adaptive, samples, "adaptive")
    return {
        "model": portable(args.vlm) if args.vlm else "tiny Qwen2.5-VL (suwen dev tiny-model)",
        "server": "running vLLM" if args.url else "managed vLLM on the CPU (--enforce-eager)",
        "searchers": "in-memory over shared PubMedQA abstracts / VQA-RAD captions",
        "questions": f"{args.per_set} VQA-RAD + {args.per_set} PubMedQA (leakage guard on)",
        "threshold": threshold,
        "threshold_origin": "--threshold" if args.threshold is not None else "median plain",
        "rows": runs,
    }


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    header = f"{'mode':<9} {'n':>3} {'calls/q':>8} {'prompt tok/q':>13} {'out tok/q':>10}"
    header += f" {'wall s/q':>9} {'retrieved':>10} {'probe calls/tok/s per q':>24}"
    print(header)
    for mode, s in summary.items():
        retrieved = "-" if s["retrieved_share"] is None else f"{s['retrieved_share']:.2f}"
        print(
            f"{mode:<9} {s['questions']:>3} {s['calls_per_question']:>8.2f} "
            f"{s['prompt_tokens_per_question']:>13.0f} {s['completion_tokens_per_question']:>10.1f}"
            f" {s['wall_per_question']:>9.2f} {retrieved:>10}"
            f" {s['probe_calls_per_question']:>7.2f} /"
            f" {s['probe_prompt_tokens_per_question']:>5.0f} /"
            f" {s['probe_seconds_per_question']:>5.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-set", type=int, default=6, help="Questions per benchmark.")
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--vlm", default=None, help="Model dir or id (default: tiny Qwen).")
    parser.add_argument("--url", default=None, help="A running vLLM server to use instead.")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    measured = asyncio.run(run_all(args))
    summary = {mode: summarize(measured["rows"][mode]) for mode in MODES}
    print_table(summary)
    cheaper = summary["adaptive"]["calls_per_question"] < summary["agent"]["calls_per_question"]
    confident = (summary["adaptive"]["retrieved_share"] or 0.0) < 1.0
    verdict = (
        "adaptive costs fewer calls per question than agent"
        if cheaper
        else "adaptive does NOT cost fewer calls per question than agent"
    )
    print(f"{verdict} (plain answers confident enough: {'some' if confident else 'none'})")
    results = {
        **{k: v for k, v in measured.items() if k != "rows"},
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "summary": summary,
        "adaptive_cheaper_than_agent": cheaper,
        "rows": measured["rows"],
    }
    write_json(args.out, results)
    print(f"wrote {portable(args.out)}")


if __name__ == "__main__":
    main()
