"""Test-only entry point: the real `suwen` CLI with the scripted fake model and in-memory
searchers installed, for tests that drive it as a separate process (a pseudo-terminal, SIGKILL).

    python -m tests.fake_cli chat ...
    python -m tests.fake_cli batch FOLDER --out answers.jsonl

Knobs (environment, read here only, never by Suwen itself):
    SUWEN_FAKE_CALL_DELAY   seconds every model call takes (default 0)
    SUWEN_FAKE_TOKEN_DELAY  seconds between streamed answer words (default 0)
    SUWEN_FAKE_NO_INDEXES   "1": both indexes are missing (the agent runs without its tools)
    SUWEN_FAKE_CALL_LOG     file to which one JSON line per streamed answer is appended
    SUWEN_FAKE_CORPUS       JSON file {"passages": [TextHit...], "cases": [[ImageHit, sha256]...]}
                            served instead of the built-in corpus (hostile titles, captions, ids)
    SUWEN_FAKE_ANSWER       the text every answer is (what a model could write)
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from suwen.config import Settings
from suwen.errors import IndexMissingError
from suwen.llm.base import Message
from suwen.runtime import Backends, install_backends
from suwen.types import ImageHit, TextHit
from tests.agent_helpers import cases, corpus
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch


class SlowFakeModel(FakeModel):
    """The scripted fake, with a fixed time per call and per streamed word."""

    def __init__(self, call_delay: float, token_delay: float, call_log: Path | None) -> None:
        super().__init__(delay=lambda prompt, completion: call_delay)
        self.token_delay = token_delay
        self.call_log = call_log

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> AsyncIterator[str]:
        async for piece in super().stream(
            messages, max_tokens=max_tokens, temperature=temperature, purpose=purpose
        ):
            await asyncio.sleep(self.token_delay)
            yield piece
        if self.call_log is not None:
            # One JSON line per finished answer, with every message the model saw, so a test
            # can count how often a question was answered and check what context it had.
            prompt = "\n".join(message.text for message in messages)
            with self.call_log.open("a", encoding="utf-8") as handle:
                images = sum(len(message.images) for message in messages)
                labels = [label for message in messages for label in message.image_labels]
                record = {"purpose": purpose, "prompt": prompt, "images": images, "labels": labels}
                handle.write(json.dumps(record) + "\n")


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


def _corpus() -> tuple[list[TextHit], list[tuple[ImageHit, str]]]:
    path = os.environ.get("SUWEN_FAKE_CORPUS")
    if not path:
        return corpus(), cases()
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    passages = [TextHit.model_validate(hit) for hit in data.get("passages", [])]
    similar = [(ImageHit.model_validate(hit), str(sha)) for hit, sha in data.get("cases", [])]
    return passages, similar


def fake_backends() -> Backends:
    log = os.environ.get("SUWEN_FAKE_CALL_LOG")
    model = SlowFakeModel(
        _seconds("SUWEN_FAKE_CALL_DELAY"),
        _seconds("SUWEN_FAKE_TOKEN_DELAY"),
        Path(log) if log else None,
    )
    no_indexes = os.environ.get("SUWEN_FAKE_NO_INDEXES") == "1"
    passages, similar = _corpus()
    if os.environ.get("SUWEN_FAKE_ANSWER"):
        model.script("answer", os.environ["SUWEN_FAKE_ANSWER"])

    @contextmanager
    def open_model(settings: Settings, urls: Sequence[str]) -> Iterator[FakeModel]:
        yield model

    @contextmanager
    def open_text(settings: Settings, name: str) -> Iterator[FakeTextSearch]:
        if no_indexes:
            raise IndexMissingError(f"index {name!r} not found")
        yield FakeTextSearch(passages)

    @asynccontextmanager
    async def open_images(settings: Settings, name: str) -> AsyncIterator[FakeImageSearch]:
        if no_indexes:
            raise IndexMissingError(f"index {name!r} not found")
        yield FakeImageSearch(similar)

    return Backends(open_model=open_model, open_text=open_text, open_images=open_images)


if __name__ == "__main__":
    from suwen.cli import main

    install_backends(fake_backends())
    main()
