"""The agent as a LangGraph state machine, and ``SuwenAgent``, the one way to run it.

    START -> look -> plan -> retrieve -> reread -> decide -(more?)-> retrieve ...
                                                         \\-> answer -> verify -> assess -> END
    START (plain mode) --------------------------------------> answer -> verify -> assess -> END

Each node is wrapped so it announces itself on the custom stream, is timed, and appends one
``TraceEvent``. ``run`` turns the stream into ``AgentEvent`` callbacks for the chat and the
final state into an ``AgentResult``. With a checkpointer, the state of each thread (its
conversation so far) persists, so follow-ups see earlier turns and a chat can be resumed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from PIL import Image

from suwen.agent.nodes import (
    AgentNodes,
    Emit,
    NodeName,
    StepFunction,
    look_or_answer_plainly,
    search_again_or_answer,
    start_message,
    traced_update,
)
from suwen.agent.state import AgentState, RunContext, Turn, graph_input
from suwen.agent.state import fresh_question_state as fresh_state
from suwen.config import Settings
from suwen.errors import InputError
from suwen.evaluate.calibration import CalibrationFile, load_calibration
from suwen.llm.base import CallLog, VisionLanguageModel, recording
from suwen.privacy import no_tracing
from suwen.tools.cases import ImageSearch
from suwen.tools.pubmed import TextSearch
from suwen.types import (
    AgentEvent,
    AgentResult,
    Confidence,
    GraphMode,
    Mode,
    Question,
    TokenUsage,
    TraceEvent,
)

log = logging.getLogger(__name__)

Graph = CompiledStateGraph[AgentState, RunContext, AgentState, AgentState]
EventHandler = Callable[[AgentEvent], None]


def calibration_for(settings: Settings) -> CalibrationFile | None:
    """The data home's calibration file when it belongs to the model in use (a map learnt for
    another model says nothing about this one's confidence)."""
    calibration = load_calibration(settings.home)
    return calibration if calibration and calibration.model == settings.vlm else None


def _traced(name: NodeName, step: StepFunction) -> Callable[..., Awaitable[AgentState]]:
    """The node LangGraph runs: announce, time, run the step, append its trace event."""

    async def node(state: AgentState, *, runtime: Runtime[RunContext]) -> AgentState:
        emit: Emit = runtime.stream_writer
        context = runtime.context
        emit(AgentEvent(kind="node_start", node=name, message=start_message(name, state, context)))
        return await traced_update(name, step, state, context, emit)

    node.__name__ = name
    return node


def build_graph(nodes: AgentNodes) -> StateGraph[AgentState, RunContext, AgentState, AgentState]:
    steps: dict[NodeName, StepFunction] = {
        "look": nodes.look,
        "plan": nodes.plan,
        "retrieve": nodes.retrieve,
        "reread": nodes.reread,
        "decide": nodes.decide,
        "answer": nodes.answer,
        "verify": nodes.verify,
        "assess": nodes.assess,
    }
    graph = StateGraph(AgentState, context_schema=RunContext)
    for name, step in steps.items():
        graph.add_node(name, _traced(name, step))
    graph.add_conditional_edges(START, look_or_answer_plainly, ["look", "answer"])
    graph.add_edge("look", "plan")
    graph.add_edge("plan", "retrieve")
    graph.add_edge("retrieve", "reread")
    graph.add_edge("reread", "decide")
    graph.add_conditional_edges("decide", search_again_or_answer, ["retrieve", "answer"])
    graph.add_edge("answer", "verify")
    graph.add_edge("verify", "assess")
    graph.add_edge("assess", END)
    return graph


def load_question_images(
    paths: list[str],
    slices: int = 6,
    question: str = "",
    priors: list[str] | None = None,
    dates: dict[str, str] | None = None,
) -> list[tuple[str, Image.Image]]:
    """Decode every image once per run (raises InputError naming a file that cannot be read);
    a volume becomes its labelled views (suwen.volumes), and with a prior study each image is
    labelled with its study's role and date (suwen.studies), priors first."""
    from suwen.studies import assign_roles, study_views  # through the one loader, medimage

    return study_views(assign_roles(paths, priors or [], dates), slices, question)


def check_image_budget(images: list[tuple[str, Image.Image]], limit: int) -> None:
    """Refuse, before any model call, a question whose images and volume views exceed what
    one prompt may carry (the server would refuse it anyway, after the work before it)."""
    if len(images) > limit:
        raise InputError(
            f"{len(images)} images (volume views counted) for one question: the server admits "
            f"{limit} (setting vllm_max_images); show fewer slices with --slices or set "
            "vllm_max_images higher"
        )


class SuwenAgent:
    """Answers questions about medical images and medicine, with or without retrieval."""

    def __init__(
        self,
        settings: Settings,
        model: VisionLanguageModel,
        text_search: TextSearch | None,
        image_search: ImageSearch | None,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
    ) -> None:
        self.settings = settings
        self.nodes = AgentNodes(settings, model, text_search, image_search)
        self.checkpointer = checkpointer
        self.graph: Graph = build_graph(self.nodes).compile(checkpointer=checkpointer)
        self.calibration = calibration_for(settings)

    @property
    def model(self) -> VisionLanguageModel:
        """The model every node calls (plain-mode evaluation and the judge use it directly)."""
        return self.nodes.model

    def _config(self, thread_id: str | None) -> RunnableConfig:
        # Each round is retrieve + reread + decide; the explicit round counter in the state is
        # what bounds the loop, this limit only guards against a routing bug.
        config: RunnableConfig = {"recursion_limit": 8 + 3 * self.settings.rounds}
        if thread_id is not None:
            config["configurable"] = {"thread_id": thread_id}
        return config

    async def _thread_state(self, thread_id: str | None) -> dict[str, Any]:
        if self.checkpointer is None or thread_id is None:
            return {}
        snapshot = await self.graph.aget_state(self._config(thread_id))
        values = snapshot.values
        return values if isinstance(values, dict) else {}

    async def history(self, thread_id: str) -> list[Turn]:
        """The finished turns of a conversation (empty for an unknown thread)."""
        turns = (await self._thread_state(thread_id)).get("history", [])
        return list(turns)

    async def run(
        self,
        question: Question,
        *,
        mode: Mode = "agent",
        thread_id: str | None = None,
        on_event: EventHandler | None = None,
    ) -> AgentResult:
        """Answer one question. In a thread, a question without images is about the images
        the conversation already has. ``adaptive``: the plain answer when it is confident
        enough, else the agent's (see ``suwen.agent.adaptive``)."""
        if not question.text.strip():
            raise InputError("question: empty question")
        if thread_id is None and self.checkpointer is not None:
            thread_id = uuid.uuid4().hex
        if mode == "adaptive":
            from suwen.agent.adaptive import run_adaptive

            return await run_adaptive(self, question, thread_id, on_event)
        return await self.run_mode(question, mode, thread_id, on_event)

    async def run_mode(
        self,
        question: Question,
        mode: GraphMode,
        thread_id: str | None,
        on_event: EventHandler | None,
        *,
        history: list[Turn] | None = None,
    ) -> AgentResult:
        """One pass of the graph in ``mode``; ``history`` replaces the thread's (adaptive mode
        uses it to take back a plain turn it did not keep)."""
        started = time.perf_counter()
        previous = await self._thread_state(thread_id)
        paths = list(question.images) or list(previous.get("images", []))
        # Decoding (a DICOM series, a NIfTI volume) is slow work: keep the loop free for
        # the other questions a batch runs at the same time.
        images = await asyncio.to_thread(
            load_question_images,
            paths,
            self.settings.volume_slices,
            question.text,
            list(question.prior_images),
            dict(question.image_dates),
        )
        check_image_budget(images, self.settings.vllm_max_images)
        context = RunContext(images=images, stream=on_event is not None)
        # No LangSmith trace, whatever the environment or a caller configured: questions,
        # images' findings and answers stay on this machine.
        with recording() as log, no_tracing():
            start = fresh_state(question, paths, mode)
            if history is not None:
                start["history"] = history
            final = await self._stream(graph_input(start), context, thread_id, on_event)
        result = _result(question, mode, final, log, time.perf_counter() - started, thread_id)
        return self.judged(result, question, final["confidence"])

    def judged(
        self, result: AgentResult, question: Question, measured: Confidence | None
    ) -> AgentResult:
        """The result with its confidence (calibrated when a map applies) and abstention."""
        from suwen.agent.adaptive import with_confidence

        return with_confidence(result, question, measured, self.calibration, self.settings)

    async def _stream(
        self,
        state: AgentState,
        context: RunContext,
        thread_id: str | None,
        on_event: EventHandler | None,
    ) -> AgentState:
        notify = on_event or (lambda event: None)
        final: AgentState = state
        async for part in self.graph.astream(
            state,
            self._config(thread_id),
            context=context,
            # Without a listener (batch, eval) the nodes' own events are not streamed:
            # LangGraph then drops them where they are written instead of waking the event
            # loop once per answer token. Each node's update still is (degraded steps are
            # logged from it).
            stream_mode=["custom", "updates", "values"] if on_event else ["updates", "values"],
            version="v2",
            # One checkpoint per finished question, not one per step: a conversation only
            # ever resumes from a finished turn, and per-step SQLite commits cost more than
            # the rest of the orchestration together (benchmarks/agent_overhead.py).
            durability="exit" if self.checkpointer is not None else None,
        ):
            if part["type"] == "custom" and isinstance(part["data"], AgentEvent):
                notify(part["data"])
            elif part["type"] == "updates":
                for node, update in part["data"].items():
                    _announce_end(node, update, notify)
            elif part["type"] == "values":
                final = part["data"]
        return final


def _announce_end(node: str, update: Any, notify: EventHandler) -> None:
    trace = update.get("trace") if isinstance(update, dict) else None
    if not trace:
        return
    event: TraceEvent = trace[-1]
    notify(AgentEvent(kind="node_end", node=node, message=event.message))
    if event.degraded:
        # Step messages are about the machinery (counts, servers, errors), not the patient.
        log.warning("degraded step %s: %s", node, event.message)
        notify(AgentEvent(kind="info", node=node, message=f"degraded: {event.message}"))


def _result(
    question: Question,
    mode: GraphMode,
    state: AgentState,
    log: CallLog,
    seconds: float,
    thread_id: str | None,
) -> AgentResult:
    trace = state["trace"]
    timings: dict[str, float] = {}
    for event in trace:
        timings[event.node] = timings.get(event.node, 0.0) + event.seconds
    timings["total"] = seconds
    return AgentResult(
        question=question.text,
        mode=mode,
        answer=state["answer"],
        short_answer=state["short_answer"],
        citations=state["citations"],
        evidence=state["evidence"],
        findings=state["findings"],
        rounds=state["round"],
        model_calls=log.calls,
        tokens=TokenUsage(prompt=log.prompt_tokens, completion=log.completion_tokens),
        timings=timings,
        supported=state["supported"],
        unsupported_sentences=state["unsupported_sentences"],
        removed_citations=state["removed_citations"],
        trace=trace,
        thread_id=thread_id,
    )
