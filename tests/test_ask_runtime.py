"""runtime.open_agent: what it opens, what it leaves out (and says), and that it closes all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.errors import IndexMismatchError, IndexMissingError
from suwen.runtime import Backends, _Closing, open_agent, run_async
from suwen.types import AgentResult
from tests.agent_helpers import QUESTION, cases, corpus, question
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch


class Recorder:
    def __init__(self, text_error: Exception | None = None, image_error: Exception | None = None):
        self.events: list[str] = []
        self.text_error = text_error
        self.image_error = image_error
        self.text = FakeTextSearch(corpus())
        self.urls: list[str] = []

    @asynccontextmanager
    async def open_model(self, settings: Settings, urls: Sequence[str]) -> AsyncIterator[FakeModel]:
        self.urls = list(urls)
        self.events.append("model up")
        try:
            yield FakeModel()
        finally:
            self.events.append("model down")

    @contextmanager
    def open_text(self, settings: Settings, name: str) -> Iterator[FakeTextSearch]:
        if self.text_error:
            raise self.text_error
        self.events.append(f"text {name}")
        try:
            yield self.text
        finally:
            self.events.append("text closed")

    @contextmanager
    def open_images(self, settings: Settings, name: str) -> Iterator[FakeImageSearch]:
        if self.image_error:
            raise self.image_error
        self.events.append(f"images {name}")
        yield FakeImageSearch(cases())

    def backends(self) -> Backends:
        return Backends(self.open_model, self.open_text, self.open_images)


def _settings(tmp_path: Path, **values) -> Settings:
    return Settings(home=tmp_path / "home", **values)


def test_open_agent_assembles_everything_and_closes_it_in_reverse(tmp_path: Path) -> None:
    recorder = Recorder()
    settings = _settings(tmp_path, vllm_url=["http://127.0.0.1:8111/v1"])

    async def run() -> None:
        async with open_agent(settings, backends=recorder.backends(), text_index="t") as agent:
            assert agent.checkpointer is not None
            result = await agent.run(question(), thread_id="x")
            assert result.citations and result.thread_id == "x"
            assert await agent.history("x")

    asyncio.run(run())
    assert recorder.urls == ["http://127.0.0.1:8111/v1"]  # the setting, as no URL was given
    assert recorder.events == ["text t", "images images", "model up", "model down", "text closed"]
    assert settings.sessions_db.is_file()


def test_missing_indexes_are_left_out_and_reported(tmp_path: Path) -> None:
    recorder = Recorder(
        text_error=IndexMissingError("index 'pubmed' not found"),
        image_error=IndexMissingError("index 'images' not found"),
    )
    notices: list[str] = []

    async def run() -> AgentResult:
        async with open_agent(
            _settings(tmp_path),
            ["http://127.0.0.1:1/v1"],
            sessions=False,
            backends=recorder.backends(),
            on_notice=notices.append,
        ) as agent:
            assert agent.checkpointer is None
            assert agent.nodes.text_search is None and agent.nodes.image_search is None
            return await agent.run(question(QUESTION))

    result = asyncio.run(run())
    assert result.answer and result.evidence == []
    assert recorder.urls == ["http://127.0.0.1:1/v1"]
    assert notices == [
        "index 'pubmed' not found -- answering without PubMed search",
        "index 'images' not found -- answering without similar-case search",
    ]


def test_other_index_errors_stop_before_a_model_is_started(tmp_path: Path) -> None:
    recorder = Recorder(image_error=IndexMismatchError("index 'images' was built with X"))

    async def run() -> None:
        async with open_agent(_settings(tmp_path), backends=recorder.backends()):
            pass

    with pytest.raises(IndexMismatchError):
        asyncio.run(run())
    assert recorder.events == ["text pubmed", "text closed"]


def test_everything_closes_when_the_body_fails(tmp_path: Path) -> None:
    recorder = Recorder()

    async def run() -> None:
        async with open_agent(_settings(tmp_path), backends=recorder.backends()):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(run())
    assert recorder.events[-2:] == ["model down", "text closed"]


def test_real_searchers_are_closed_when_they_can_be() -> None:
    class Searcher:
        closed = 0

        def close(self) -> None:
            self.closed += 1

    searcher = Searcher()
    with _Closing(searcher) as opened:
        assert opened is searcher
    assert searcher.closed == 1
    with _Closing(object()):  # nothing to close: nothing happens
        pass


def test_what_an_open_agent_loaded_is_kept_out_of_full_collections_until_it_closes(
    tmp_path: Path,
) -> None:
    """Encoders and indexes live as long as the agent: the cyclic collector does not walk
    them on every full collection, and gets them back when the last agent closes."""
    import gc

    from suwen.runtime import AGENT_GC_THRESHOLDS

    recorder = Recorder()
    frozen_before = gc.get_freeze_count()
    thresholds_before = gc.get_threshold()
    assert thresholds_before != AGENT_GC_THRESHOLDS
    seen: list[int] = []

    async def run() -> None:
        async with open_agent(_settings(tmp_path), backends=recorder.backends()) as outer:
            seen.append(gc.get_freeze_count())
            assert gc.get_threshold() == AGENT_GC_THRESHOLDS  # young collections less often
            async with open_agent(_settings(tmp_path), backends=recorder.backends()):
                pass
            seen.append(gc.get_freeze_count())  # the inner agent closing thaws nothing
            assert gc.get_threshold() == AGENT_GC_THRESHOLDS
            assert (await outer.run(question())).citations

    asyncio.run(run())
    assert seen[0] > frozen_before and seen[1] >= seen[0]
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == thresholds_before  # the last agent closing restores them


async def _loop_kind() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_commands_run_on_uvloop_and_on_asyncio_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_async(_loop_kind()) == "uvloop"
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: ImportError
    assert run_async(_loop_kind()) == "asyncio"


def test_ctrl_c_cancels_what_runs_and_raises_keyboard_interrupt() -> None:
    # batch and eval rely on it: the answers in flight are cancelled (their cleanup runs),
    # then KeyboardInterrupt reaches the command, which says what was saved.
    cleaned: list[str] = []

    async def interrupted() -> None:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append(await _loop_kind())

    with pytest.raises(KeyboardInterrupt):
        run_async(interrupted())
    assert cleaned == ["uvloop"]
