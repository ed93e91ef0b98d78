"""Does `suwen batch` keep a vLLM server as busy as a bare concurrent loop would?

The same VQA-RAD test questions (image + question, from shared/data) are answered on ONE vLLM
server, in one run, three ways:

- batch: ``suwen batch``'s own code (``load_questions`` + ``run_batch``: image checks, the
  plain-mode agent, fsynced JSONL lines) on the agent that ``runtime.open_agent`` assembles,
  as configured by default: after each closed-question answer one more one-token request
  measures the answer's confidence (setting ``confidence``), so it does more model work;
- batch-equal: the same with ``confidence`` off, one request per question like the bare loop;
- sequential: the same agent, one question at a time (what batch replaces);
- bare: a concurrent loop of client calls with no agent and no bookkeeping, sending exactly the
  request plain mode sends (same messages, image, max_tokens, temperature, one reply).

Equal work. Plain mode makes one answer request per question; the requests, prompt tokens and
answer (completion) tokens of every pass are counted, so the table shows that batch-equal and
the bare loop sent the same requests (same prompts and images: the same prompt tokens; the same
max_tokens and temperature: the same answer tokens). A reply the tiny random model leaves empty
(or a request that fails) becomes an error line in batch (``answer_failure``), so the bare
loop applies the same rule to its own replies (an empty or failed reply is an error); errors per
pass are shown beside each method's rates, which are given both per question sent and per answer
accepted, and "same errors" says whether every pass of the method failed exactly the questions
every bare pass failed. Warm-up passes send every request once first (a bare pass, and a
default batch pass for the confidence probes), so vLLM's prefix and image caches are equally
warm for every measured pass; the concurrent methods then alternate
(bare, batch, batch-equal, bare, ...) and each reports its median pass. Target: batch-equal's
accepted answers per second >= 0.9 x the bare loop's. Each pass also reports this process's
CPU time per question (the server's is not counted) and the 1-minute load average when it
started: on a shared machine wall-clock rates are only comparable within one run.

    .venv/bin/python -m benchmarks.batch_throughput                 # tiny model, own server
    .venv/bin/python -m benchmarks.batch_throughput --url http://127.0.0.1:8000 --vlm DIR

Prints a table and writes benchmarks/results/batch_throughput.json (the runs it held before
kept under ``previous_runs``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_seconds, portable, processor, shared_data_default, write_json
from suwen.agent import prompts
from suwen.agent.graph import SuwenAgent
from suwen.batch import answer_failure, load_questions, run_batch
from suwen.config import Settings
from suwen.errors import ModelError
from suwen.files import atomic_write_bytes, atomic_write_text
from suwen.llm.base import VisionLanguageModel, recording
from suwen.llm.server import ManagedServer, free_port
from suwen.medimage import load_image
from suwen.privacy import private_dir
from suwen.runtime import AgentAnswerer, open_agent
from suwen.types import Question

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "batch_throughput.json"
TARGET = 0.9
HOST = "127.0.0.1"


@dataclass
class Pass:
    method: str
    seconds: float
    questions: int
    prompt_tokens: int
    completion_tokens: int
    requests: int
    failed: list[str]  # ids of the questions whose reply was not accepted
    cpu_seconds: float  # this process (user + system, all threads)
    load: float  # 1-minute load average when the pass started

    @property
    def cpu_ms_per_question(self) -> float:
        return 1000 * self.cpu_seconds / self.questions

    @property
    def per_second(self) -> float:
        return self.questions / self.seconds

    @property
    def accepted_per_second(self) -> float:
        return (self.questions - len(self.failed)) / self.seconds


# -- the questions ------------------------------------------------------------------------------


def write_question_folder(data: Path, count: int, folder: Path) -> Path:
    """The first ``count`` VQA-RAD test questions as a batch folder (images copied in: a batch
    refuses images that live outside its folder)."""
    items = json.loads((data / "vqa_rad" / "testset.json").read_text(encoding="utf-8"))[:count]
    if len(items) < count:
        raise SystemExit(f"only {len(items)} VQA-RAD test questions in {data}")
    private_dir(folder)
    lines = []
    for item in items:
        name = item["image_name"]
        if not (folder / name).exists():
            atomic_write_bytes(folder / name, (data / "vqa_rad" / "images" / name).read_bytes())
        row = {"id": str(item["qid"]), "image": name, "question": item["question"]}
        lines.append(json.dumps(row))
    atomic_write_text(folder / "questions.jsonl", "\n".join(lines) + "\n")
    return folder


# -- the three ways -----------------------------------------------------------------------------


async def timed(method: str, count: int, work: Callable[[], Awaitable[list[str]]]) -> Pass:
    load = os.getloadavg()[0]
    with recording() as log:
        cpu, started = cpu_seconds(), time.perf_counter()
        failed = await work()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    tokens = (log.prompt_tokens, log.completion_tokens)
    return Pass(method, seconds, count, *tokens, len(log.records), sorted(failed), cpu, load)


async def bare_loop(
    model: VisionLanguageModel,
    settings: Settings,
    questions: list[tuple[str, Question]],
    concurrency: int,
) -> list[str]:
    """Exactly plain mode's request per question, ``concurrency`` at a time, nothing else; the
    ids whose reply batch would not accept (empty, or failed)."""
    gate = asyncio.Semaphore(concurrency)
    failed: list[str] = []

    async def one(item_id: str, question: Question) -> None:
        async with gate:
            image = load_image(Path(question.images[0]))
            messages = prompts.answer_messages(question, [image], None, [], [], plain=True)
            try:
                reply = await model.chat(
                    messages,
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    purpose="answer",
                )
            except ModelError:
                failed.append(item_id)
                return
            if not reply.text.strip():
                failed.append(item_id)

    await asyncio.gather(*(one(item_id, q) for item_id, q in questions))
    return failed


async def sequential_loop(agent: SuwenAgent, questions: list[tuple[str, Question]]) -> list[str]:
    failed = []
    for item_id, question in questions:
        if answer_failure(question, await agent.run(question, mode="plain")) is not None:
            failed.append(item_id)
    return failed


async def batch_run(agent: SuwenAgent, folder: Path, out: Path, concurrency: int) -> list[str]:
    """``suwen batch --plain``'s run: its answerer, its checks, its output file."""
    await asyncio.to_thread(out.unlink, missing_ok=True)
    answer = AgentAnswerer(agent, "plain")
    summary = await run_batch(load_questions(folder), out, answer, concurrency=concurrency)
    lines = (await asyncio.to_thread(out.read_text, encoding="utf-8")).splitlines()
    if len(lines) != summary.questions or not summary.complete:
        raise SystemExit(f"batch wrote {len(lines)} lines for {summary.questions} questions")
    # A random tiny model may reply with nothing but special tokens: batch records those as
    # errors (to be asked again), after the same model work as any other question.
    kinds = Counter(message for _, message in summary.errors)
    for message, count in kinds.items():
        print(f"  batch recorded {count} x {message!r}")
    return [item_id for item_id, _ in summary.errors]


async def measure(args: argparse.Namespace, settings: Settings, urls: list[str]) -> list[Pass]:
    work = Path(tempfile.mkdtemp(prefix="suwen-batch-bench-"))
    try:
        folder = write_question_folder(args.data, args.questions, work / "questions")
        questions = [
            (item.id, item.question)
            for item in load_questions(folder).items
            if item.question is not None
        ]
        notices: list[str] = []
        async with AsyncExitStack() as stack:
            agent = await stack.enter_async_context(
                open_agent(settings, urls, sessions=False, on_notice=notices.append)
            )
            unprobed = settings.model_copy(update={"confidence": False})
            equal = await stack.enter_async_context(
                open_agent(unprobed, urls, sessions=False, on_notice=notices.append)
            )
            methods = Methods(agent, equal, settings, folder, work, questions, args.concurrency)
            return await all_passes(methods, args.repeats, args.sequential)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class Methods:
    """The ways of answering the questions, each run as one timed pass."""

    agent: SuwenAgent  # as configured by default (confidence probe on)
    equal: SuwenAgent  # confidence off: one request per question, as bare
    settings: Settings
    folder: Path
    work: Path
    questions: list[tuple[str, Question]]
    concurrency: int

    async def bare(self, method: str = "bare") -> Pass:
        model, n, c = self.agent.nodes.model, len(self.questions), self.concurrency
        return await timed(method, n, lambda: bare_loop(model, self.settings, self.questions, c))

    async def batch(self, method: str, agent: SuwenAgent) -> Pass:
        out = self.work / f"answers-{method}.jsonl"
        run = partial(batch_run, agent, self.folder, out, self.concurrency)
        return await timed(method, len(self.questions), run)

    async def sequential(self) -> Pass:
        run = partial(sequential_loop, self.agent, self.questions)
        return await timed("sequential", len(self.questions), run)


async def all_passes(methods: Methods, repeats: int, sequential: bool) -> list[Pass]:
    """Warm-up first: every request each method sends (the bare loop's, which batch-equal
    sends too, and the default batch's confidence probes) once, so vLLM's prefix and image
    caches are equally warm for every measured pass. Then the methods alternate."""
    n = len(methods.questions)
    print(f"warm-up: {n} bare requests and one default batch pass (fills vLLM's caches)")
    await methods.bare("warm-up")
    await methods.batch("warm-up", methods.agent)
    passes = [await methods.sequential()] if sequential else []
    for repeat in range(repeats):
        passes.append(await methods.bare())
        passes.append(await methods.batch("batch", methods.agent))
        passes.append(await methods.batch("batch-equal", methods.equal))
        for done in passes[-3:]:
            print(f"{done.method} pass {repeat + 1}: {done.per_second:.2f} q/s")
    return passes


# -- report -------------------------------------------------------------------------------------


def summarize(passes: list[Pass]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for method in ("sequential", "bare", "batch", "batch-equal"):
        mine = [p for p in passes if p.method == method]
        if mine:
            summary[method] = method_summary(mine)
    bare = summary["bare"]
    if not bare["median_accepted_per_second"]:
        raise SystemExit(f"the bare loop had no reply accepted: {bare['failed_ids'][:3]}")
    for row in summary.values():
        row["vs_bare"] = row["median_questions_per_second"] / bare["median_questions_per_second"]
        row["accepted_vs_bare"] = (
            row["median_accepted_per_second"] / bare["median_accepted_per_second"]
        )
        # Every pass of the method failed exactly the questions every bare pass failed.
        row["same_questions_accepted_as_bare"] = row["failed_per_pass"] == bare["failed_per_pass"]
    return summary


def method_summary(mine: list[Pass]) -> dict[str, Any]:
    """The median pass of one method: its rates (per question sent and per answer accepted),
    the model work it did and the replies it did not accept."""
    rates = [p.per_second for p in mine]
    failed_per_pass = sorted({tuple(p.failed) for p in mine})
    return {
        "passes": len(mine),
        "median_questions_per_second": statistics.median(rates),
        "median_accepted_per_second": statistics.median(p.accepted_per_second for p in mine),
        "min_questions_per_second": min(rates),
        "max_questions_per_second": max(rates),
        "median_seconds": statistics.median(p.seconds for p in mine),
        "requests_per_pass": statistics.median(p.requests for p in mine),
        "prompt_tokens_per_pass": statistics.median(p.prompt_tokens for p in mine),
        "completion_tokens_per_pass": statistics.median(p.completion_tokens for p in mine),
        "errors_per_pass": statistics.median(len(p.failed) for p in mine),
        "median_cpu_ms_per_question": statistics.median(p.cpu_ms_per_question for p in mine),
        "load_at_start": [round(p.load, 2) for p in mine],
        "failed_ids": sorted({item for p in mine for item in p.failed}),
        "failed_per_pass": [list(ids) for ids in failed_per_pass],
    }


Column = tuple[str, Callable[[dict[str, Any]], str]]
TABLE: tuple[Column, ...] = (
    # Work done per pass: equal work shows as equal numbers in these four columns.
    ("requests/pass", lambda r: f"{r['requests_per_pass']:.0f}"),
    ("prompt tok/pass", lambda r: f"{r['prompt_tokens_per_pass']:.0f}"),
    ("answer tok/pass", lambda r: f"{r['completion_tokens_per_pass']:.0f}"),
    ("errors/pass", lambda r: f"{r['errors_per_pass']:.0f}"),
    ("same errors", lambda r: "yes" if r["same_questions_accepted_as_bare"] else "NO"),
    # Rates over every question sent and over accepted answers only, each beside bare's.
    ("sent q/s", lambda r: f"{r['median_questions_per_second']:.2f}"),
    ("sent vs bare", lambda r: f"{r['vs_bare']:.3f}"),
    ("accepted/s", lambda r: f"{r['median_accepted_per_second']:.2f}"),
    ("accepted vs bare", lambda r: f"{r['accepted_vs_bare']:.3f}"),
    (
        "sent q/s min..max",
        lambda r: f"{r['min_questions_per_second']:.2f}..{r['max_questions_per_second']:.2f}",
    ),
    ("passes", lambda r: str(int(r["passes"]))),
    ("CPU ms/q", lambda r: f"{r['median_cpu_ms_per_question']:.1f}"),
)


def print_table(summary: dict[str, dict[str, Any]], questions: int, settings: Settings) -> None:
    rows = [("method", *(name for name, _ in TABLE))]
    rows += [(method, *(cell(row) for _, cell in TABLE)) for method, row in summary.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\n{questions} VQA-RAD questions, concurrency {settings.concurrency}, every request "
        f"max_tokens {settings.max_tokens}, temperature {settings.temperature}"
    )
    for r in rows:
        cells = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print("  ".join([r[0].ljust(widths[0]), *cells]))


def bench_settings(args: argparse.Namespace, home: Path, vlm: str) -> Settings:
    return Settings(
        home=home,
        vlm=vlm,
        vllm_cpu_kvcache_gib=1,
        max_tokens=args.max_tokens,
        temperature=0.0,
        concurrency=args.concurrency,
        request_timeout=600.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", default=[], help="running vLLM server(s)")
    parser.add_argument("--vlm", default=None, help="model to serve (default: build the tiny one)")
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="passes of bare and of batch")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--no-sequential", dest="sequential", action="store_false", help="skip the slow pass"
    )
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    passes, settings = run(args)
    summary = summarize(passes)
    print_table(summary, args.questions, settings)
    print_verdict(summary)
    write_report(args.out, report(args, summary, passes))
    print(f"wrote {args.out}")


def run(args: argparse.Namespace) -> tuple[list[Pass], Settings]:
    """Every pass, on the server at ``--url`` or on a managed server of the tiny model."""
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="suwen-bench-")))
        vlm: str = args.vlm or str(scratch / "tiny-model")
        if args.vlm is None:
            from suwen.devtools.tiny_qwen import write_tiny_model

            write_tiny_model(Path(vlm))
        settings = bench_settings(args, scratch / "home", vlm)
        urls = list(args.url)
        if not urls:
            print(f"starting vLLM on {vlm} (about a minute on a CPU)")
            server = stack.enter_context(ManagedServer(settings, port=free_port(HOST), host=HOST))
            urls = [server.url]
            # The managed server admits only its own key; clients given its URL read it here.
            if server.api_key:
                os.environ["VLLM_API_KEY"] = server.api_key
        return asyncio.run(measure(args, settings, urls)), settings


def print_verdict(summary: dict[str, dict[str, Any]]) -> None:
    """Equal work: one request per question with the same prompt and answer length, answers
    accepted per second, the same acceptance rule applied to both methods' replies."""
    equal = summary["batch-equal"]
    ratio = equal["accepted_vs_bare"]
    print(
        f"\nbatch (confidence off) / bare accepted answers per second = {ratio:.3f} (target >= "
        f"{TARGET}): {'met' if ratio >= TARGET else 'NOT met'}; same questions accepted: "
        f"{equal['same_questions_accepted_as_bare']}; with the confidence probe: "
        f"{summary['batch']['accepted_vs_bare']:.3f}"
    )


def report(
    args: argparse.Namespace, summary: dict[str, dict[str, Any]], passes: list[Pass]
) -> dict[str, Any]:
    options = [f"--questions {args.questions}", f"--concurrency {args.concurrency}"]
    options += [f"--repeats {args.repeats}", f"--max-tokens {args.max_tokens}"]
    options += ([] if args.sequential else ["--no-sequential"]) + [f"--url {u}" for u in args.url]
    return {
        "command": "python -m benchmarks.batch_throughput " + " ".join(options),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            **processor(),
        },
        "model": "tiny random Qwen2.5-VL (suwen dev tiny-model)"
        if args.vlm is None
        else portable(args.vlm),
        "target_batch_vs_bare": TARGET,
        "target_compares": "batch-equal (confidence off: one request per question, as bare) "
        "on answers accepted per second, the same acceptance rule applied to both",
        "target_met": summary["batch-equal"]["accepted_vs_bare"] >= TARGET,
        "summary": summary,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "passes": [
            asdict(p)
            | {"questions_per_second": p.per_second, "accepted_per_second": p.accepted_per_second}
            for p in passes
        ],
    }


def write_report(path: Path, results: dict[str, Any]) -> None:
    """The new run first; the runs the file held before under ``previous_runs``, newest first
    (each without its own previous runs)."""
    earlier: list[Any] = []
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        earlier = [
            {k: v for k, v in old.items() if k != "previous_runs"},
            *old.get("previous_runs", []),
        ]
    write_json(path, results | {"previous_runs": earlier})


if __name__ == "__main__":
    main()
