"""The agent's loop with a scripted model and in-memory searchers: rounds, citations, plain mode,
tools that are absent or failing, exclusions, concurrency of the reread step, and the result."""

from __future__ import annotations

import json
from pathlib import Path

from suwen.errors import IndexMissingError
from suwen.types import AgentEvent, AnswerFormat
from tests.agent_helpers import (
    NODES,
    ask,
    cases,
    corpus,
    degraded_nodes,
    make_agent,
    question,
    visited,
)
from tests.fake_model import FakeModel, evidence_items
from tests.fake_search import FakeImageSearch, FakeTextSearch

PLAN = json.dumps({"queries": ["tension pneumothorax treatment", "needle decompression"]})


def test_enough_evidence_in_round_one(tmp_path: Path) -> None:
    model = FakeModel().script("plan", PLAN)
    text = FakeTextSearch(corpus())
    result = ask(make_agent(tmp_path, model, text=text), question())

    assert visited(result) == NODES
    assert result.rounds == 1
    assert text.queries == ["tension pneumothorax treatment", "needle decompression"]
    kept = {item.key for item in result.evidence if item.kept}
    dropped = {item.key for item in result.evidence if not item.kept}
    assert kept == {"pmid:111#0", "pmid:444#0"}
    assert "pmid:222#0" in dropped  # judged and scored, but below the threshold
    assert all(item.relevance < 0.5 for item in result.evidence if not item.kept)
    assert [c.number for c in result.citations] == [1, 2]
    assert {c.key for c in result.citations} <= kept
    first = result.citations[0]
    assert first.pmid == "111" and first.title == "Tension pneumothorax management"
    assert first.quote == "Tension pneumothorax requires immediate needle decompression."
    assert result.supported and not result.removed_citations
    assert result.findings is not None and result.findings.candidates
    # Every call is accounted: look, plan, one reread per item, decide, answer, confidence probe.
    assert result.model_calls == len(model.calls) == 3 + len(result.evidence) + 2
    assert result.tokens.prompt > 0 and result.tokens.completion > 0
    assert set(result.timings) == {*NODES, "total"}
    assert sum(result.timings[n] for n in NODES) <= result.timings["total"]
    assert not degraded_nodes(result)


def test_the_text_method_setting_reaches_the_searcher(tmp_path: Path) -> None:
    # A full-PubMed index answers dense queries in ms but BM25 ones in a second (README).
    model = FakeModel().script("plan", PLAN)
    text = FakeTextSearch(corpus())
    ask(make_agent(tmp_path, model, text=text), question())
    assert {method for _, _, method, _ in text.calls} == {"hybrid"}
    dense = FakeTextSearch(corpus())
    ask(
        make_agent(
            tmp_path / "d", FakeModel().script("plan", PLAN), text=dense, text_method="dense"
        ),
        question(),
    )
    assert dense.calls and {method for _, _, method, _ in dense.calls} == {"dense"}


def test_second_round_after_rewrite(tmp_path: Path) -> None:
    decide = json.dumps(
        {"enough": False, "missing": ["chest tube timing"], "queries": ["chest tube outcomes"]}
    )
    model = FakeModel().script("plan", json.dumps({"queries": ["pleural line radiography"]}))
    model.script("decide", decide, times=1)
    text = FakeTextSearch(corpus())
    result = ask(make_agent(tmp_path, model, text=text, rounds=2), question())

    assert result.rounds == 2
    assert visited(result) == [*NODES[:5], "retrieve", "reread", "decide", *NODES[5:]]
    assert text.queries == ["pleural line radiography", "chest tube outcomes"]
    # The rewrite's prompt saw what round one kept and what was already searched.
    decide_prompt = model.calls_for("decide")[0].text
    assert "Already searched: pleural line radiography" in decide_prompt
    # Round two rereads only what round one had not judged.
    keys = [item.key for item in result.evidence]
    assert len(keys) == len(set(keys))
    second = next(item for item in result.evidence if item.key == "pmid:444#0")
    assert second.hit.found_by == ["chest tube outcomes"] and second.kept
    assert "round budget reached (2/2)" in result.trace[-4].message
    assert len(model.calls_for("decide")) == 1  # no model call once the budget is spent


def test_round_budget_bounds_the_loop(tmp_path: Path) -> None:
    counter = iter(range(100))

    def never_enough(call: object) -> str:
        n = next(counter)
        return json.dumps({"enough": False, "missing": ["more"], "queries": [f"pneumothorax {n}"]})

    model = FakeModel().script("decide", never_enough)
    text = FakeTextSearch(corpus())
    result = ask(make_agent(tmp_path, model, text=text, rounds=3), question())

    assert result.rounds == 3
    assert visited(result).count("retrieve") == 3
    assert len(model.calls_for("decide")) == 2
    last_decision = [e for e in result.trace if e.node == "decide"][-1]
    assert "round budget reached (3/3)" in last_decision.message


def test_one_round_budget_never_asks_to_rewrite(tmp_path: Path) -> None:
    model = FakeModel()
    result = ask(make_agent(tmp_path, model, text=FakeTextSearch(corpus()), rounds=1), question())
    assert result.rounds == 1 and not model.calls_for("decide")


def test_not_enough_without_new_queries_answers(tmp_path: Path) -> None:
    decide = json.dumps({"enough": False, "missing": ["x"], "queries": ["needle decompression"]})
    model = FakeModel().script("plan", PLAN).script("decide", decide)
    result = ask(make_agent(tmp_path, model, text=FakeTextSearch(corpus())), question())
    assert result.rounds == 1  # the only "new" query was already searched
    assert "no new queries" in next(e for e in result.trace if e.node == "decide").message


def test_invalid_citation_is_stripped_and_reported(tmp_path: Path) -> None:
    reply = (
        "Needle decompression comes first in tension pneumothorax [1]. "
        "A chest tube follows once the patient is stable [7]. "
        "Both steps are standard in trauma care [2, 9]."
    )
    model = FakeModel().script("plan", PLAN).script("answer", reply)
    result = ask(make_agent(tmp_path, model, text=FakeTextSearch(corpus())), question())

    assert "[7]" not in result.answer and "[2, 9]" not in result.answer
    assert "is stable." in result.answer and "care [2]." in result.answer
    assert result.removed_citations == ["7", "9"]
    assert [c.number for c in result.citations] == [1, 2]
    assert result.unsupported_sentences == ["A chest tube follows once the patient is stable."]
    assert not result.supported


def test_plain_mode_answers_without_retrieval(tmp_path: Path) -> None:
    model = FakeModel()
    text = FakeTextSearch(corpus())
    images = FakeImageSearch(cases())
    fmt = AnswerFormat(kind="choice", options={"A": "Needle decompression", "B": "Observation"})
    result = ask(
        make_agent(tmp_path, model, text=text, images=images),
        question(answer_format=fmt),
        mode="plain",
    )

    assert result.mode == "plain"
    assert visited(result) == ["answer", "verify", "assess"]
    assert not text.calls and not images.calls
    assert [call.purpose for call in model.calls] == ["answer", "confidence"]
    assert "<evidence" not in model.calls[0].text
    assert "Options:\nA. Needle decompression\nB. Observation" in model.calls[0].text
    assert result.short_answer == "A"
    assert "Short answer" not in result.answer
    assert result.evidence == [] and result.citations == [] and not result.supported
    assert result.rounds == 0 and result.model_calls == 2  # the answer and its confidence probe


def test_missing_indexes_are_reported_not_fatal(tmp_path: Path) -> None:
    model = FakeModel()
    result = ask(make_agent(tmp_path, model), question())

    assert visited(result) == NODES
    messages = " | ".join(event.message for event in result.trace)
    assert "no PubMed index" in messages
    assert result.evidence == [] and result.citations == []
    assert not model.calls_for("plan") and not model.calls_for("decide")
    assert result.answer  # answered from the model's own knowledge
    assert "No evidence was retrieved" in model.calls_for("answer")[0].text


def test_failing_search_degrades_retrieve(tmp_path: Path) -> None:
    text = FakeTextSearch(corpus(), fail=IndexMissingError("pubmed: index not found"))
    result = ask(make_agent(tmp_path, FakeModel().script("plan", PLAN), text=text), question())

    assert "retrieve" in degraded_nodes(result)
    retrieve = next(e for e in result.trace if e.node == "retrieve")
    assert "search failed: pubmed: index not found" in retrieve.message
    assert result.answer and result.evidence == []


def test_exclusions_reach_the_searchers(tmp_path: Path, shared_data: Path) -> None:
    text = FakeTextSearch(corpus())
    images = FakeImageSearch(cases())
    image = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]
    q = question(images=[str(image)], exclude_pmids=["111"], exclude_image_sha256=["a" * 64])
    result = ask(
        make_agent(tmp_path, FakeModel().script("plan", PLAN), text=text, images=images), q
    )

    assert all(call[3] == {"111"} for call in text.calls)
    assert images.calls and images.calls[0][2] == {"a" * 64}
    keys = {item.key for item in result.evidence}
    assert "pmid:111#0" not in keys and "case:synpic1" not in keys
    assert "case:synpic2" in keys


def test_duplicate_hits_merge_with_provenance(tmp_path: Path) -> None:
    plan = json.dumps({"queries": ["tension pneumothorax", "needle decompression tension"]})
    result = ask(
        make_agent(tmp_path, FakeModel().script("plan", plan), text=FakeTextSearch(corpus())),
        question(),
    )
    keys = [item.key for item in result.evidence]
    assert len(keys) == len(set(keys))
    item = next(item for item in result.evidence if item.key == "pmid:111#0")
    assert item.hit.found_by == ["tension pneumothorax", "needle decompression tension"]


def test_reread_shares_a_prefix_and_runs_concurrently(tmp_path: Path) -> None:
    model = FakeModel(delay=lambda prompt, completion: 0.02).script("plan", PLAN)
    result = ask(make_agent(tmp_path, model, text=FakeTextSearch(corpus())), question())

    rereads = model.calls_for("reread")
    assert len(rereads) == len(result.evidence) >= 3
    prefixes = {tuple((m.role, m.text) for m in call.messages[:-1]) for call in rereads}
    assert len(prefixes) == 1  # the same system + question prefix for every item
    assert not evidence_items("".join(text for _, text in next(iter(prefixes))))
    first, rest = rereads[0], rereads[1:]
    assert all(call.started >= first.ended for call in rest)  # the prefix is cached first
    assert model.max_in_flight > 1  # then the rest go together


def test_image_question_looks_and_searches_similar_cases(tmp_path: Path, shared_data: Path) -> None:
    image = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]
    model = FakeModel().script("plan", PLAN)
    images = FakeImageSearch(cases())
    events: list[AgentEvent] = []
    result = ask(
        make_agent(tmp_path, model, text=FakeTextSearch(corpus()), images=images),
        question("Is there a pneumothorax in this chest image?", images=[str(image)]),
        events,
    )

    look = model.calls_for("look")[0]
    assert look.images == 1 and look.messages[-1].images[0].mode == "RGB"
    assert len(images.calls) == 1  # similar cases are searched once, in round one
    case = next(item for item in result.evidence if item.key == "case:synpic1")
    assert case.hit.found_by == [f"similar to {image.name}"]
    assert model.calls_for("answer")[0].images == 1
    starts = {e.node: e.message for e in events if e.kind == "node_start"}
    assert starts["look"] == "looking at the image"
    assert starts["retrieve"] == (
        "searching PubMed: tension pneumothorax treatment; needle decompression and similar cases"
    )


def test_a_run_without_a_listener_answers_as_one_with_a_listener(tmp_path: Path) -> None:
    """Batch and eval run without a listener, and then no token events are streamed; the
    answer, citations and trace must not depend on that."""
    runs = []
    for events in (None, []):
        model = FakeModel().script("plan", PLAN)
        agent = make_agent(tmp_path / str(events is None), model, text=FakeTextSearch(corpus()))
        runs.append((ask(agent, question(), events), events))
    (quiet, _), (heard, events) = runs
    assert quiet.answer == heard.answer and quiet.answer
    assert quiet.citations == heard.citations and quiet.citations
    assert visited(quiet) == visited(heard) == NODES
    assert quiet.model_calls == heard.model_calls
    assert events and "".join(e.token or "" for e in events if e.kind == "token") == heard.answer
