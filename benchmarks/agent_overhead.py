"""What one agent question costs, and how much of its wall time is the agent's own orchestration.

For 20 VQA-RAD and 20 PubMedQA test questions (loaded as the evaluation loads them, leakage guard
on), runs ``SuwenAgent.run`` one question at a time, with the SQLite session store, and records
per question: model calls, prompt and completion tokens, wall time per node, and the
orchestration overhead = wall time minus the time inside model calls and searches. Time "inside"
is the union of the intervals spent awaiting the model (each streamed token's wait counts,
the agent's handling of the token does not) or running a search, so concurrent reread requests
are not double counted. The target is overhead < 5% of the total.

Model: ``--model vllm`` uses a running server (``--url``) or starts one on ``--vlm``;
``--model fake`` uses the scripted test model with a latency model (per request + prefill +
decode throughput, defaults close to a 7B VLM on one GPU). Searches use the real indexes in
``--home`` (its suwen.toml applies) when they exist, else small in-memory searchers over the
shared PubMedQA abstracts and VQA-RAD training captions.

    .venv/bin/python -m benchmarks.agent_overhead --model fake \
        --out benchmarks/results/agent_overhead_fake.json

On the tiny model with real indexes (MiniLM text index of PubMedQA's 1000 abstracts, tiny
BiomedCLIP-shaped image index of the VQA-RAD train-only images), in a home whose suwen.toml
sets text_encoder (MiniLM dir), image_encoder (tiny-clip dir), device = "cpu",
vllm_cpu_kvcache_gib = 1 and max_tokens = 256, and T/cases/ holding those images with a
manifest.jsonl (path, id, caption = the image's train questions and answers, body_part), built
as tests/fixtures_images.py builds its corpus:

    suwen dev tiny-model T/tiny-qwen && suwen dev tiny-clip T/tiny-clip
    SUWEN_HOME=T/home suwen index text ../shared/data/pubmedqa/ori_pqal.json --format pubmedqa
    SUWEN_HOME=T/home suwen index images T/cases/manifest.jsonl
    .venv/bin/python -m benchmarks.agent_overhead --model vllm --vlm T/tiny-qwen --home T/home

Prints a table and writes benchmarks/results/agent_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image
from pydantic import BaseModel

from benchmarks.common import shared_data_default, without_machine_paths
from suwen.agent.graph import SuwenAgent
from suwen.agent.sessions import open_sessions
from suwen.config import Settings, load_settings
from suwen.errors import IndexMissingError
from suwen.evaluate.benchmarks import LoadContext, Sample, load_pubmedqa, load_vqa_rad
from suwen.llm.base import ChatReply, LogprobRequest, Message, VisionLanguageModel
from suwen.tools.cases import ImageSearch
from suwen.tools.pubmed import TextSearch
from suwen.types import AgentResult, ImageHit, TextHit, TextMethod

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "agent_overhead.json"
NODES = ("look", "plan", "retrieve", "reread", "decide", "answer", "verify")
TARGET = 0.05
T = TypeVar("T", bound=BaseModel)


# -- time accounting ------------------------------------------------------------------------


@dataclass
class Clock:
    """Intervals spent waiting for the model or a search, for the question being run."""

    model: list[tuple[float, float]] = field(default_factory=list)
    search: list[tuple[float, float]] = field(default_factory=list)

    @contextmanager
    def timing(self, kind: Literal["model", "search"]) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            (self.model if kind == "model" else self.search).append((start, time.perf_counter()))

    def reset(self) -> None:
        self.model.clear()
        self.search.clear()


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


class TimedModel:
    """Delegates to a model, timing every wait on it."""

    def __init__(self, inner: VisionLanguageModel, clock: Clock) -> None:
        self.inner, self.clock = inner, clock

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
        prefill: str | None = None,
        logprobs: LogprobRequest | None = None,
    ) -> ChatReply:
        with self.clock.timing("model"):
            return await self.inner.chat(
                messages,
                max_tokens=max_tokens,
                temperature=temperature,
                purpose=purpose,
                prefill=prefill,
                logprobs=logprobs,
            )

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> AsyncIterator[str]:
        pieces = aiter(
            self.inner.stream(
                messages, max_tokens=max_tokens, temperature=temperature, purpose=purpose
            )
        )
        while True:
            with self.clock.timing("model"):
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    return
            yield piece

    async def structured(
        self,
        messages: list[Message],
        schema: type[T],
        *,
        max_tokens: int | None = None,
        purpose: str = "",
    ) -> T:
        with self.clock.timing("model"):
            return await self.inner.structured(
                messages, schema, max_tokens=max_tokens, purpose=purpose
            )


class TimedText:
    def __init__(self, inner: TextSearch, clock: Clock) -> None:
        self.inner, self.clock = inner, clock

    def search(
        self,
        query: str,
        k: int = 10,
        *,
        method: TextMethod = "hybrid",
        exclude_pmids: Collection[str] = (),
    ) -> list[TextHit]:
        with self.clock.timing("search"):
            return self.inner.search(query, k, method=method, exclude_pmids=exclude_pmids)


class TimedImages:
    def __init__(self, inner: ImageSearch, clock: Clock) -> None:
        self.inner, self.clock = inner, clock

    def search_image(
        self, image: Image.Image, k: int = 5, *, exclude_sha256: Collection[str] = ()
    ) -> list[ImageHit]:
        with self.clock.timing("search"):
            return self.inner.search_image(image, k, exclude_sha256=exclude_sha256)


# -- what is measured -----------------------------------------------------------------------


def questions(data: Path, per_set: int, cache: Path) -> list[Sample]:
    context = LoadContext(data=data, cache_dir=cache)
    return load_vqa_rad(context)[:per_set] + load_pubmedqa(context)[:per_set]


def fake_searchers(data: Path) -> tuple[TextSearch, ImageSearch]:
    """In-memory stand-ins over real shared data, for when no index has been built."""
    from tests.fake_search import FakeImageSearch, FakeTextSearch, case_hit, text_hit

    labelled = json.loads((data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    passages = [
        text_hit(pmid, item["QUESTION"], " ".join(item["CONTEXTS"]), year=None)
        for pmid, item in labelled.items()
    ]
    train = json.loads((data / "vqa_rad" / "trainset.json").read_text(encoding="utf-8"))
    captions: dict[str, str] = {}
    for row in train:
        captions.setdefault(row["image_name"], f"{row['question']} {row['answer']}.")
    cases = [(case_hit(name, caption), name) for name, caption in list(captions.items())[:50]]
    return FakeTextSearch(passages), FakeImageSearch(cases)


async def real_searchers(settings: Settings, stack: AsyncExitStack) -> tuple[Any, Any]:
    """The searchers over the indexes in the data home (None where an index is missing)."""
    from contextlib import AbstractAsyncContextManager

    from suwen.runtime import current_backends

    backends = current_backends()
    found: list[Any] = []
    for opener, name in (
        (backends.open_text, settings.text_index),
        (backends.open_images, settings.image_index),
    ):
        try:
            opening: Any = opener(settings, name)  # type: ignore[operator]
            if isinstance(opening, AbstractAsyncContextManager):
                found.append(await stack.enter_async_context(opening))
            else:
                found.append(stack.enter_context(opening))
        except (IndexMissingError, ImportError):
            found.append(None)
    return found[0], found[1]


def latency_model(
    per_request: float, prefill_tps: float, decode_tps: float
) -> Any:  # Callable[[int, int], float]
    return lambda prompt, completion: per_request + prompt / prefill_tps + completion / decode_tps


def row_of(sample: Sample, result: AgentResult, clock: Clock, wall: float) -> dict[str, Any]:
    model = covered(clock.model)
    search = covered(clock.search)
    inside = covered(clock.model + clock.search)
    return {
        "id": sample.id,
        "benchmark": sample.benchmark,
        "model_calls": result.model_calls,
        "prompt_tokens": result.tokens.prompt,
        "completion_tokens": result.tokens.completion,
        "rounds": result.rounds,
        "evidence": len(result.evidence),
        "citations": len(result.citations),
        "degraded": [e.node for e in result.trace if e.degraded],
        "nodes": {node: round(result.timings.get(node, 0.0), 4) for node in NODES},
        "wall": round(wall, 4),
        "model_seconds": round(model, 4),
        "search_seconds": round(search, 4),
        "overhead_seconds": round(wall - inside, 4),
        "overhead_fraction": round((wall - inside) / wall, 5) if wall else 0.0,
    }


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    home = Path(args.home or tempfile.mkdtemp(prefix="suwen-bench-"))
    # The home's suwen.toml applies (it names the encoders its indexes were built with).
    overrides: dict[str, Any] = {"home": str(home), "vlm": args.vlm, "vllm_url": args.url or None}
    settings = load_settings(cli_values=overrides).settings
    clock = Clock()
    async with AsyncExitStack() as stack:
        model: VisionLanguageModel
        if args.model == "fake":
            from tests.fake_model import FakeModel

            delay = latency_model(args.per_request, args.prefill_tps, args.decode_tps)
            model = FakeModel(delay=delay)
            model_label = (
                f"scripted fake, {args.per_request * 1000:.0f} ms/request + "
                f"{args.prefill_tps:.0f} prompt tok/s + {args.decode_tps:.0f} output tok/s"
            )
        else:
            from suwen.llm.server import open_model

            model = await stack.enter_async_context(open_model(settings, list(args.url)))
            model_label = f"vLLM: {args.url or settings.vlm}"
        text, images = await real_searchers(settings, stack)
        search_label = "real indexes"
        if text is None and images is None:
            text, images = fake_searchers(args.data)
            search_label = "in-memory searchers over shared PubMedQA abstracts / VQA-RAD captions"
        saver = await stack.enter_async_context(open_sessions(settings))
        agent = SuwenAgent(
            settings,
            TimedModel(model, clock),
            TimedText(text, clock) if text is not None else None,
            TimedImages(images, clock) if images is not None else None,
            checkpointer=saver,
        )
        samples = questions(args.data, args.per_set, home / "cache")
        # One untimed question first: imports and first-use set-up happen once per process,
        # they are not the per-question orchestration this measures (reported as cold_start).
        clock.reset()
        started = time.perf_counter()
        warm = await agent.run(samples[0].to_question(), thread_id="warm-up")
        cold = row_of(samples[0], warm, clock, time.perf_counter() - started)
        rows = []
        for sample in samples:
            clock.reset()
            started = time.perf_counter()
            result = await agent.run(sample.to_question(), thread_id=sample.id)
            rows.append(row_of(sample, result, clock, time.perf_counter() - started))
            print(f"  {sample.id}: {rows[-1]['wall']:.2f}s", flush=True)
    return {"model": model_label, "searchers": search_label, "rows": rows, "cold_start": cold}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float:
        return statistics.fmean(row[key] for row in rows)

    wall = sum(row["wall"] for row in rows)
    overhead = sum(row["overhead_seconds"] for row in rows)
    return {
        "questions": len(rows),
        "model_calls": mean("model_calls"),
        "prompt_tokens": mean("prompt_tokens"),
        "completion_tokens": mean("completion_tokens"),
        "rounds": mean("rounds"),
        "nodes": {n: statistics.fmean(r["nodes"][n] for r in rows) for n in NODES},
        "wall": mean("wall"),
        "model_seconds": mean("model_seconds"),
        "search_seconds": mean("search_seconds"),
        "overhead_seconds": mean("overhead_seconds"),
        "overhead_fraction": overhead / wall if wall else 0.0,
        "median_overhead_fraction": statistics.median(row["overhead_fraction"] for row in rows),
        "max_overhead_fraction": max(row["overhead_fraction"] for row in rows),
        "degraded_questions": sum(bool(row["degraded"]) for row in rows),
    }


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    sets = list(summary)
    lines = [("per question (mean)", *sets)]
    for key in ("model_calls", "prompt_tokens", "completion_tokens", "rounds"):
        lines.append((key, *(f"{summary[s][key]:.1f}" for s in sets)))
    for node in NODES:
        lines.append((f"{node} (s)", *(f"{summary[s]['nodes'][node]:.3f}" for s in sets)))
    for key in ("wall", "model_seconds", "search_seconds", "overhead_seconds"):
        label = f"{key.replace('_seconds', '')} (s)"
        lines.append((label, *(f"{summary[s][key]:.3f}" for s in sets)))
    lines.append(("overhead / wall", *(f"{summary[s]['overhead_fraction']:.2%}" for s in sets)))
    lines.append(
        ("median question", *(f"{summary[s]['median_overhead_fraction']:.2%}" for s in sets))
    )
    lines.append(("worst question", *(f"{summary[s]['max_overhead_fraction']:.2%}" for s in sets)))
    lines.append(("degraded questions", *(str(summary[s]["degraded_questions"]) for s in sets)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["fake", "vllm"], default="fake")
    parser.add_argument("--url", action="append", default=[], help="running vLLM server(s)")
    parser.add_argument("--vlm", default=None, help="model to serve when no --url (e.g. tiny)")
    parser.add_argument("--home", default=None, help="data home with indexes (default: temp)")
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--per-set", type=int, default=20)
    parser.add_argument("--per-request", type=float, default=0.015)
    parser.add_argument("--prefill-tps", type=float, default=5000.0)
    parser.add_argument("--decode-tps", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    measured = asyncio.run(run_all(args))
    rows = measured["rows"]
    summary = {
        name: summarize([r for r in rows if r["benchmark"] == name])
        for name in dict.fromkeys(r["benchmark"] for r in rows)
    }
    summary["all"] = summarize(rows)
    print(f"\nmodel: {measured['model']}\nsearch: {measured['searchers']}\n")
    print_table(summary)
    verdict = summary["all"]["overhead_fraction"] < TARGET
    print(f"\noverhead target < {TARGET:.0%}: {'met' if verdict else 'NOT met'}")
    cold = measured["cold_start"]
    print(f"cold start (untimed first question): {cold['overhead_seconds']:.3f}s overhead")
    report = {
        "command": without_machine_paths(
            " ".join(["python -m benchmarks.agent_overhead", *sys.argv[1:]])
        ),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "model": without_machine_paths(measured["model"]),
        "searchers": without_machine_paths(measured["searchers"]),
        "target_overhead_fraction": TARGET,
        "target_met": verdict,
        "summary": summary,
        "cold_start": measured["cold_start"],
        "questions": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
