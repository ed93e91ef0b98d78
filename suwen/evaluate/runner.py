"""The evaluation loop: each benchmark question through each mode, scored twice, kept as it ends.

Per benchmark and mode, one JSONL file of ``SampleRecord`` lines, appended and fsynced as each
question finishes; a re-run reads it back and asks only the questions not yet there. Plain mode
sends MedEvalKit's prompt (with the image) straight to the model; agent mode hands the question,
its answer form and the leakage guard to an ``Answerer`` (``SuwenAgent.run`` in agent mode) and
scores its ``short_answer``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from suwen.errors import InputError, SuwenError
from suwen.evaluate import prompts
from suwen.evaluate import scoring as suwen_scoring
from suwen.evaluate import scoring_medevalkit as mek
from suwen.evaluate.benchmarks import Benchmark, Sample, benchmark_named, load_benchmark
from suwen.evaluate.calibration import is_dev
from suwen.evaluate.confidence_eval import AnswerJudgement, judgement_of
from suwen.llm.base import Message, VisionLanguageModel, recording
from suwen.types import AgentResult, Question

Mode = Literal["plain", "agent", "adaptive"]
MODES: tuple[Mode, ...] = ("plain", "agent", "adaptive")
DEFAULT_MODES: tuple[Mode, ...] = ("plain", "agent")
JUDGE_MAX_TOKENS = 512


class Answerer(Protocol):
    """What agent mode needs: one question in, one ``AgentResult`` out (its ``short_answer``
    in the benchmark's form is what gets scored)."""

    async def __call__(self, question: Question) -> AgentResult: ...


class Reply(BaseModel):
    """What a mode produced for one question."""

    response: str = Field(description="The text that is scored")
    full_answer: str = ""
    citations: list[dict[str, Any]] = Field(default_factory=list)
    evidence_ids: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_calls: int = 0
    judged: AnswerJudgement = Field(default_factory=lambda: AnswerJudgement())


class JudgeRecord(BaseModel):
    raw: str
    suwen: bool | None = Field(description="Suwen's reading (None: unreadable, rule stands)")
    medevalkit: bool = Field(description="MedEvalKit's reading: exactly '0' in <judge>")


class SampleRecord(BaseModel):
    """One line of a samples file: the question, what came back, and both verdicts."""

    id: str
    benchmark: str
    mode: Mode
    kind: str
    question: str
    prompt: str | None = Field(None, description="The MedEvalKit prompt (plain mode)")
    gold: str
    options: dict[str, str] = Field(default_factory=dict)
    question_type: str | None = None
    modality: str | None = None
    body_part: str | None = None
    response: str
    full_answer: str = ""
    parsed: str | None = None
    correct: bool | None = Field(description="Suwen's verdict (the headline)")
    rule_correct: bool | None = Field(None, description="Suwen's verdict before the judge")
    unparsed: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    medevalkit: mek.MekSample
    judge: JudgeRecord | None = None
    citations: list[dict[str, Any]] = Field(default_factory=list)
    evidence_ids: list[str] = Field(default_factory=list)
    latency: float
    tokens: dict[str, int] = Field(default_factory=dict)
    model_calls: int = 0
    leakage_guard: bool = True
    finished_at: str = ""
    # Confidence, abstention and the adaptive route (suwen.evaluate.confidence_eval).
    confidence: float | None = None
    confidence_raw: float | None = None
    confidence_source: str = "none"
    calibrated: bool = False
    abstained: bool = Field(False, description="Below --abstain-below: neither right nor wrong")
    route: dict[str, Any] | None = None
    cited_relevance: float | None = None
    all_claims_cited: bool | None = None

    @property
    def correct_medevalkit(self) -> bool | None:
        return self.medevalkit.correct


Responder = Callable[[Sample], Awaitable[Reply]]
PlainConfidence = Callable[[Sample, list[Message], str], Awaitable[AnswerJudgement]]
Judge = Callable[[str, str, str], Awaitable[str]]
Progress = Callable[[str, Mode, int, int], None]


# --------------------------------------------------------------------------------------------
# The two modes and the judge


def _load_rgb(paths: Sequence[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read benchmark image: {exc}") from exc
    return images


def plain_responder(
    model: VisionLanguageModel,
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    judge_confidence: PlainConfidence | None = None,
) -> Responder:
    """Plain mode: MedEvalKit's prompt and the question's image(s) straight to the model
    (then, with ``judge_confidence``, the confidence probe of that reply)."""

    async def respond(sample: Sample) -> Reply:
        images = await asyncio.to_thread(_load_rgb, sample.images)
        message = Message(role="user", text=sample.prompt, images=images)
        with recording() as log:
            reply = await model.chat(
                [message], max_tokens=max_tokens, temperature=temperature, purpose="eval-plain"
            )
            judged = AnswerJudgement()
            if judge_confidence is not None:
                judged = await judge_confidence(sample, [message], reply.text)
        return Reply(
            response=reply.text,
            full_answer=reply.text,
            prompt_tokens=log.prompt_tokens,
            completion_tokens=log.completion_tokens,
            model_calls=log.calls,
            judged=judged,
        )

    return respond


def agent_responder(answerer: Answerer, *, guard: bool = True) -> Responder:
    """Agent (or adaptive) mode: the question (leakage guard on unless ``guard`` is False);
    the agent's ``short_answer`` is scored, its citations, evidence and confidence kept (the
    benchmark's own calibration map applies: the question names it as its family)."""

    async def respond(sample: Sample) -> Reply:
        question = sample.to_question(guard=guard).model_copy(update={"family": sample.benchmark})
        result = await answerer(question)
        return Reply(
            response=result.short_answer if result.short_answer is not None else "",
            full_answer=result.answer,
            citations=[c.model_dump(mode="json") for c in result.citations],
            evidence_ids=[e.key for e in result.evidence if e.kept],
            prompt_tokens=result.tokens.prompt,
            completion_tokens=result.tokens.completion,
            model_calls=result.model_calls,
            judged=judgement_of(result),
        )

    return respond


def model_judge(model: VisionLanguageModel) -> Judge:
    """MedEvalKit's judge prompt, answered by the same local model."""

    async def judge(question: str, response: str, gold: str) -> str:
        message = Message(role="user", text=prompts.judge_prompt(question, response, gold))
        reply = await model.chat(
            [message], max_tokens=JUDGE_MAX_TOKENS, temperature=0.0, purpose="eval-judge"
        )
        return reply.text

    return judge


# --------------------------------------------------------------------------------------------
# Scoring one reply


def _needs_judge(benchmark: Benchmark, sample: Sample) -> bool:
    return sample.kind == "open" or mek.judged_by_medevalkit(
        benchmark.medevalkit_family, sample.kind
    )


async def score_reply(
    benchmark: Benchmark,
    sample: Sample,
    mode: Mode,
    reply: Reply,
    *,
    judge: Judge | None,
    guard: bool,
    seed: int,
    latency: float,
) -> SampleRecord:
    """Both verdicts for one reply. With a judge, one judge call serves both scorers."""
    rule = suwen_scoring.score(sample.kind, reply.response, sample.gold, sample.options)
    medevalkit = mek.score_sample(
        benchmark.medevalkit_family,
        sample_id=sample.id,
        kind=sample.kind,
        gold=sample.gold,
        choices=sample.choices,
        options=sample.options,
        response=reply.response,
        extract_answer_tag=benchmark.extract_answer_tag,
        seed=seed,
    )
    final, judged = rule, None
    if judge is not None and _needs_judge(benchmark, sample) and reply.response.strip():
        said = suwen_scoring.extract_answer(reply.response)
        raw = await judge(sample.question, said, sample.gold)
        verdict = suwen_scoring.judge_verdict(raw)
        judged = JudgeRecord(raw=raw, suwen=verdict, medevalkit=mek.judge_says_correct(raw))
        if sample.kind == "open":
            final = suwen_scoring.apply_judge(rule, verdict)
    return SampleRecord(
        id=sample.id,
        benchmark=sample.benchmark,
        mode=mode,
        kind=sample.kind,
        question=sample.question,
        prompt=sample.prompt if mode == "plain" else None,
        gold=sample.gold,
        options=sample.options,
        question_type=sample.question_type,
        modality=sample.modality,
        body_part=sample.body_part,
        response=reply.response,
        full_answer=reply.full_answer,
        parsed=final.parsed,
        correct=final.correct,
        rule_correct=rule.correct,
        unparsed=final.unparsed,
        metrics=final.metrics,
        medevalkit=medevalkit,
        judge=judged,
        citations=reply.citations,
        evidence_ids=reply.evidence_ids,
        latency=latency,
        tokens={"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
        model_calls=reply.model_calls,
        leakage_guard=guard,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        **reply.judged.model_dump(),
    )


# --------------------------------------------------------------------------------------------
# Samples files: append + fsync per record, read back tolerating a torn last line


def samples_path(out: Path, benchmark: str, mode: Mode) -> Path:
    return out / benchmark / f"{mode}.jsonl"


def read_records(path: Path) -> list[SampleRecord]:
    """The finished records of a samples file. A last line cut off by a kill is dropped (and
    trimmed from the file, so the next append starts on a clean line)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    complete_end = raw.rfind(b"\n") + 1
    if complete_end < len(raw):
        with path.open("r+b") as handle:
            handle.truncate(complete_end)
            handle.flush()
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(raw[:complete_end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(SampleRecord.model_validate_json(line))
        except ValidationError as exc:
            raise InputError(f"{path}:{number}: not a sample record: {exc}") from exc
    return records


class _Appender:
    """One writer per file: whole lines, flushed and fsynced before the next one starts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lock = asyncio.Lock()

    async def append(self, record: SampleRecord) -> None:
        line = record.model_dump_json() + "\n"
        async with self.lock:
            await asyncio.to_thread(self._write, line)

    def _write(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


class ModeSummary(BaseModel):
    benchmark: str
    mode: Mode
    total: int
    already_done: int
    done_now: int
    failed: list[tuple[str, str]] = Field(default_factory=list, description="(id, error)")


async def run_mode(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    mode: Mode,
    respond: Responder,
    out: Path,
    *,
    concurrency: int = 4,
    judge: Judge | None = None,
    guard: bool = True,
    seed: int = 0,
    on_progress: Progress | None = None,
) -> ModeSummary:
    """Answer and score every sample not yet in the mode's samples file, ``concurrency`` at a
    time. A question whose model call fails (a SuwenError) is reported and left for the next
    run; anything else stops the run, keeping what finished."""
    path = samples_path(out, benchmark.name, mode)
    finished = {record.id for record in read_records(path)}
    pending = [s for s in samples if s.id not in finished]
    summary = ModeSummary(
        benchmark=benchmark.name,
        mode=mode,
        total=len(samples),
        already_done=len(samples) - len(pending),
        done_now=0,
    )
    appender = _Appender(path)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(sample: Sample) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                reply = await respond(sample)
                record = await score_reply(
                    benchmark,
                    sample,
                    mode,
                    reply,
                    judge=judge,
                    guard=guard,
                    seed=seed,
                    latency=time.perf_counter() - started,
                )
            except SuwenError as exc:
                summary.failed.append((sample.id, str(exc)))
                return
            await appender.append(record)
            summary.done_now += 1
            if on_progress is not None:
                on_progress(
                    benchmark.name, mode, summary.already_done + summary.done_now, summary.total
                )

    tasks = [asyncio.create_task(one(sample)) for sample in pending]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return summary


# --------------------------------------------------------------------------------------------
# A whole run


class EvalConfig(BaseModel):
    """Everything that decides what a run asks and how it scores."""

    benchmarks: list[str]
    data: Path | None = None
    modes: list[Mode] = Field(default_factory=lambda: list(DEFAULT_MODES))
    out: Path
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    concurrency: int = Field(4, ge=1)
    judge: bool = False
    allow_leak: bool = False
    max_tokens: int | None = None
    temperature: float = 0.0
    model: str = ""
    calibrate: bool = Field(False, description="Ask only the dev split, to fit calibration")
    abstain_below: float | None = Field(None, ge=0, le=1)


RUN_FILE = "run.json"
# Options that change a verdict (or which questions are asked): one value per run directory.
SCORING_OPTIONS = ("judge", "allow_leak", "model", "calibrate", "abstain_below")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def record_run(config: EvalConfig, selections: dict[str, list[str]]) -> None:
    """Write run.json (the options and each benchmark's selected ids); refuse to mix scoring
    options with an earlier run in the same directory."""
    path = config.out / RUN_FILE
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable run file: {exc}") from exc
        for option in SCORING_OPTIONS:
            before, now = earlier.get("config", {}).get(option), getattr(config, option)
            if before is not None and before != now:
                raise InputError(
                    f"{config.out}: earlier run used {option}={before!r}, this one {now!r}; "
                    "use another --out to keep verdicts comparable"
                )
        selections = {**earlier.get("selections", {}), **selections}
    config.out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, {"config": config.model_dump(mode="json"), "selections": selections})


def load_selected(config: EvalConfig, cache_dir: Path) -> dict[str, list[Sample]]:
    """Each benchmark's questions; with ``calibrate``, only those of the dev split."""
    selected = {
        benchmark_named(name).name: load_benchmark(
            name, config.data, cache_dir, limit=config.limit, seed=config.seed
        )
        for name in config.benchmarks
    }
    if config.calibrate:
        return {name: [s for s in items if is_dev(name, s.id)] for name, items in selected.items()}
    return selected


async def run_evaluation(
    config: EvalConfig,
    samples: dict[str, list[Sample]],
    *,
    model: VisionLanguageModel | None,
    answerer: Answerer | None,
    on_progress: Progress | None = None,
    adaptive: Answerer | None = None,
    plain_confidence: PlainConfidence | None = None,
) -> list[ModeSummary]:
    """Every selected benchmark in every requested mode; the judge (if on) is ``model``.
    ``adaptive`` answers adaptive mode; ``plain_confidence`` measures plain replies'."""
    if "plain" in config.modes and model is None:
        raise InputError("plain mode needs a model")
    if "agent" in config.modes and answerer is None:
        raise InputError("agent mode needs an agent")
    if "adaptive" in config.modes and adaptive is None:
        raise InputError("adaptive mode needs an agent")
    record_run(config, {name: [s.id for s in items] for name, items in samples.items()})
    judge = model_judge(model) if config.judge and model is not None else None
    if config.judge and judge is None:
        raise InputError("--judge needs the model (plain mode's client) to act as the judge")
    summaries = []
    for name, items in samples.items():
        benchmark = benchmark_named(name)
        for mode in config.modes:
            if mode == "plain":
                assert model is not None
                respond = plain_responder(
                    model,
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    judge_confidence=plain_confidence,
                )
            else:
                chosen = adaptive if mode == "adaptive" else answerer
                assert chosen is not None
                respond = agent_responder(chosen, guard=not config.allow_leak)
            summaries.append(
                await run_mode(
                    benchmark,
                    items,
                    mode,
                    respond,
                    config.out,
                    concurrency=config.concurrency,
                    judge=judge,
                    guard=not config.allow_leak,
                    seed=config.seed,
                    on_progress=on_progress,
                )
            )
    return summaries
