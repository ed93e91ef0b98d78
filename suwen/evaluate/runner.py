"""The evaluation loop: each benchmark question through each mode, scored twice, kept as it ends.

Per benchmark and mode, one JSONL file of ``SampleRecord`` lines, appended and fsynced as each
question finishes; a re-run reads it back and asks only the questions not yet there. Plain mode
sends MedEvalKit's prompt (with the image, as MedEvalKit lays images out) straight to the model;
agent mode hands the question, its answer form and the leakage guard to an ``Answerer``
(``SuwenAgent.run`` in agent mode) and scores its ``short_answer``.

Sanity baselines: ``plain-blank`` / ``agent-blank`` ask the same question with a black image of
the same size, ``plain-shuffled`` / ``agent-shuffled`` with another question's image from the
same benchmark (a fixed, seeded pairing), so the report shows how much of each accuracy comes
from looking at the image.

A question that cannot be asked (more images than allowed, an image that cannot be read, a
prompt the server refuses as too long) is kept as a record with ``asked=False`` and its reason,
and counted next to the accuracy instead of silently leaving the denominator.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Protocol, TypedDict, get_args

from PIL import Image
from pydantic import BaseModel, Field, ValidationError, field_validator

from suwen.agent.report import parse_report
from suwen.digests import sha256_of
from suwen.errors import InputError, ModelError, SuwenError
from suwen.evaluate import prompts
from suwen.evaluate import scoring as suwen_scoring
from suwen.evaluate import scoring_medevalkit as mek
from suwen.evaluate.benchmarks import Benchmark, Sample, benchmark_named, load_benchmark
from suwen.evaluate.calibration import is_dev
from suwen.evaluate.confidence_eval import AnswerJudgement, judgement_of
from suwen.files import atomic_path, atomic_write_json
from suwen.jsonl_log import AppendLog, LogContents, open_append_log, read_log
from suwen.llm.base import CallRecord, Message, VisionLanguageModel, recording
from suwen.llm.client import ServerReplyError
from suwen.medimage import load_image
from suwen.sanitize import OPEN_LOOKALIKE, for_prompt
from suwen.types import AgentResult, Citation, Mode, Question, Route

# A mode of an evaluation run: who answers (suwen.types.Mode), and for plain and agent also
# which image it is shown (its own, a blank one, another question's: the image baselines).
EvalMode = Literal[
    "plain",
    "agent",
    "adaptive",
    "plain-blank",
    "agent-blank",
    "plain-shuffled",
    "agent-shuffled",
]
MODES: tuple[EvalMode, ...] = get_args(EvalMode)
DEFAULT_MODES: tuple[EvalMode, ...] = ("plain", "agent")
Condition = Literal["real", "blank", "shuffled"]
CONDITIONS: tuple[Condition, ...] = get_args(Condition)
JUDGE_MAX_TOKENS = 512


# A mode run with a given number of case examples is kept apart under the key
# "<mode>@examples<N>" (its samples file, its column in metrics.json).
EXAMPLES_MARK = "@examples"


class ModeRun(NamedTuple):
    """One mode as a run asks it: with the agent's case-examples setting (None), or with
    ``case_examples`` worked examples when the run compares counts (``--case-examples``)."""

    mode: EvalMode
    case_examples: int | None = None

    @property
    def key(self) -> str:
        """Its samples file's name and its key in metrics.json."""
        if self.case_examples is None:
            return self.mode
        return f"{self.mode}{EXAMPLES_MARK}{self.case_examples}"

    @property
    def label(self) -> str:
        """How a person reads it: 'agent (2 case examples)'."""
        if self.case_examples is None:
            return self.mode
        return f"{self.mode} ({self.case_examples} case examples)"


def mode_run_of(key: str) -> ModeRun:
    """The mode run a key names (``agent``, ``agent-blank@examples2``)."""
    mode, mark, count = key.partition(EXAMPLES_MARK)
    if mode not in MODES or (mark and not count.isdigit()):
        raise InputError(f"no mode {key!r}")
    return ModeRun(mode, int(count) if mark else None)


def mode_runs(modes: Sequence[EvalMode], case_examples: Sequence[int]) -> list[ModeRun]:
    """What a run asks: every mode, and every mode the agent answers once per case-examples
    count when counts are compared (plain modes show no examples: asked once)."""
    runs = []
    for mode in modes:
        if case_examples and answerer_of(mode) != "plain":
            runs += [ModeRun(mode, count) for count in case_examples]
        else:
            runs.append(ModeRun(mode))
    return runs


def answerer_of(mode: str) -> Mode:
    """Who answers in a mode (or mode run key): the plain model, the agent, or the agent in
    adaptive mode."""
    answerer = mode.partition(EXAMPLES_MARK)[0].partition("-")[0]
    return "agent" if answerer == "agent" else "adaptive" if answerer == "adaptive" else "plain"


def processes_for_modes(processes: int, modes: Sequence[str]) -> int:
    """The agent processes a run of ``modes`` uses out of ``processes``: one (this process)
    when only the plain model answers, as it is asked from this process."""
    return processes if any(answerer_of(mode) != "plain" for mode in modes) else 1


def condition_of(mode: str) -> Condition:
    """Which image a mode (or mode run key) shows: the question's own, a blank one, or another
    question's."""
    _, _, condition = mode.partition(EXAMPLES_MARK)[0].partition("-")
    return "blank" if condition == "blank" else "shuffled" if condition == "shuffled" else "real"


def mode_named(answerer: str, condition: str) -> EvalMode:
    name = answerer if condition == "real" else f"{answerer}-{condition}"
    if name not in MODES:
        raise InputError(f"no mode {name!r}")
    return name


def parse_modes(text: str) -> list[EvalMode]:
    """``--modes``: any of plain, agent, adaptive, blank, shuffled (or a combined name such as
    plain-blank). blank and shuffled apply to plain and agent as given (both when neither is):
    plain,blank -> plain and plain-blank."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in parts if p not in (*MODES, "blank", "shuffled")]
    if unknown or not parts:
        raise InputError(
            f"--modes {text!r}: expected plain, agent, adaptive, blank, shuffled "
            "(comma-separated) or a combined mode such as plain-blank"
        )
    answerers = [a for a in ("plain", "agent") if a in parts] or ["plain", "agent"]
    chosen = {p for p in parts if p in MODES}
    for condition in ("blank", "shuffled"):
        if condition in parts:
            chosen.update(mode_named(a, condition) for a in answerers)
    return [mode for mode in MODES if mode in chosen]


class Answerer(Protocol):
    """What agent mode needs: one question in, one ``AgentResult`` out (its ``short_answer``
    in the benchmark's form is what gets scored)."""

    async def __call__(self, question: Question) -> AgentResult: ...


class Reply(BaseModel):
    """What a mode produced for one question."""

    response: str = Field(description="The text that is scored")
    full_answer: str = ""
    citations: list[Citation] = Field(default_factory=list)
    evidence_ids: list[str] = Field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_calls: int = 0
    judged: AnswerJudgement = Field(default_factory=AnswerJudgement)
    images_shown: list[str] = Field(default_factory=list, description="Image files shown")


class JudgeRecord(BaseModel):
    raw: str
    suwen: bool | None = Field(description="Suwen's reading (None: unreadable, rule stands)")
    medevalkit: bool = Field(description="MedEvalKit's reading: exactly '0' in <judge>")


class SampleRecord(BaseModel):
    """One line of a samples file: the question, what came back, and both verdicts."""

    id: str
    benchmark: str
    mode: EvalMode
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
    citations: list[Citation] = Field(default_factory=list)
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
    route: Route | None = None
    cited_relevance: float | None = None
    all_claims_cited: bool | None = None
    asked: bool = Field(True, description="False: the question could not be asked (see reason)")
    not_asked_reason: str | None = None
    images_shown: list[str] = Field(default_factory=list, description="Image files shown")
    case_examples: int | None = Field(
        None, description="Case examples the agent could show (None: the setting's)"
    )

    @property
    def correct_medevalkit(self) -> bool | None:
        return self.medevalkit.correct


Responder = Callable[[Sample], Awaitable[Reply]]
PlainConfidence = Callable[[Sample, list[Message], str], Awaitable[AnswerJudgement]]
Judge = Callable[[str, str, str], Awaitable[str]]
Progress = Callable[[str, str, int, int], None]
# The answerer of agent or adaptive mode showing a given number of case examples.
ExampleAnswerers = Callable[[Mode, int], Answerer | None]


# --------------------------------------------------------------------------------------------
# The two modes and the judge


def load_images(paths: Sequence[str]) -> list[Image.Image]:
    """The question's images through Suwen's one image loader (``suwen.medimage``)."""
    return [load_image(Path(path)) for path in paths]


def plain_responder(
    model: VisionLanguageModel,
    *,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    judge_confidence: PlainConfidence | None = None,
) -> Responder:
    """Plain mode: MedEvalKit's prompt and the question's image(s) straight to the model, each
    image after a '<image_i>: ' label where MedEvalKit's loader uses its multi-image layout
    (then, with ``judge_confidence``, the confidence probe of that reply)."""

    async def respond(sample: Sample) -> Reply:
        images = await asyncio.to_thread(load_images, sample.images)
        labels = prompts.image_labels(len(images)) if sample.image_labels else []
        message = Message(role="user", text=sample.prompt, images=images, image_labels=labels)
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
            images_shown=list(sample.images),
        )

    return respond


# Citation marks as the agent writes them: [1], [2, 3], [1-2].
_CITATION_MARK = re.compile(r"[ \t]*\[\d+(?:\s*[,;–-]\s*\d+)*\]")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)


def scored_report(report: str) -> str:
    """A drafted report in the form of the benchmark's reference, which MedEvalKit writes as
    'Findings: ... Impression: ....': the findings and impression sections on one line each,
    without citation marks or list bullets (technique and comparison are not in the
    reference). Empty when the draft has neither section."""
    sections = parse_report(_BULLET.sub("", _CITATION_MARK.sub("", report)))
    findings = " ".join(sections.get("findings", "").split())
    impression = " ".join(sections.get("impression", "").split())
    if not findings and not impression:
        return ""
    return f"Findings: {findings} Impression: {impression}."


def agent_responder(answerer: Answerer, *, guard: bool = True) -> Responder:
    """Agent (or adaptive) mode: the question (leakage guard on unless ``guard`` is False);
    the agent's ``short_answer`` is scored, its citations, evidence and confidence kept (the
    benchmark's own calibration map applies: the question names it as its family). A report
    question is answered on ``suwen report``'s path (the answerer's job); its findings and
    impression are scored (``scored_report``)."""

    async def respond(sample: Sample) -> Reply:
        question = sample.to_question(guard=guard).model_copy(update={"family": sample.benchmark})
        with recording() as log:
            result = await answerer(question)
        refused = model_refusal(result, log.records)
        if refused is not None:
            raise ModelError(f"{sample.id}: the agent got no answer from the model: {refused}")
        if sample.kind == "report":
            response = scored_report(result.answer)
        else:
            response = result.short_answer if result.short_answer is not None else ""
        return Reply(
            response=response,
            full_answer=result.answer,
            citations=list(result.citations),
            evidence_ids=[e.key for e in result.evidence if e.kept],
            prompt_tokens=result.tokens.prompt,
            completion_tokens=result.tokens.completion,
            model_calls=result.model_calls,
            judged=judgement_of(result),
            images_shown=list(sample.images),
        )

    return respond


# The agent's steps that write the answer (or report) itself; their model calls are streamed.
ANSWER_PURPOSES = frozenset({"answer", "report"})


def model_refusal(result: AgentResult, calls: Sequence[CallRecord]) -> str | None:
    """Why an agent result is not an answer at all, or None when it is one. The agent goes on
    when a step's model call fails (a degraded answer), which is right for one bad reply but
    would score an unreachable or refusing server (HTTP 401, connection refused) as a run of
    wrong answers. So a result is refused when no model call succeeded, or when the call that
    writes the answer failed and no short answer came out of the rest: the question is then
    reported as failed and asked again by the next run instead of scored."""
    if not calls:
        return None  # an answerer that does not call the model through a client
    answering = [call for call in calls if call.purpose in ANSWER_PURPOSES]
    nothing_worked = not any(call.ok for call in calls)
    answer_failed = bool(answering) and not any(call.ok for call in answering)
    if not nothing_worked and not (answer_failed and not (result.short_answer or "").strip()):
        return None
    failures = [event.message for event in result.trace if event.degraded]
    return failures[-1] if failures else "every model call failed"


# --------------------------------------------------------------------------------------------
# Sanity baselines: a blank image, or another question's image


def blank_image_file(path: str, folder: Path) -> str:
    """A black RGB PNG of the same size as the image at ``path`` (made once per image)."""
    source = Path(path)
    target = folder / f"{sha256_of(source)}.png"
    if not target.exists():
        size = load_image(source).size
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            Image.new("RGB", size, (0, 0, 0)).save(tmp, format="PNG")
    return str(target)


def shuffled_donors(samples: Sequence[Sample], seed: int) -> dict[str, Sample | None]:
    """For each question with images, another question of the same selection whose images are
    different files with different content: a seeded shuffle, each taking the next one along
    that differs (None when no other image exists). The same selection and seed always give
    the same pairing, so a resumed run shows the same images."""
    with_images = [s for s in samples if s.images]
    order = list(range(len(with_images)))
    random.Random(f"{seed}:shuffled").shuffle(order)
    donors: dict[str, Sample | None] = {}
    for position, index in enumerate(order):
        sample = with_images[index]
        own = set(sample.exclude_image_sha256) or set(sample.images)
        donors[sample.id] = None
        for step in range(1, len(order)):
            other = with_images[order[(position + step) % len(order)]]
            theirs = set(other.exclude_image_sha256) or set(other.images)
            if not own & theirs and not set(sample.images) & set(other.images):
                donors[sample.id] = other
                break
    return donors


def with_condition(
    respond: Responder,
    condition: Condition,
    *,
    donors: dict[str, Sample | None],
    blank_folder: Path,
) -> Responder:
    """A responder that shows the question with its images replaced as ``condition`` says."""
    if condition == "real":
        return respond

    async def shown(sample: Sample) -> Reply:
        if not sample.images:
            raise InputError(f"{sample.id}: no image to replace (text-only question)")
        if condition == "blank":
            images = await asyncio.to_thread(
                lambda: [blank_image_file(p, blank_folder) for p in sample.images]
            )
            excluded = list(sample.exclude_image_sha256)
        else:
            donor = donors.get(sample.id)
            if donor is None:
                raise InputError(f"{sample.id}: no other question's image to show")
            images = list(donor.images)
            excluded = [*sample.exclude_image_sha256, *donor.exclude_image_sha256]
        return await respond(
            sample.model_copy(update={"images": images, "exclude_image_sha256": excluded})
        )

    return shown


_JUDGE_FORMAT_TAG = re.compile(r"<(?=\s*/?\s*(?:judge|think)\b)", re.IGNORECASE)


def for_judge(text: str) -> str:
    """``text`` safe inside the judge prompt: ``for_prompt`` (no special token, role marker or
    image placeholder survives), and the judge's own ``<judge>`` / ``<think>`` tags defused the
    same way (their '<' swapped for a look-alike), so a response saying ``<judge>0</judge>``
    is read as text, not as a verdict. Ordinary answers pass unchanged, so the prompt stays
    MedEvalKit's word for word."""
    return _JUDGE_FORMAT_TAG.sub(OPEN_LOOKALIKE, for_prompt(text))


def model_judge(model: VisionLanguageModel) -> Judge:
    """MedEvalKit's judge prompt, answered by the same local model. The response judged (and
    the benchmark's question and answer) are untrusted data: sanitised before they go in, so a
    reply cannot open a turn with a special token or forge the judge's own verdict tag."""

    async def judge(question: str, response: str, gold: str) -> str:
        text = prompts.judge_prompt(for_judge(question), for_judge(response), for_judge(gold))
        message = Message(role="user", text=text)
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
    mode: EvalMode,
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
        **_about(sample, mode),
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
        images_shown=reply.images_shown,
    )


class QuestionFields(TypedDict):
    """What every sample record says of its question, answered or not (its first fields)."""

    id: str
    benchmark: str
    mode: EvalMode
    kind: str
    question: str
    prompt: str | None
    gold: str
    options: dict[str, str]
    question_type: str | None
    modality: str | None
    body_part: str | None


def _about(sample: Sample, mode: EvalMode) -> QuestionFields:
    """What every sample record says of its question, answered or not."""
    return {
        "id": sample.id,
        "benchmark": sample.benchmark,
        "mode": mode,
        "kind": sample.kind,
        "question": sample.question,
        "prompt": sample.prompt if answerer_of(mode) == "plain" else None,
        "gold": sample.gold,
        "options": sample.options,
        "question_type": sample.question_type,
        "modality": sample.modality,
        "body_part": sample.body_part,
    }


def cannot_ask_reason(error: SuwenError) -> str | None:
    """Why a question cannot be asked at all (asking again would fail the same way), or None
    for a failure worth retrying (a server down, a timeout). Unusable input (an unreadable
    image, too many images, a text-only question in an image baseline) and a request the
    server rejects as invalid (HTTP 400: a prompt longer than its context, say) cannot."""
    if isinstance(error, InputError):
        return str(error)
    cause = error.__cause__
    if isinstance(error, ModelError) and isinstance(cause, ServerReplyError):
        return str(error) if cause.status == 400 else None
    return None


def not_asked_record(
    sample: Sample, mode: EvalMode, reason: str, *, guard: bool, latency: float
) -> SampleRecord:
    """The record of a question that could not be asked: no verdict from either scorer."""
    return SampleRecord(
        **_about(sample, mode),
        response="",
        correct=None,
        medevalkit=mek.MekSample(),
        latency=latency,
        leakage_guard=guard,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        asked=False,
        not_asked_reason=reason,
    )


# --------------------------------------------------------------------------------------------
# Samples files: suwen/jsonl_log.py's append-only log, one SampleRecord a line


def samples_path(out: Path, benchmark: str, mode: str) -> Path:
    """A mode run's samples file (``mode``: a mode or a mode run key)."""
    return out / benchmark / f"{mode}.jsonl"


def read_records(path: Path) -> list[SampleRecord]:
    """The finished records of a samples file (a last line cut off by a kill is left out; the
    next run's writer drops it from the file)."""
    return _parse_records(path, read_log(path))


def _parse_records(path: Path, found: LogContents) -> list[SampleRecord]:
    records = []
    for number, line in enumerate(found.lines, 1):
        if not line.strip():
            continue
        try:
            records.append(SampleRecord.model_validate_json(line))
        except ValidationError as exc:
            raise InputError(f"{path}:{number}: not a sample record: {exc}") from exc
    return records


class ModeSummary(BaseModel):
    benchmark: str
    mode: EvalMode
    case_examples: int | None = None
    total: int
    already_done: int
    done_now: int
    not_asked: int = Field(0, description="Recorded as not askable (in this run)")
    skipped: str | None = Field(None, description="Why the whole mode was skipped")
    failed: list[tuple[str, str]] = Field(default_factory=list, description="(id, error)")

    @property
    def label(self) -> str:
        return ModeRun(self.mode, self.case_examples).label


# A server that is gone or refuses every request (HTTP 401, connection refused) fails every
# question alike: after this many failures in a row with no answer between them the mode stops
# instead of spending the whole benchmark on retries, keeping what finished.
MAX_FAILURES_IN_A_ROW = 8


class ModeFailedError(ModelError):
    """Every recent question of a mode failed: the run stops (what finished is kept)."""


class _FailureStreak:
    """Counts questions that failed in a row; one answer (or not-askable record) resets it."""

    def __init__(self, benchmark: str, mode: str) -> None:
        self.where = f"{benchmark} {mode}"
        self.count = 0

    def answered(self) -> None:
        self.count = 0

    def failed(self, error: str) -> None:
        self.count += 1
        if self.count >= MAX_FAILURES_IN_A_ROW:
            raise ModeFailedError(
                f"{self.where}: {self.count} questions in a row failed, the last with: {error}; "
                "stopped (finished answers are kept; run the same command again once the model "
                "answers)"
            )


@dataclass(frozen=True)
class RunOptions:
    """How a mode run asks and scores: questions in flight, the judge (None: rules only),
    the leakage guard, the seed MedEvalKit's scorer draws with, the most images a question
    may show (None: any), and who hears of each finished question."""

    concurrency: int = 4
    judge: Judge | None = None
    guard: bool = True
    seed: int = 0
    max_images: int | None = None
    on_progress: Progress | None = None


async def run_mode(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    run: ModeRun,
    respond: Responder,
    out: Path,
    options: RunOptions = RunOptions(),
) -> ModeSummary:
    """Answer and score every sample not yet in the mode run's samples file (see
    :func:`_answer_pending`), the file locked against a second writer for the whole run."""
    with open_append_log(samples_path(out, benchmark.name, run.key), "suwen eval") as log:
        return await _answer_pending(benchmark, samples, run, respond, log, options)


async def _answer_pending(
    benchmark: Benchmark,
    samples: Sequence[Sample],
    run: ModeRun,
    respond: Responder,
    log: AppendLog,
    options: RunOptions,
) -> ModeSummary:
    """Answer and score every sample not yet in the mode's samples file, ``concurrency`` at a
    time. A question that cannot be asked (``cannot_ask_reason``; more than ``max_images``
    images) is recorded as such; one whose model call fails otherwise (a SuwenError) is
    reported and left for the next run; anything else stops the run, keeping what finished."""
    mode = run.mode
    finished = {record.id for record in _parse_records(log.path, log.found)}
    pending = [s for s in samples if s.id not in finished]
    summary = ModeSummary(
        benchmark=benchmark.name,
        mode=mode,
        case_examples=run.case_examples,
        total=len(samples),
        already_done=len(samples) - len(pending),
        done_now=0,
    )
    gate = asyncio.Semaphore(max(1, options.concurrency))
    max_images = options.max_images
    streak = _FailureStreak(benchmark.name, run.label)

    async def answer(sample: Sample, started: float) -> SampleRecord:
        if max_images is not None and len(sample.images) > max_images:
            raise InputError(
                f"{sample.id}: {len(sample.images)} images; the run allows {max_images} "
                "(setting eval_max_images)"
            )
        reply = await respond(sample)
        return await score_reply(
            benchmark,
            sample,
            mode,
            reply,
            judge=options.judge,
            guard=options.guard,
            seed=options.seed,
            latency=time.perf_counter() - started,
        )

    async def one(sample: Sample) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                record = await answer(sample, started)
            except SuwenError as exc:
                reason = cannot_ask_reason(exc)
                if reason is None:
                    summary.failed.append((sample.id, str(exc)))
                    streak.failed(str(exc))
                    return
                latency = time.perf_counter() - started
                record = not_asked_record(
                    sample, mode, reason, guard=options.guard, latency=latency
                )
                summary.not_asked += 1
            streak.answered()
            record.case_examples = run.case_examples
            await asyncio.to_thread(log.append, record.model_dump_json())  # fsync off the loop
            summary.done_now += 1
            if options.on_progress is not None:
                options.on_progress(
                    benchmark.name,
                    run.label,
                    summary.already_done + summary.done_now,
                    summary.total,
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


class Sampling(BaseModel):
    """Sampling sent with every request of a run (explicitly, so no server default decides)."""

    temperature: float = 0.0
    top_p: float = 0.0001
    top_k: int = Field(-1, description="-1: off (vLLM's default; MedEvalKit does not set it)")
    repetition_penalty: float = 1.0


# MedEvalKit's README eval.sh for its vLLM path: TEMPERATURE=0, TOP_P=0.0001,
# REPETITION_PENALTY=1 (models/Qwen2_5_VL/Qwen2_5_VL_vllm.py passes them to SamplingParams and
# leaves top_k at vLLM's default, off).
MEDEVALKIT_SAMPLING = Sampling()


class ImagePolicy(BaseModel):
    """How a run's images are sent: the pixel budget, the most images per question, and
    whether multi-image prompts get MedEvalKit's '<image_i>: ' labels."""

    min_pixels: int = 3136
    max_pixels: int = 12_845_056
    max_images: int = 6
    labels: bool = True


class EvalConfig(BaseModel):
    """Everything that decides what a run asks and how it scores."""

    benchmarks: list[str]
    data: Path | None = None
    modes: list[EvalMode] = Field(default_factory=lambda: list(DEFAULT_MODES))
    out: Path
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    concurrency: int = Field(4, ge=1)
    judge: bool = False
    allow_leak: bool = False
    max_tokens: int | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    images: ImagePolicy = Field(default_factory=ImagePolicy)
    lang: prompts.Lang | None = Field(None, description="Only questions in this language")
    model: str = ""
    calibrate: bool = Field(False, description="Ask only the dev split, to fit calibration")
    abstain_below: float | None = Field(None, ge=0, le=1)
    case_examples: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list,
        description="Case-example counts compared (--case-examples 0,2): each mode the agent "
        "answers runs once per count; empty: once, with the setting's count",
    )

    @field_validator("case_examples")
    @classmethod
    def _distinct_counts(cls, counts: list[int]) -> list[int]:
        if len(set(counts)) != len(counts):
            raise ValueError(f"case-example counts repeat: {counts}")
        return counts


RUN_FILE = "run.json"
# Options that change what is asked or how it is scored (or which questions are asked): one
# value per run directory.
SCORING_OPTIONS = (
    "judge",
    "allow_leak",
    "model",
    "calibrate",
    "abstain_below",
    "lang",
    "sampling",
    "images",
    "case_examples",
)


def _option_value(config: EvalConfig, option: str) -> Any:
    value = getattr(config, option)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def record_run(
    config: EvalConfig,
    selections: dict[str, list[str]],
    provenance: dict[str, Any] | None = None,
) -> None:
    """Write run.json (the options, each benchmark's selected ids and what the answers came
    from: model revision, server version); refuse to mix scoring options with an earlier run
    in the same directory."""
    path = config.out / RUN_FILE
    if path.exists():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: unreadable run file: {exc}") from exc
        for option in SCORING_OPTIONS:
            before, now = earlier.get("config", {}).get(option), _option_value(config, option)
            if before is not None and before != now:
                raise InputError(
                    f"{config.out}: earlier run used {option}={before!r}, this one {now!r}; "
                    "use another --out to keep verdicts comparable"
                )
        selections = {**earlier.get("selections", {}), **selections}
    config.out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config.model_dump(mode="json"),
        "selections": selections,
        "provenance": provenance or {},
    }
    atomic_write_json(path, record)


def load_selected(config: EvalConfig, cache_dir: Path) -> dict[str, list[Sample]]:
    """Each benchmark's questions; with ``calibrate``, only those of the dev split."""
    selected = {
        benchmark_named(name).name: load_benchmark(
            name, config.data, cache_dir, limit=config.limit, seed=config.seed, lang=config.lang
        )
        for name in config.benchmarks
    }
    if config.calibrate:
        return {name: [s for s in items if is_dev(name, s.id)] for name, items in selected.items()}
    return selected


@dataclass(frozen=True)
class RunAnswerers:
    """The run's answerers, one per kind of mode."""

    model: VisionLanguageModel | None
    agent: Answerer | None
    adaptive: Answerer | None
    plain_confidence: PlainConfidence | None
    with_examples: ExampleAnswerers | None = None


def _responder(run: ModeRun, config: EvalConfig, answerers: RunAnswerers) -> Responder:
    """Who answers a mode run: the plain model (with the confidence probe when given), the
    agent, or the agent in adaptive mode (showing the run's number of case examples)."""
    mode = run.mode
    who = answerer_of(mode)
    if who == "plain":
        if answerers.model is None:
            raise InputError(f"{mode} mode needs a model")
        return plain_responder(
            answerers.model,
            max_tokens=config.max_tokens,
            temperature=config.sampling.temperature,
            judge_confidence=answerers.plain_confidence,
        )
    chosen = answerers.adaptive if who == "adaptive" else answerers.agent
    if run.case_examples is not None:
        made = answerers.with_examples
        chosen = made(who, run.case_examples) if made is not None else None
    if chosen is None:
        raise InputError(f"{run.label} mode needs an agent")
    return agent_responder(chosen, guard=not config.allow_leak)


async def run_evaluation(
    config: EvalConfig,
    samples: dict[str, list[Sample]],
    *,
    model: VisionLanguageModel | None,
    answerer: Answerer | None,
    on_progress: Progress | None = None,
    provenance: dict[str, Any] | None = None,
    adaptive: Answerer | None = None,
    plain_confidence: PlainConfidence | None = None,
    with_examples: ExampleAnswerers | None = None,
) -> list[ModeSummary]:
    """Every selected benchmark in every requested mode; the judge (if on) is ``model``.
    ``adaptive`` answers adaptive mode; ``plain_confidence`` measures plain replies';
    ``with_examples`` gives the agent showing N case examples when ``config.case_examples``
    compares counts. Image baselines (blank, shuffled) are skipped for a benchmark without
    images."""
    answerers = RunAnswerers(model, answerer, adaptive, plain_confidence, with_examples)
    runs = mode_runs(config.modes, config.case_examples)
    for run in runs:
        _responder(run, config, answerers)  # fail before anything is written
    record_run(config, {name: [s.id for s in items] for name, items in samples.items()}, provenance)
    judge = model_judge(model) if config.judge and model is not None else None
    if config.judge and judge is None:
        raise InputError("--judge needs the model (plain mode's client) to act as the judge")
    options = RunOptions(
        concurrency=config.concurrency,
        judge=judge,
        guard=not config.allow_leak,
        seed=config.seed,
        max_images=config.images.max_images,
        on_progress=on_progress,
    )
    summaries = []
    for name, items in samples.items():
        benchmark = benchmark_named(name)
        donors = shuffled_donors(items, config.seed)
        for run in runs:
            mode = run.mode
            condition = condition_of(mode)
            if condition != "real" and not any(s.images for s in items):
                summaries.append(
                    ModeSummary(
                        benchmark=name,
                        mode=mode,
                        case_examples=run.case_examples,
                        total=0,
                        already_done=0,
                        done_now=0,
                        skipped="no images",
                    )
                )
                continue
            respond = with_condition(
                _responder(run, config, answerers),
                condition,
                donors=donors,
                blank_folder=config.out / name / "blank_images",
            )
            summaries.append(await run_mode(benchmark, items, run, respond, config.out, options))
    return summaries
