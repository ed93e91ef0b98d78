"""Confidence on every answer, adaptive retrieval and abstention, with the scripted model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from suwen import runtime
from suwen.agent.confidence import answer_prefix, label_distribution
from suwen.cli import app
from suwen.commands.answer_view import result_view
from suwen.evaluate.calibration import CalibrationFile, CalibrationMap, save_calibration
from suwen.llm.base import CandidateLogprob, TokenLogprobs
from suwen.types import AgentResult, AnswerFormat
from tests.agent_helpers import NODES, ask, corpus, make_agent, question, visited
from tests.fake_model import FakeModel, Probs
from tests.fake_search import FakeTextSearch
from tests.test_ask import Opened

CHOICE = AnswerFormat(kind="choice", options={"A": "Needle decompression", "B": "Observation"})
YES_NO = AnswerFormat(kind="yes_no")
PLAN = json.dumps({"queries": ["tension pneumothorax treatment"]})


def _position(logprobs: dict[str, tuple[int, float]]) -> TokenLogprobs:
    candidates = [
        CandidateLogprob(text=text, token_id=token, logprob=math.log(p))
        for text, (token, p) in logprobs.items()
    ]
    return TokenLogprobs(token="x", logprob=0.0, candidates=candidates)


# -- reading probabilities ---------------------------------------------------------------------


def test_option_mass_is_normalised_and_a_shared_first_token_says_nothing() -> None:
    labels = {"A": ["A", " A"], "B": ["B", " B"]}
    # " A" and " B" both start with a lone space (id 220), as the tiny tokenizer splits them.
    position = _position({"A": (32, 0.3), "B": (33, 0.1), " A": (220, 0.5), " B": (220, 0.5)})
    distribution, mass = label_distribution(position, labels)
    assert distribution == pytest.approx({"A": 0.75, "B": 0.25})
    assert mass == pytest.approx(0.4)
    assert sum(distribution.values()) == pytest.approx(1.0)


def test_variants_of_one_answer_add_up_once_per_token() -> None:
    labels = {"yes": ["yes", " yes", "Yes"], "no": ["no", " no", "No"]}
    position = _position(
        {"yes": (1, 0.2), " yes": (2, 0.4), "Yes": (1, 0.2), "no": (3, 0.1), " no": (4, 0.1)}
    )
    distribution, _ = label_distribution(position, labels)
    assert distribution["yes"] == pytest.approx(0.6 / 0.8)

    # " yes" starting with a lone space (the probe also asks for " ") says nothing about yes.
    spaced = _position({"yes": (1, 0.2), " yes": (220, 0.6), " ": (220, 0.6), "no": (3, 0.2)})
    distribution, mass = label_distribution(spaced, labels)
    assert distribution == pytest.approx({"yes": 0.5, "no": 0.5}) and mass == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("reply", "short", "fmt", "prefix"),
    [
        ("Needle first [1].\nShort answer: A", "A", CHOICE, "Needle first [1].\nShort answer:"),
        ("**Short answer:** B", "B", CHOICE, "**Short answer:**"),
        ("B", "B", CHOICE, ""),
        ("(B) Observation", "B", CHOICE, "("),
        ("The answer is B.", "B", CHOICE, "The answer is"),
        ("Yes, it is.", "yes", YES_NO, ""),
        (
            "A long explanation that never states the letter in so many words at all.",
            "A",
            CHOICE,
            None,
        ),
    ],
)
def test_the_probe_replays_the_reply_up_to_the_short_answer(
    reply: str, short: str, fmt: AnswerFormat, prefix: str | None
) -> None:
    assert answer_prefix(reply, short, fmt) == prefix


# -- confidence on every answer ----------------------------------------------------------------


def test_plain_choice_confidence_is_the_letters_probability(tmp_path: Path) -> None:
    model = FakeModel().script("confidence", Probs({"A": 0.7, "B": 0.2}))
    result = ask(make_agent(tmp_path, model), question(answer_format=CHOICE), mode="plain")

    assert result.short_answer == "A"
    assert result.confidence == pytest.approx(0.7 / 0.9)
    assert result.answer_probabilities == pytest.approx({"A": 0.7 / 0.9, "B": 0.2 / 0.9})
    assert result.confidence_source == "option-probability" and not result.calibrated
    (probe,) = model.calls_for("confidence")
    assert probe.max_tokens == 1 and probe.prefill is not None
    assert probe.prefill.endswith("Short answer:")
    assert probe.logprobs is not None and {"A", " A", "B", " B"} <= set(probe.logprobs.candidates)
    # The probe replays the answer prompt it scores.
    assert probe.messages == model.calls_for("answer")[0].messages


def test_free_answer_confidence_is_the_self_check(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN)
    model.script("confidence", Probs({"yes": 0.3, "no": 0.6}))
    result = ask(make_agent(tmp_path, model, text=FakeTextSearch(corpus())), question())

    assert visited(result) == NODES
    assert result.confidence == pytest.approx(1 / 3)
    assert result.confidence_source == "self-check"
    (probe,) = model.calls_for("confidence")
    assert probe.prefill is None and "Proposed answer:" in probe.last
    assert "Is the proposed answer correct?" in probe.last


def test_a_failed_probe_leaves_confidence_unknown_not_the_answer(tmp_path: Path) -> None:
    from suwen.errors import ModelError
    from tests.fake_model import Fail

    model = FakeModel().script("confidence", Fail(ModelError("server died")))
    result = ask(make_agent(tmp_path, model), question(answer_format=CHOICE), mode="plain")
    assert result.short_answer == "A" and result.confidence is None
    assert [e.node for e in result.trace if e.degraded] == ["assess"]


def test_a_calibration_map_for_this_model_is_applied(tmp_path: Path) -> None:
    agent_settings = make_agent(tmp_path, FakeModel()).settings
    calibration = CalibrationFile(
        model=agent_settings.vlm,
        maps={"choice/plain": CalibrationMap(method="temperature", temperature=2.0)},
    )
    save_calibration(agent_settings.home, calibration)
    assert (agent_settings.home / "calibration.json").stat().st_mode & 0o777 == 0o600

    model = FakeModel().script("confidence", Probs({"A": 0.9, "B": 0.1}))
    result = ask(make_agent(tmp_path, model), question(answer_format=CHOICE), mode="plain")
    assert result.calibrated and result.confidence_raw == pytest.approx(0.9)
    assert result.confidence == pytest.approx(0.75)  # sigmoid(logit(0.9) / 2) = 3 / (3 + 1)

    # A map learnt for another model says nothing about this one.
    save_calibration(agent_settings.home, calibration.model_copy(update={"model": "other"}))
    again = ask(make_agent(tmp_path, FakeModel()), question(answer_format=CHOICE), mode="plain")
    assert not again.calibrated and again.confidence == again.confidence_raw


# -- adaptive mode -----------------------------------------------------------------------------


def test_adaptive_confident_plain_answer_is_two_calls_and_no_search(tmp_path: Path) -> None:
    model = FakeModel().script("confidence", Probs({"A": 0.95, "B": 0.05}))
    text = FakeTextSearch(corpus())
    result = ask(
        make_agent(tmp_path, model, text=text), question(answer_format=CHOICE), mode="adaptive"
    )

    assert result.mode == "adaptive" and result.short_answer == "A"
    assert [call.purpose for call in model.calls] == ["answer", "confidence"]
    assert result.model_calls == 2 and not text.calls and not result.evidence
    assert result.route is not None and result.route.path == "plain"
    assert result.route.threshold == 0.8 and "0.95 >= threshold 0.80" in result.route.reason


def test_adaptive_unconfident_runs_the_agent_and_explains_the_change(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN)
    model.script("answer", "Watch and wait.\nShort answer: B", times=1)  # the plain pass
    model.script("confidence", Probs({"A": 0.45, "B": 0.55}), times=1)
    model.script("confidence", Probs({"A": 0.9, "B": 0.1}))
    text = FakeTextSearch(corpus())
    result = ask(
        make_agent(tmp_path, model, text=text), question(answer_format=CHOICE), mode="adaptive"
    )

    assert result.mode == "adaptive" and result.short_answer == "A"
    assert text.calls and result.citations
    route = result.route
    assert route is not None and route.path == "agent"
    assert route.plain_answer == "B" and route.plain_confidence == pytest.approx(0.55)
    assert "0.55 < threshold 0.80" in route.reason
    assert route.changed is not None
    assert re.fullmatch(
        r"retrieval changed the answer from B to A because of (\[\d\]){1,2}", route.changed
    )
    assert result.confidence == pytest.approx(0.9)
    # Both passes are accounted for.
    assert result.model_calls == len(model.calls)
    assert [e.node for e in result.trace][:3] == ["plain answer", "plain verify", "plain assess"]


def test_adaptive_agreement_is_not_reported_as_a_change(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN).script("confidence", Probs({"A": 0.5, "B": 0.5}))
    result = ask(
        make_agent(tmp_path, model, text=FakeTextSearch(corpus())),
        question(answer_format=CHOICE),
        mode="adaptive",
    )
    assert result.route is not None and result.route.path == "agent"
    assert result.route.changed is None


def test_adaptive_threshold_comes_from_the_calibration_file(tmp_path: Path) -> None:
    agent_settings = make_agent(tmp_path, FakeModel()).settings
    save_calibration(
        agent_settings.home, CalibrationFile(model=agent_settings.vlm, thresholds={"choice": 0.4})
    )
    model = FakeModel().script("confidence", Probs({"A": 0.5, "B": 0.5}))
    result = ask(make_agent(tmp_path, model), question(answer_format=CHOICE), mode="adaptive")
    assert result.route is not None and result.route.path == "plain"
    assert result.route.threshold == 0.4 and "suwen eval --calibrate" in result.route.reason


# -- abstention --------------------------------------------------------------------------------


def _render(result: AgentResult) -> str:
    console = Console(width=120, record=True, force_terminal=False)
    console.print(result_view(result))
    return console.export_text()


def test_below_the_threshold_the_view_leads_with_the_abstention(tmp_path: Path) -> None:
    model = FakeModel().script("confidence", Probs({"A": 0.41, "B": 0.59}))
    agent = make_agent(tmp_path, model, abstain_below=0.5)
    result = ask(agent, question(answer_format=CHOICE), mode="plain")
    assert result.abstained and result.short_answer == "A"
    shown = _render(result)
    assert shown.lstrip().startswith("Suwen is not confident enough to answer (confidence 0.41)")
    assert "Short answer: A" in shown and "uncalibrated" in shown

    sure = make_agent(
        tmp_path, FakeModel().script("confidence", Probs({"A": 0.9})), abstain_below=0.5
    )
    confident = ask(sure, question(answer_format=CHOICE), mode="plain")
    assert not confident.abstained
    assert "not confident" not in _render(confident)
    assert "confidence: 1.00 (uncalibrated" in _render(confident)


@pytest.fixture()
def fake(suwen_home: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COLUMNS", "200")
    opened = Opened()
    previous = runtime.install_backends(opened.backends())
    yield opened
    runtime.install_backends(previous)


def test_batch_records_abstentions_as_their_own_outcome(fake: Opened, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    rows = [{"id": f"q{i}", "question": f"[item {i}] Is a chest tube needed?"} for i in range(3)]
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fake.model.script("confidence", Probs({"yes": 0.9, "no": 0.1}), when="[item 0]")
    fake.model.script("confidence", Probs({"yes": 0.2, "no": 0.8}))
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(folder), "--out", str(out), "--adaptive", "--abstain-below", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    lines = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert lines["q0"]["outcome"] == "answered" and not lines["q0"]["abstained"]
    assert lines["q0"]["route"]["path"] == "plain"
    for item in ("q1", "q2"):
        assert lines[item]["outcome"] == "abstained" and lines[item]["confidence"] < 0.5
        assert lines[item]["route"]["path"] == "agent" and lines[item]["answer"]
    assert re.search(r"of which abstained \(not confident enough\)\s*│\s*2", result.stdout)

    bad = CliRunner().invoke(app, ["batch", str(folder), "--out", str(out), "--abstain-below", "2"])
    assert bad.exit_code == 2 and "--abstain-below 2" in bad.stderr
    both = CliRunner().invoke(
        app, ["batch", str(folder), "--out", str(out), "--plain", "--adaptive"]
    )
    assert both.exit_code == 2 and "choose one" in both.stderr


def test_adaptive_in_a_conversation_keeps_one_turn_per_question(tmp_path: Path) -> None:
    import asyncio

    from suwen.agent.graph import SuwenAgent
    from suwen.agent.sessions import open_sessions
    from suwen.chat_session import ChatSession
    from tests.agent_helpers import settings

    model = FakeModel().script("plan", PLAN)
    model.script("confidence", Probs({"yes": 0.9, "no": 0.1}), times=1)  # first: confident
    model.script("confidence", Probs({"yes": 0.3, "no": 0.7}), times=1)  # second: unsure

    async def go() -> tuple[list[str], list[str | None]]:
        config = settings(tmp_path)
        async with open_sessions(config) as saver:
            agent = SuwenAgent(config, model, FakeTextSearch(corpus()), None, saver)
            session = ChatSession(agent, thread_id="t1")
            assert session.toggle_adaptive() and session.mode == "adaptive"
            first = await session.ask(
                "What is the first-line treatment for a tension pneumothorax?"
            )
            second = await session.ask("And after needle decompression?")
            history = await agent.history("t1")
            paths = [r.route.path if r.route else None for r in (first, second)]
            return [turn.question for turn in history], paths

    questions, paths = asyncio.run(go())
    assert paths == ["plain", "agent"]
    assert questions == [
        "What is the first-line treatment for a tension pneumothorax?",
        "And after needle decompression?",
    ]
    # The escalated agent pass saw the first turn, not its own plain attempt.
    agent_answer = model.calls_for("answer")[-1]
    assert sum("And after needle decompression?" in m.text for m in agent_answer.messages) == 1


def test_ask_adaptive_prints_the_route_and_confidence(fake: Opened) -> None:
    fake.model.script("confidence", Probs({"yes": 0.95, "no": 0.05}))
    shown = CliRunner().invoke(app, ["ask", "Is a chest tube needed?", "--adaptive"])
    assert shown.exit_code == 0, shown.output
    assert "confidence: 0.95 (uncalibrated; the model's self-check of its answer)" in shown.stdout
    assert "adaptive: answered without retrieval: plain answer confidence 0.95" in shown.stdout
    as_json = CliRunner().invoke(app, ["ask", "Is a chest tube needed?", "--adaptive", "--json"])
    result = AgentResult.model_validate_json(as_json.stdout)
    assert result.mode == "adaptive" and result.route is not None and result.route.path == "plain"
    assert result.confidence == pytest.approx(0.95) and not result.calibrated
