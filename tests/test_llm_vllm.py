"""The real vLLM engine on the CPU, serving the tiny Lingshu-architecture checkpoint: one
server per test session (``vllm_url``), a real VQA-RAD radiograph and question through
VLLMClient; and `suwen serve` itself: killed mid-request, restarted once, stopped by Ctrl-C
with no process left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pexpect
import psutil
import pytest
from PIL import Image
from pydantic import BaseModel

from suwen.config import Settings
from suwen.errors import ModelError, StructuredOutputError
from suwen.llm.base import Message, recording
from suwen.llm.client import VLLMClient
from suwen.llm.images import EncodedImage, image_to_data_url
from suwen.llm.server import free_port
from tests.terminal_signals import default_signal_actions

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

IMAGE = "synpic42202.jpg"  # a chest radiograph from the VQA-RAD test split


class Verdict(BaseModel):
    answer: str
    confidence: float


@pytest.fixture(scope="module")
def vqa_rad(shared_data: Path) -> tuple[Image.Image, str]:
    """A real VQA-RAD test image with its question."""
    questions = json.loads((shared_data / "vqa_rad" / "testset.json").read_text())
    question = next(q["question"] for q in questions if q["image_name"] == IMAGE)
    return Image.open(shared_data / "vqa_rad" / "images" / IMAGE), question


def ask(vqa_rad: tuple[Image.Image, str]) -> list[Message]:
    image, question = vqa_rad
    return [Message(role="user", text=question, images=[image])]


def test_streamed_reply_about_a_radiograph(
    vllm_url: str, vllm_settings: Settings, vqa_rad: tuple[Image.Image, str]
) -> None:
    client = VLLMClient([vllm_url], vllm_settings)

    async def main() -> tuple[list[str], Any]:
        with recording() as log:
            parts = [part async for part in client.stream(ask(vqa_rad), max_tokens=24)]
        await client.aclose()
        return parts, log

    parts, log = asyncio.run(main())
    assert len(parts) >= 2 and "".join(parts)
    (record,) = log.records
    assert record.ok and record.kind == "stream" and record.url == vllm_url
    assert record.completion_tokens == 24  # a random model never stops early... nearly
    # The image arrived as visual tokens: the prompt is far longer than the question.
    assert record.prompt_tokens > 500


def test_structured_reply_parses_or_is_repaired_or_raises(
    vllm_url: str, vllm_settings: Settings, vqa_rad: tuple[Image.Image, str]
) -> None:
    client = VLLMClient([vllm_url], vllm_settings)

    async def main() -> tuple[Verdict | StructuredOutputError, Any]:
        with recording() as log:
            try:
                result: Verdict | StructuredOutputError = await client.structured(
                    ask(vqa_rad), Verdict, max_tokens=32
                )
            except StructuredOutputError as exc:
                result = exc
        await client.aclose()
        return result, log

    result, log = asyncio.run(main())
    kinds = [record.kind for record in log.records]
    assert kinds in (["structured"], ["structured", "repair"])
    assert all(record.ok and record.completion_tokens > 0 for record in log.records)
    if isinstance(result, StructuredOutputError):
        assert kinds == ["structured", "repair"]
        assert "Verdict" in str(result)
    else:
        assert isinstance(result, Verdict)


def test_sixteen_concurrent_requests_all_complete(
    vllm_url: str, vllm_settings: Settings, vqa_rad: tuple[Image.Image, str]
) -> None:
    client = VLLMClient([vllm_url], vllm_settings.model_copy(update={"concurrency": 16}))

    async def main() -> tuple[list[Any], Any]:
        with recording() as log:
            replies = await asyncio.gather(
                *(client.chat(ask(vqa_rad), max_tokens=8 + i) for i in range(16))
            )
        await client.aclose()
        return replies, log

    replies, log = asyncio.run(main())
    assert len(replies) == 16 and log.calls == 16
    assert all(reply.text and reply.record.ok for reply in replies)
    for budget, reply in enumerate(replies, start=8):
        assert 0 < reply.record.completion_tokens <= budget
    # Every request is accounted for once (records arrive in completion order).
    assert sorted(id(record) for record in log.records) == sorted(
        id(reply.record) for reply in replies
    )


class SizedTransport(httpx.AsyncHTTPTransport):
    """An httpx transport noting the size of each chat request body."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions":
            self.sizes.append(len(request.content))
        return await super().handle_async_request(request)


def test_an_image_is_sent_once_then_named_and_sent_again_if_the_server_lost_it(
    vllm_url: str, vllm_settings: Settings, vqa_rad: tuple[Image.Image, str]
) -> None:
    settings = vllm_settings.model_copy(update={"temperature": 0.0})
    transport = SizedTransport()
    client = VLLMClient([vllm_url], settings, transport=transport)
    image, question = vqa_rad
    # An image the client believes the server holds but the server was never sent (as after
    # a restart of the server): vLLM refuses the named image, the client sends it in full.
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lost = EncodedImage.of(
        image_to_data_url(flipped, settings.vllm_image_min_pixels, settings.vllm_image_max_pixels)
    )
    client.endpoints[0].images.answered([lost.uuid], [])

    async def main() -> tuple[list[str], Any]:
        with recording() as log:
            texts = [(await client.chat(ask(vqa_rad), max_tokens=8)).text for _ in range(2)]
            moved = [Message(role="user", text=question, images=[flipped])]
            texts.append((await client.chat(moved, max_tokens=8)).text)
        await client.aclose()
        return texts, log

    texts, log = asyncio.run(main())
    assert texts[0] == texts[1] and texts[2]  # greedy: the named image is the same image
    assert all(record.ok for record in log.records) and log.calls == 3
    full, named, refused, resent = transport.sizes
    assert named < full // 10 and refused < full // 10 and resent > full // 2


def cli_env(home: Path, model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SUWEN_HOME": str(home),
            "SUWEN_VLM": str(model_dir),
            "SUWEN_VLLM_CPU_KVCACHE_GIB": "1",
            "SUWEN_VLLM_EXTRA_ARGS": "--enforce-eager",
            "NO_COLOR": "1",
            "TERM": "dumb",
            "COLUMNS": "200",
        }
    )
    return env


def wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not come back within {timeout} s")


def test_serve_survives_a_crash_once_and_stops_cleanly_on_ctrl_c(
    tiny_model_dir: Path, tmp_path: Path, vqa_rad: tuple[Image.Image, str]
) -> None:
    port = free_port("127.0.0.1")
    cli = pexpect.spawn(
        str(Path(sys.executable).with_name("suwen")),
        ["serve", "--port", str(port)],
        env=cli_env(tmp_path / "home", tiny_model_dir),
        encoding="utf-8",
        timeout=900,
        preexec_fn=default_signal_actions,
    )
    seen: list[psutil.Process] = []
    try:
        cli.expect(r"(http://127\.0\.0\.1:\d+)/v1")
        url = cli.match.group(1)
        assert url == f"http://127.0.0.1:{port}"
        settings = Settings(home=tmp_path / "home", vlm=str(tiny_model_dir), request_timeout=60)
        client = VLLMClient([url], settings)
        vllm = psutil.Process(cli.pid).children()[0]
        seen += [vllm, *vllm.children(recursive=True)]

        async def killed_mid_request() -> float:
            request = asyncio.create_task(client.chat(ask(vqa_rad), max_tokens=3000))
            await asyncio.sleep(2)
            assert not request.done(), "the request finished before the server was killed"
            os.killpg(vllm.pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(ModelError, match=f"vLLM at {url}|cannot reach vLLM at {url}"):
                await request
            return time.monotonic() - killed

        assert asyncio.run(killed_mid_request()) < 15  # retries with backoff, then a clear error
        wait_healthy(url, 900)  # `suwen serve` restarted it once
        restarted = psutil.Process(cli.pid).children()[0]
        assert restarted.pid != vllm.pid
        seen += [restarted, *restarted.children(recursive=True)]
        reply = asyncio.run(client.chat(ask(vqa_rad), max_tokens=4))
        assert reply.record.completion_tokens == 4

        cli.sendintr()  # Ctrl-C
        cli.expect("vLLM stopped", timeout=120)
        cli.expect(pexpect.EOF, timeout=60)
    finally:
        cli.close(force=True)
    assert cli.exitstatus == 0
    _gone, alive = psutil.wait_procs(seen, timeout=30)
    assert not alive, f"left running: {alive}"
    logs = list((tmp_path / "home" / "logs").glob("vllm-*.log"))
    assert len(logs) == 1 and "restart 1" in logs[0].read_text()
