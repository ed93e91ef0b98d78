"""Case examples, volumes and prior studies through a real vLLM server (the tiny random
checkpoint on the CPU).

The tiny model's words are random, so the decisions it would make (which cases the reread
keeps, what look sees) are scripted, and every request that carries the question's images (the
answer, the report, the confidence probe) goes to the real server through a transport that
records it. What must hold whatever the model says: the images, their number and their labels
reach the request; the prompt is measured as the server counts it; it stays within the model
length, and the server takes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from suwen import runtime
from suwen.cli import app
from suwen.config import Settings
from suwen.llm.base import (
    ChatReply,
    Message,
    PromptSize,
    VisionLanguageModel,
    recording,
)
from suwen.llm.client import VLLMClient, to_openai_messages
from suwen.medimage import load_image
from suwen.privacy import local_api_key
from suwen.types import AgentResult, DraftReport
from tests.agent_helpers import ask, corpus, question
from tests.fake_model import FakeModel
from tests.fake_search import FakeImageSearch, FakeTextSearch
from tests.test_case_examples import judge, search

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
T = TypeVar("T", bound=BaseModel)


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards to the server and keeps the body of every chat request."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.chats: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions"):
            self.chats.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class JudgedModel:
    """The real server for every request that shows the question's images to write text (the
    answer, the report, the confidence probe) and for measuring prompts; the scripted model for
    structured decisions (look, plan, reread, decide), which random weights cannot make."""

    def __init__(self, real: VLLMClient, scripted: FakeModel) -> None:
        self.real, self.scripted = real, scripted
        self.sizes: list[PromptSize] = []

    async def prompt_size(self, messages: list[Message]) -> PromptSize:
        size = await self.real.prompt_size(messages)
        self.sizes.append(size)
        return size

    async def chat(self, messages: list[Message], **kwargs: Any) -> ChatReply:
        return await self.real.chat(messages, **kwargs)

    def stream(self, messages: list[Message], **kwargs: Any) -> AsyncIterator[str]:
        return self.real.stream(messages, **kwargs)

    async def structured(self, messages: list[Message], schema: type[T], **kwargs: Any) -> T:
        return await self.scripted.structured(messages, schema, **kwargs)


@pytest.fixture()
def server_key(vllm_settings: Settings) -> str | None:
    # The shared server was started from the fixture's data home: a client passes its key.
    return local_api_key(vllm_settings.home)


def judged(
    url: str, settings: Settings, key: str | None, scripted: FakeModel
) -> tuple[JudgedModel, RecordingTransport]:
    transport = RecordingTransport()
    real = VLLMClient([url], settings, api_key=key, transport=transport)
    return JudgedModel(real, scripted), transport


def parts_of(request: dict[str, Any]) -> list[dict[str, Any]]:
    content = request["messages"][-1]["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def image_labels(request: dict[str, Any]) -> list[str]:
    """The text part just before each image of the request's last message."""
    parts = parts_of(request)
    return [
        parts[i - 1]["text"] if i and parts[i - 1]["type"] == "text" else ""
        for i, part in enumerate(parts)
        if part["type"] == "image_url"
    ]


def answer_request(transport: RecordingTransport) -> dict[str, Any]:
    """The answer's request: streamed when someone listens (the CLI), else the one chat request
    that is neither structured (a schema) nor the confidence probe (log-probabilities)."""
    probe_or_structured = ("response_format", "logprobs", "logprob_token_ids")
    return next(
        chat
        for chat in transport.chats
        if chat.get("stream") or not any(chat.get(key) for key in probe_or_structured)
    )


@pytest.fixture()
def jpegs(shared_data: Path) -> list[str]:
    return [str(p) for p in sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:4]]


def test_prompt_size_is_the_servers_own_count(
    vllm_settings: Settings, vllm_url: str, server_key: str | None, jpegs: list[str]
) -> None:
    """Text through the server's tokenizer plus visual tokens for the sent size is exactly
    what vLLM counts for the same request with its images, and its max_model_len is known."""
    images = [load_image(Path(p)) for p in jpegs[:2]]
    images[1] = images[1].resize((333, 517))  # not a multiple of 28: resized when sent
    messages = [
        Message(role="system", text="You are a radiologist."),
        Message(
            role="user",
            text="Compare the two studies.",
            images=images,
            image_labels=["prior study (2019-01-01): a.jpg", "current study (2021-02-03): b.jpg"],
        ),
    ]

    async def measure() -> tuple[PromptSize, int]:
        async with VLLMClient([vllm_url], vllm_settings, api_key=server_key) as client:
            size = await client.prompt_size(messages)
        body = {"messages": to_openai_messages(messages, vllm_settings)}
        headers = {"Authorization": f"Bearer {server_key or 'EMPTY'}"}
        async with httpx.AsyncClient(headers=headers, trust_env=False) as http:
            reply = await http.post(f"{vllm_url}/tokenize", json=body, timeout=120)
        reply.raise_for_status()
        return size, int(reply.json()["count"])

    size, server_count = asyncio.run(measure())
    assert size.tokens == server_count
    assert size.limit == vllm_settings.vllm_max_model_len


def _run_agent(
    tmp_path: Path, url: str, key: str | None, jpegs: list[str], image: str, **overrides: Any
) -> tuple[AgentResult, JudgedModel, RecordingTransport, list[int]]:
    from suwen.agent.graph import SuwenAgent

    values: dict[str, Any] = {"home": tmp_path / "home", "max_tokens": 32, "rounds": 1}
    settings = Settings.model_validate({**values, "confidence": False, **overrides})
    model, transport = judged(url, settings, key, FakeModel().script("reread", judge))
    agent = SuwenAgent(settings, model, None, search(jpegs), None)  # type: ignore[arg-type]
    with recording() as log:
        result = ask(agent, question("What is shown?", images=[image]))
    prompt_tokens = [r.prompt_tokens for r in log.records if r.purpose == "answer"]
    return result, model, transport, prompt_tokens


def example_labels(request: dict[str, Any]) -> list[str]:
    return [label for label in image_labels(request) if label.startswith("Worked example")]


def test_two_case_examples_reach_the_model_within_its_length(
    tmp_path: Path,
    vllm_settings: Settings,
    vllm_url: str,
    server_key: str | None,
    jpegs: list[str],
) -> None:
    result, model, transport, prompt_tokens = _run_agent(
        tmp_path, vllm_url, server_key, jpegs, jpegs[0], vlm=vllm_settings.vlm
    )
    request = answer_request(transport)
    assert image_labels(request) == [
        "Worked example: another patient's case (c-fair), its caption is evidence [2]:",
        "Worked example: another patient's case (c-strong), its caption is evidence [1]:",
        "This patient's image 1:",
    ]
    # The server took it and counted exactly what Suwen measured before sending it.
    assert result.answer.strip() and prompt_tokens == [model.sizes[-1].tokens]
    assert prompt_tokens[0] + request["max_tokens"] <= vllm_settings.vllm_max_model_len
    trace = next(e.message for e in result.trace if e.node == "answer")
    assert "2 similar cases shown as worked examples" in trace and "left out" not in trace


def test_examples_that_would_overflow_the_model_length_are_left_out(
    tmp_path: Path,
    vllm_settings: Settings,
    vllm_url: str,
    server_key: str | None,
    jpegs: list[str],
    shared_data: Path,
) -> None:
    """A volume's four views and two examples, each sent at about 1 Mpx (1,200 visual tokens
    or so, within the server's own pixel budget), do not fit 8,192 tokens: the least relevant
    example is left out, the request fits, the server answers."""
    volume = str(shared_data / "imaging" / "nifti" / "anatomical.nii")
    result, model, transport, prompt_tokens = _run_agent(
        tmp_path,
        vllm_url,
        server_key,
        jpegs,
        volume,
        vlm=vllm_settings.vlm,
        volume_slices=2,
        vllm_image_min_pixels=950_000,
    )
    limit = vllm_settings.vllm_max_model_len
    request = answer_request(transport)
    assert example_labels(request) == [
        "Worked example: another patient's case (c-strong), its caption is evidence [1]:",
    ]
    assert len(image_labels(request)) == 5  # the volume's 4 views and one example
    assert model.sizes[0].tokens + 32 > limit  # as first built: two examples
    assert prompt_tokens == [model.sizes[-1].tokens] and prompt_tokens[0] + 32 <= limit
    assert result.answer.strip()
    trace = next(e.message for e in result.trace if e.node == "answer")
    assert f"1 case example(s) left out to fit the model length ({limit} tokens" in trace


@pytest.fixture()
def cli_backends(
    vllm_settings: Settings,
    vllm_url: str,
    server_key: str | None,
    suwen_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[RecordingTransport]]:
    """The CLI with the real server behind JudgedModel and in-memory searchers."""
    monkeypatch.setenv("SUWEN_VLM", vllm_settings.vlm)
    monkeypatch.setenv("SUWEN_MAX_TOKENS", "24")
    monkeypatch.setenv("SUWEN_CONFIDENCE", "false")
    monkeypatch.setenv("COLUMNS", "200")
    transports: list[RecordingTransport] = []

    @asynccontextmanager
    async def open_model(settings: Settings, urls: Any) -> AsyncIterator[VisionLanguageModel]:
        model, transport = judged(vllm_url, settings, server_key, FakeModel())
        transports.append(transport)
        async with model.real:
            yield model  # type: ignore[misc]

    @asynccontextmanager
    async def open_text(settings: Settings, name: str) -> AsyncIterator[FakeTextSearch]:
        yield FakeTextSearch(corpus())

    @asynccontextmanager
    async def open_images(settings: Settings, name: str) -> AsyncIterator[FakeImageSearch]:
        yield FakeImageSearch([])

    previous = runtime.install_backends(runtime.Backends(open_model, open_text, open_images))
    yield transports
    runtime.install_backends(previous)


def test_ask_volume_views_reach_the_model_labelled(
    cli_backends: list[RecordingTransport], shared_data: Path
) -> None:
    volume = shared_data / "imaging" / "nifti" / "anatomical.nii"
    argv = ["ask", "--image", str(volume), "--slices", "3", "--plain", "--json", "Any mass?"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert AgentResult.model_validate_json(result.stdout).answer.strip()
    labels = image_labels(answer_request(cli_backends[-1]))
    axial = [label for label in labels if " axial slice " in label]
    assert len(axial) == 3 and len(labels) == 5  # 3 slices + coronal and sagittal reformats
    assert all(label.startswith("Image ") and "anatomical.nii: " in label for label in labels)
    assert all(" mm, window " in label for label in labels)


def test_ask_prior_and_current_reach_the_model_with_role_and_date(
    cli_backends: list[RecordingTransport], tmp_path: Path, jpegs: list[str]
) -> None:
    old = tmp_path / "old.jpg"
    old.write_bytes(Path(jpegs[1]).read_bytes())
    argv = ["ask", "--image", jpegs[0], "--date", "2021-02-03", "--prior", str(old)]
    result = CliRunner().invoke(app, [*argv, "--prior-date", "20190101", "--plain", "Changed?"])
    assert result.exit_code == 0, result.output
    assert image_labels(answer_request(cli_backends[-1])) == [
        "Image 1: prior study (2019-01-01): old.jpg",
        f"Image 2: current study (2021-02-03): {Path(jpegs[0]).name}",
    ]


def test_report_with_a_prior_reaches_the_model_with_both_studies(
    cli_backends: list[RecordingTransport], tmp_path: Path, jpegs: list[str]
) -> None:
    old = tmp_path / "old.jpg"
    old.write_bytes(Path(jpegs[1]).read_bytes())
    argv = ["report", jpegs[0], "--date", "2021-02-03", "--prior", str(old)]
    result = CliRunner().invoke(app, [*argv, "--prior-date", "2019-01-01", "--json"])
    assert result.exit_code in (0, 1), result.output  # 1: random words may make no report
    drafted = DraftReport.model_validate_json(result.stdout)
    assert drafted.prior_images == [str(old.resolve())] and drafted.model_calls >= 1
    labels = image_labels(answer_request(cli_backends[-1]))
    assert labels == [
        "Image 1: prior study (2019-01-01): old.jpg",
        f"Image 2: current study (2021-02-03): {Path(jpegs[0]).name}",
    ]
