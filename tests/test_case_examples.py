"""Similar cases as worked examples: only kept cases, most relevant last, within the image limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from suwen.agent.prompts import EXAMPLES_NOTE
from suwen.config import Settings
from suwen.medimage import load_image
from suwen.types import AgentResult
from tests.agent_helpers import ask, make_agent, question
from tests.fake_model import FakeCall, FakeModel, evidence_items
from tests.fake_search import FakeImageSearch, case_hit

RELEVANCE = {"strong": 0.9, "fair": 0.7, "weak": 0.2}


def judge(call: FakeCall) -> str:
    body = evidence_items(call.last)[0][1]
    score = next(value for word, value in RELEVANCE.items() if word in body)
    return json.dumps({"relevance": score, "quote": body})


@pytest.fixture()
def jpegs(shared_data: Path) -> list[str]:
    return [str(p) for p in sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:4]]


def search(jpegs: list[str], missing: Path | None = None) -> FakeImageSearch:
    hits = [
        case_hit("c-weak", "A weak match.").model_copy(update={"path": jpegs[1]}),
        case_hit("c-fair", "A fair match.").model_copy(update={"path": jpegs[2]}),
        case_hit("c-strong", "A strong match.").model_copy(
            update={"path": str(missing) if missing else jpegs[3]}
        ),
    ]
    return FakeImageSearch([(hit, f"{i}" * 64) for i, hit in enumerate(hits)])


def answer_run(
    tmp_path: Path, jpegs: list[str], context_length: int | None = None, **overrides: Any
) -> tuple[FakeModel, AgentResult]:
    missing = overrides.pop("missing", None)
    plain = overrides.pop("plain", False)
    model = FakeModel(context_length=context_length).script("reread", judge)
    agent = make_agent(tmp_path, model, images=search(jpegs, missing), **overrides)
    q = question("What is shown?", images=[jpegs[0]])
    return model, ask(agent, q, mode="plain" if plain else "agent")


def answer_call(tmp_path: Path, jpegs: list[str], **overrides: Any) -> FakeCall:
    return answer_run(tmp_path, jpegs, **overrides)[0].calls_for("answer")[0]


def answer_trace(result: AgentResult) -> str:
    return next(event.message for event in result.trace if event.node == "answer")


def test_kept_cases_come_first_most_relevant_last(tmp_path: Path, jpegs: list[str]) -> None:
    call = answer_call(tmp_path, jpegs)
    user = call.messages[-1]
    # Evidence is numbered by relevance: [1] strong, [2] fair; the weak case was not kept.
    assert [label for label, _ in evidence_items(user.text)] == ["[1]", "[2]"]
    assert len(user.images) == 3
    assert user.image_labels == [
        "Worked example: another patient's case (c-fair), its caption is evidence [2]:",
        "Worked example: another patient's case (c-strong), its caption is evidence [1]:",
        "This patient's image 1:",
    ]
    assert user.text.startswith(EXAMPLES_NOTE.format(count=2))
    assert [image.size for image in user.images[:2]] == [
        load_image(Path(p)).size for p in jpegs[2:4]
    ]


def test_setting_zero_turns_examples_off(tmp_path: Path, jpegs: list[str]) -> None:
    user = answer_call(tmp_path, jpegs, case_examples=0).messages[-1]
    assert len(user.images) == 1 and user.image_labels == []
    assert "worked examples" not in user.text


def test_examples_fit_the_server_image_limit(tmp_path: Path, jpegs: list[str]) -> None:
    user = answer_call(tmp_path, jpegs, vllm_max_images=2).messages[-1]
    assert len(user.images) == 2
    assert user.image_labels[0].endswith("(c-strong), its caption is evidence [1]:")


def test_a_missing_case_image_is_skipped(tmp_path: Path, jpegs: list[str]) -> None:
    user = answer_call(tmp_path, jpegs, missing=tmp_path / "gone.jpg").messages[-1]
    assert len(user.images) == 2 and "(c-fair)" in user.image_labels[0]


def test_plain_mode_shows_no_examples(tmp_path: Path, jpegs: list[str]) -> None:
    user = answer_call(tmp_path, jpegs, plain=True).messages[-1]
    assert len(user.images) == 1 and user.image_labels == []


def test_two_examples_are_the_default() -> None:
    assert Settings.model_fields["case_examples"].default == 2


def test_examples_then_evidence_are_left_out_until_the_prompt_fits(
    tmp_path: Path, jpegs: list[str]
) -> None:
    """The model length minus the answer's max_tokens bounds the prompt: the least relevant
    example goes first, then the other, then the least relevant evidence; the trace says so."""
    answer_tokens = Settings(home=tmp_path).max_tokens
    model, _ = answer_run(tmp_path / "full", jpegs)
    full = model.measured[0]  # two examples, two evidence items, nothing left out

    model, result = answer_run(tmp_path / "one", jpegs, context_length=full - 1 + answer_tokens)
    user = model.calls_for("answer")[0].messages[-1]
    assert len(user.images) == 2 and "(c-strong)" in user.image_labels[0]
    assert model.measured[-1] <= full - 1
    assert "1 case example(s) left out to fit the model length" in answer_trace(result)

    model, result = answer_run(tmp_path / "bare", jpegs, context_length=50)
    # Measured in turn: full, one example, none, no example and [1] only, nothing.
    assert len(model.measured) == 5 and model.measured[0] == full
    assert "does not fit the model length (50 tokens" in answer_trace(result)
    assert model.calls_for("answer")  # sent all the same: the server has the last word
    limit = model.measured[3] + answer_tokens
    model, result = answer_run(tmp_path / "trim", jpegs, context_length=limit)
    user = model.calls_for("answer")[0].messages[-1]
    assert len(user.images) == 1 and user.image_labels == []
    trace = answer_trace(result)
    assert "2 case example(s) and 1 evidence item(s) left out" in trace, trace
    assert [label for label, _ in evidence_items(user.text)] == ["[1]"]
    assert result.citations and all(c.number == 1 for c in result.citations)
