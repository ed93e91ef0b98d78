"""The eval loop with a scripted fake model: records, resume after a kill, agent mode, judge."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel

from suwen.errors import InputError, ModelError
from suwen.evaluate.benchmarks import Sample, benchmark_named, load_benchmark
from suwen.evaluate.runner import (
    EvalConfig,
    ModeRun,
    RunOptions,
    agent_responder,
    plain_responder,
    read_records,
    record_run,
    run_evaluation,
    run_mode,
    samples_path,
)
from suwen.llm.base import CallRecord, ChatReply, Message, record_call
from suwen.types import AgentResult, Citation, Evidence, Question, TextHit, TokenUsage

T = TypeVar("T", bound=BaseModel)


class FakeModel:
    """A scripted VisionLanguageModel: ``reply(messages)`` decides the text. It can be told to
    die (raise a non-Suwen error, like a killed process) after a number of calls."""

    def __init__(
        self, reply: Callable[[list[Message]], str], *, die_after: int | None = None
    ) -> None:
        self.reply = reply
        self.die_after = die_after
        self.prompts: list[str] = []
        self.images_seen = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
        prefill: str | None = None,
        logprobs: Any = None,
    ) -> ChatReply:
        if logprobs is not None:
            # A confidence probe: this stand-in has no token probabilities to give.
            return ChatReply(text="", finish_reason="length", record=CallRecord(kind="chat"))
        if self.die_after is not None and len(self.prompts) >= self.die_after:
            raise RuntimeError("killed")
        self.prompts.append(messages[-1].text)
        self.images_seen += sum(len(m.images) for m in messages)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
        finally:
            self.in_flight -= 1
        text = self.reply(messages)
        record = CallRecord(
            kind="chat",
            purpose=purpose,
            prompt_tokens=len(messages[-1].text),
            completion_tokens=len(text.split()),
        )
        record_call(record)
        return ChatReply(text=text, finish_reason="stop", record=record)

    async def stream(self, messages: list[Message], **_: Any) -> AsyncIterator[str]:
        yield (await self.chat(messages)).text

    async def structured(self, messages: list[Message], schema: type[T], **_: Any) -> T:
        return schema.model_validate_json((await self.chat(messages)).text)


def gold_of(samples: list[Sample]) -> Callable[[list[Message]], str]:
    """Answers right for every other question (by prompt), wrong otherwise."""
    by_prompt = {s.prompt: s for s in samples}

    def reply(messages: list[Message]) -> str:
        sample = by_prompt[messages[-1].text]
        right = int(sample.id.rsplit("-", 1)[-1]) % 2 == 0
        if sample.kind == "choice":
            return sample.gold if right else ("B" if sample.gold == "A" else "A")
        if sample.kind == "yes_no":
            return sample.gold if right else ("no" if sample.gold == "yes" else "yes")
        return sample.gold if right else "something else"

    return reply


@pytest.fixture(scope="module")
def vqa_rad(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    cache = tmp_path_factory.mktemp("cache")
    return load_benchmark("VQA-RAD", shared_data, cache, limit=12, seed=1)


def test_plain_mode_writes_one_scored_record_per_question(
    vqa_rad: list[Sample], tmp_path: Path
) -> None:
    model = FakeModel(gold_of(vqa_rad))
    summary = asyncio.run(
        run_mode(
            benchmark_named("VQA-RAD"),
            vqa_rad,
            ModeRun("plain"),
            plain_responder(model),
            tmp_path,
            RunOptions(concurrency=4),
        )
    )
    assert summary.done_now == 12 and not summary.failed
    assert model.images_seen == 12 and model.max_in_flight > 1
    lines = samples_path(tmp_path, "VQA-RAD", "plain").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in records) == sorted(s.id for s in vqa_rad)
    for record in records:
        assert {
            "id",
            "question",
            "gold",
            "response",
            "parsed",
            "correct",
            "medevalkit",
            "citations",
            "evidence_ids",
            "latency",
            "tokens",
        } <= set(record)
        assert record["prompt"] in model.prompts and record["tokens"]["prompt"] > 0
        right = int(record["id"].rsplit("-", 1)[-1]) % 2 == 0
        assert record["correct"] is right


def test_a_run_killed_halfway_resumes_without_redoing_finished_questions(
    vqa_rad: list[Sample], tmp_path: Path
) -> None:
    benchmark = benchmark_named("VQA-RAD")
    dying = FakeModel(gold_of(vqa_rad), die_after=5)
    with pytest.raises(RuntimeError, match="killed"):
        asyncio.run(
            run_mode(
                benchmark,
                vqa_rad,
                ModeRun("plain"),
                plain_responder(dying),
                tmp_path,
                RunOptions(concurrency=1),
            )
        )
    path = samples_path(tmp_path, "VQA-RAD", "plain")
    finished = [r.id for r in read_records(path)]
    assert len(finished) == 5
    # A kill in the middle of a write leaves a torn line: it is dropped, not fatal.
    with path.open("a") as handle:
        handle.write('{"id": "vqa-rad-torn", "benchm')
    fresh = FakeModel(gold_of(vqa_rad))
    summary = asyncio.run(
        run_mode(
            benchmark,
            vqa_rad,
            ModeRun("plain"),
            plain_responder(fresh),
            tmp_path,
            RunOptions(concurrency=3),
        )
    )
    assert summary.already_done == 5 and summary.done_now == 7
    asked = set(fresh.prompts)
    assert not asked & {s.prompt for s in vqa_rad if s.id in finished}
    ids = [r.id for r in read_records(path)]
    assert sorted(ids) == sorted(s.id for s in vqa_rad) and len(ids) == len(set(ids))
    # A third run has nothing left to ask.
    idle = FakeModel(gold_of(vqa_rad))
    asyncio.run(run_mode(benchmark, vqa_rad, ModeRun("plain"), plain_responder(idle), tmp_path))
    assert idle.prompts == []


def test_model_errors_are_reported_and_retried_next_run(
    vqa_rad: list[Sample], tmp_path: Path
) -> None:
    flaky_ids = {vqa_rad[0].prompt}

    def reply(messages: list[Message]) -> str:
        if messages[-1].text in flaky_ids:
            raise ModelError("vLLM at http://localhost:8000: 500")
        return "yes"

    benchmark = benchmark_named("VQA-RAD")
    summary = asyncio.run(
        run_mode(benchmark, vqa_rad, ModeRun("plain"), plain_responder(FakeModel(reply)), tmp_path)
    )
    assert [i for i, _ in summary.failed] == [vqa_rad[0].id] and summary.done_now == 11
    flaky_ids.clear()
    again = asyncio.run(
        run_mode(benchmark, vqa_rad, ModeRun("plain"), plain_responder(FakeModel(reply)), tmp_path)
    )
    assert again.done_now == 1 and not again.failed


class FakeAnswerer:
    """An Answerer that cites a paper and echoes what the guard excluded."""

    def __init__(self, short: Callable[[Question], str | None]) -> None:
        self.short = short
        self.questions: list[Question] = []

    async def __call__(self, question: Question) -> AgentResult:
        self.questions.append(question)
        hit = TextHit(key="pmid:123#0", score=0.9, index="pubmed", pmid="123", chunk_id="123#0")
        return AgentResult(
            question=question.text,
            answer=f"Full answer [1]. {self.short(question)}",
            short_answer=self.short(question),
            citations=[Citation(number=1, key="pmid:123#0", pmid="123")],
            evidence=[
                Evidence(key="pmid:123#0", hit=hit, relevance=0.9),
                Evidence(
                    key="case:9",
                    hit=hit.model_copy(update={"key": "case:9"}),
                    relevance=0.1,
                    kept=False,
                ),
            ],
            model_calls=4,
            tokens=TokenUsage(prompt=100, completion=20),
        )


def test_agent_mode_scores_the_short_answer_and_keeps_citations(
    shared_data: Path, tmp_path: Path
) -> None:
    samples = load_benchmark("PubMedQA", shared_data, tmp_path / "cache", limit=6, seed=2)
    answerer = FakeAnswerer(lambda q: "yes")
    asyncio.run(
        run_mode(
            benchmark_named("PubMedQA"),
            samples,
            ModeRun("agent"),
            agent_responder(answerer),
            tmp_path,
        )
    )
    records = read_records(samples_path(tmp_path, "PubMedQA", "agent"))
    assert {r.id for r in records} == {s.id for s in samples}
    for record in records:
        assert record.response == "yes" and record.parsed == "A"
        assert record.correct is (record.gold == "A")
        assert record.citations[0].pmid == "123" and record.evidence_ids == ["pmid:123#0"]
        assert record.tokens == {"prompt": 100, "completion": 20} and record.model_calls == 4
        assert record.leakage_guard and record.prompt is None
    guarded = {q.exclude_pmids[0] for q in answerer.questions}
    assert guarded == {s.id.removeprefix("pubmedqa-") for s in samples}
    leaky = FakeAnswerer(lambda q: None)  # no short answer: scored as unparsed
    asyncio.run(
        run_mode(
            benchmark_named("PubMedQA"),
            samples,
            ModeRun("agent"),
            agent_responder(leaky, guard=False),
            tmp_path / "leak",
            RunOptions(guard=False),
        )
    )
    assert all(q.exclude_pmids == [] for q in leaky.questions)
    leak_records = read_records(samples_path(tmp_path / "leak", "PubMedQA", "agent"))
    assert all(r.unparsed and r.correct is False and not r.leakage_guard for r in leak_records)


def test_judge_rescoring_open_answers_only(vqa_rad: list[Sample], tmp_path: Path) -> None:
    calls: list[str] = []

    def reply(messages: list[Message]) -> str:
        text = messages[-1].text
        if text.lstrip().startswith("Your task is to determine"):
            calls.append(text)
            return "<think>same meaning</think>\n<judge>0</judge>"
        return "something else entirely"

    model = FakeModel(reply)
    config = EvalConfig(benchmarks=["VQA-RAD"], modes=["plain"], out=tmp_path, judge=True)
    asyncio.run(run_evaluation(config, {"VQA-RAD": vqa_rad}, model=model, answerer=None))
    records = read_records(samples_path(tmp_path, "VQA-RAD", "plain"))
    opened = [r for r in records if r.kind == "open"]
    closed = [r for r in records if r.kind != "open"]
    assert len(calls) == len(opened) > 0
    assert all(r.correct and r.rule_correct is False and r.judge for r in opened)
    assert all(r.judge is None and r.correct is False for r in closed)


def test_scoring_options_cannot_change_inside_one_output_dir(tmp_path: Path) -> None:
    record_run(EvalConfig(benchmarks=["VQA-RAD"], out=tmp_path), {"VQA-RAD": ["a"]})
    record_run(EvalConfig(benchmarks=["PubMedQA"], out=tmp_path, limit=3), {"PubMedQA": ["b"]})
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run["selections"]) == {"VQA-RAD", "PubMedQA"}
    with pytest.raises(InputError, match="judge"):
        record_run(EvalConfig(benchmarks=["VQA-RAD"], out=tmp_path, judge=True), {})
    with pytest.raises(InputError, match="agent mode needs an agent"):
        asyncio.run(
            run_evaluation(
                EvalConfig(benchmarks=["VQA-RAD"], out=tmp_path),
                {},
                model=FakeModel(lambda m: ""),
                answerer=None,
            )
        )


def slow_plain_run(data: str, out: str) -> None:
    """Run in a child process by the SIGKILL test: one question at a time, slowly."""
    samples = load_benchmark("VQA-RAD", Path(data), Path(out) / "cache", limit=12, seed=1)
    answer = gold_of(samples)

    def slow(messages: list[Message]) -> str:
        time.sleep(0.15)
        return answer(messages)

    asyncio.run(
        run_mode(
            benchmark_named("VQA-RAD"),
            samples,
            ModeRun("plain"),
            plain_responder(FakeModel(slow)),
            Path(out),
            RunOptions(concurrency=1),
        )
    )


def test_sigkilled_run_resumes(vqa_rad: list[Sample], shared_data: Path, tmp_path: Path) -> None:
    path = samples_path(tmp_path, "VQA-RAD", "plain")
    code = (
        f"from tests.test_eval_runner import slow_plain_run; "
        f"slow_plain_run({str(shared_data)!r}, {str(tmp_path)!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if path.exists() and path.read_text().count("\n") >= 3:
                break
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    finished = {r.id for r in read_records(path)}
    assert 3 <= len(finished) < 12
    fresh = FakeModel(gold_of(vqa_rad))
    asyncio.run(
        run_mode(
            benchmark_named("VQA-RAD"), vqa_rad, ModeRun("plain"), plain_responder(fresh), tmp_path
        )
    )
    assert len(fresh.prompts) == 12 - len(finished)
    assert not set(fresh.prompts) & {s.prompt for s in vqa_rad if s.id in finished}
    assert sorted(r.id for r in read_records(path)) == sorted(s.id for s in vqa_rad)


def test_a_second_writer_of_a_samples_file_is_refused(
    vqa_rad: list[Sample], tmp_path: Path
) -> None:
    """Two `suwen eval` runs into one output folder would interleave their lines: the second
    is refused in one line while the first holds the file, and runs once it is free."""
    from suwen.errors import InputError
    from suwen.filelock import single_writer

    benchmark = benchmark_named("VQA-RAD")
    path = samples_path(tmp_path, "VQA-RAD", "plain")
    with single_writer(path, "suwen eval"):  # the other run, mid-way
        model = FakeModel(gold_of(vqa_rad))
        with pytest.raises(InputError, match="another suwen eval is writing this file"):
            asyncio.run(
                run_mode(benchmark, vqa_rad, ModeRun("plain"), plain_responder(model), tmp_path)
            )
        assert model.prompts == [] and not path.exists()
    model = FakeModel(gold_of(vqa_rad))
    summary = asyncio.run(
        run_mode(benchmark, vqa_rad, ModeRun("plain"), plain_responder(model), tmp_path)
    )
    assert summary.done_now == len(vqa_rad)


# A line of an agent samples file as runs before the typed record wrote it (citations and the
# adaptive route as plain JSON objects): old run folders must still load, resume and report.
EXISTING_RECORD_LINE = (
    '{"id":"pubmedqa-12345","benchmark":"PubMedQA","mode":"adaptive","kind":"yes_no",'
    '"question":"Does aspirin lower the risk?","prompt":null,"gold":"A",'
    '"options":{"A":"yes","B":"no","C":"maybe"},"question_type":null,"modality":null,'
    '"body_part":null,"response":"yes","full_answer":"Yes, it does [1].","parsed":"A",'
    '"correct":true,"rule_correct":true,"unparsed":false,"metrics":{},'
    '"medevalkit":{"correct":true,"parsed":"A","by_similarity":false,"crash":null,"metrics":{}},'
    '"judge":{"raw":"<judge>1</judge>","suwen":true,"medevalkit":false},'
    '"citations":[{"number":1,"key":"pmid:123#0","pmid":"123","case_id":null,"title":"Aspirin",'
    '"quote":"lowers","page":null}],"evidence_ids":["pmid:123#0"],"latency":1.25,'
    '"tokens":{"prompt":100,"completion":20},"model_calls":4,"leakage_guard":true,'
    '"finished_at":"2026-11-30T10:00:00+00:00","confidence":0.8,"confidence_raw":0.7,'
    '"confidence_source":"self-check","calibrated":true,"abstained":false,'
    '"route":{"path":"agent","reason":"unsure","threshold":0.75,"plain_answer":"B",'
    '"plain_confidence":0.4,"changed":"from B to A"},"cited_relevance":0.9,'
    '"all_claims_cited":true,"asked":true,"not_asked_reason":null,"images_shown":[],'
    '"case_examples":2}'
)


def test_a_samples_file_in_the_existing_format_loads_typed_and_writes_back_the_same(
    tmp_path: Path,
) -> None:
    path = samples_path(tmp_path, "PubMedQA", "adaptive@examples2")
    path.parent.mkdir(parents=True)
    path.write_text(EXISTING_RECORD_LINE + "\n", encoding="utf-8")
    [record] = read_records(path)
    assert record.citations == [
        Citation(number=1, key="pmid:123#0", pmid="123", title="Aspirin", quote="lowers")
    ]
    assert record.route is not None and record.route.path == "agent"
    assert record.route.changed == "from B to A" and record.route.threshold == 0.75
    assert record.correct_medevalkit is True and record.case_examples == 2
    # The record is written back byte for byte as it was read: a resumed run appends lines of
    # the same shape, and the report reads old and new lines alike.
    assert record.model_dump_json() == EXISTING_RECORD_LINE
