"""VLLMClient against a scripted vLLM stand-in (an httpx MockTransport speaking vLLM's
OpenAI-compatible wire format): request shape, images, structured output and its repair,
retries, timeouts, the concurrency limit, spreading over several servers, streaming, and
the call records."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from PIL import Image
from pydantic import BaseModel, Field

from suwen.config import Settings
from suwen.errors import InputError, ModelError, StructuredOutputError
from suwen.llm.base import CallRecord, Message, VisionLanguageModel, recording
from suwen.llm.client import (
    InvalidReplyError,
    VLLMClient,
    complete_truncated_json,
    parse_structured,
    response_format_for,
)

Reply = httpx.Response | Exception | Callable[[dict[str, Any]], Any]


class FakeVLLM:
    """Answers chat completions from a script (one entry per request; the last repeats)
    and remembers every request it saw, per server URL: in ``requests`` as the model sees it
    (an image named by its ``uuid`` resolved, as vLLM's multimodal cache does), in ``wire``
    as it was sent. A named image the server was never sent (or was made to forget, or any
    with ``image_cache`` off) is refused with vLLM's cache-miss error."""

    def __init__(self, *replies: Reply, delay: float = 0.0, served: list[str] | None = None):
        self.replies = list(replies) or [completion("ok")]
        self.delay = delay
        self.served = served or ["fake-vlm"]
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.active = 0
        self.peak = 0
        self.down: set[str] = set()
        self.slow: dict[str, float] = {}
        self.wire: list[tuple[str, dict[str, Any]]] = []
        self.image_cache = True
        self.held: dict[str, dict[str, str]] = {}  # server -> uuid -> data URL

    def _resolve(self, server: str, body: dict[str, Any]) -> httpx.Response | None:
        """Named images replaced by the data they were sent with; vLLM's 400 on a miss."""
        held = self.held.setdefault(server, {})
        index = 0
        for message in body.get("messages", []):
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") != "image_url":
                    continue
                uuid = part.get("uuid")
                if part["image_url"] is None:
                    if uuid not in held:
                        text = f"Cache miss for image at index {index} but data is not provided."
                        return error(400, text)
                    part["image_url"] = {"url": held[uuid]}
                elif uuid is not None and self.image_cache:
                    held[uuid] = part["image_url"]["url"]
                index += 1
        return None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        server = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if server in self.down:
            raise httpx.ConnectError("Connection refused", request=request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": name} for name in self.served]})
        self.wire.append((server, json.loads(request.content)))
        body = json.loads(request.content)
        refused = self._resolve(server, body)
        if refused is not None:
            return refused
        self.requests.append((server, body))
        index = min(len(self.requests), len(self.replies)) - 1
        reply = self.replies[index]
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.delay or server in self.slow:
                await asyncio.sleep(self.slow.get(server, self.delay))
            if isinstance(reply, Exception):
                raise reply
            if callable(reply):
                reply = reply(body)
                if asyncio.iscoroutine(reply):
                    reply = await reply
            assert isinstance(reply, httpx.Response)
            return reply
        finally:
            self.active -= 1

    def client(self, settings: Settings, urls: list[str] | None = None, **kw: Any) -> VLLMClient:
        return VLLMClient(
            urls or ["http://vllm:8000"], settings, transport=httpx.MockTransport(self), **kw
        )


def completion(
    text: str, finish: str = "stop", prompt_tokens: int = 11, completion_tokens: int = 7
) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "cmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        },
    )


def error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "code": status}})


def sse(*events: dict[str, Any] | str) -> httpx.Response:
    lines = [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]
    return httpx.Response(
        200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"}
    )


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


class Finding(BaseModel):
    organ: Literal["lung", "liver", "brain", "other"]
    abnormal: bool
    note: str | None = None


class Answer(BaseModel):
    answer: str
    confidence: float = Field(ge=0, le=1)
    findings: list[Finding] = []


GOOD = '{"answer":"pneumonia","confidence":0.8,"findings":[{"organ":"lung","abnormal":true}]}'


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path, vlm="fake-vlm", max_retries=3, request_timeout=5.0, concurrency=4
    )


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("suwen.llm.client.BACKOFF_SECONDS", 0.01)


def ask(
    text: str = "Is there a fracture?", images: list[Image.Image] | None = None
) -> list[Message]:
    return [Message(role="user", text=text, images=images or [])]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_client_satisfies_the_protocol(settings: Settings) -> None:
    assert isinstance(FakeVLLM().client(settings), VisionLanguageModel)


def test_chat_sends_openai_request_and_records_usage(settings: Settings) -> None:
    fake = FakeVLLM(completion("No fracture.", prompt_tokens=321, completion_tokens=4))
    client = fake.client(settings, model="lingshu")

    async def main() -> Any:
        with recording() as log:
            reply = await client.chat(
                [Message(role="system", text="Be brief."), *ask()], max_tokens=50, purpose="answer"
            )
        return reply, log

    reply, log = run(main())
    assert reply.text == "No fracture." and reply.finish_reason == "stop"
    ((url, body),) = fake.requests
    assert url == "http://vllm:8000"
    assert body["model"] == "lingshu"
    assert body["max_tokens"] == 50 and body["temperature"] == settings.temperature
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is there a fracture?"},
    ]
    (record,) = log.records
    assert (record.kind, record.purpose, record.ok) == ("chat", "answer", True)
    assert (record.prompt_tokens, record.completion_tokens) == (321, 4)
    assert record.url == "http://vllm:8000" and record.seconds > 0
    assert reply.record == record


def test_every_request_carries_the_key_as_json_and_a_redirect_is_not_followed(
    settings: Settings,
) -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        return httpx.Response(307, headers={"Location": "http://elsewhere:9/"})

    client = VLLMClient(
        ["http://vllm:8000"], settings, transport=httpx.MockTransport(server), api_key="k1"
    )
    with pytest.raises(ModelError, match="vLLM at http://vllm:8000"):
        run(client.chat(ask()))
    assert [request.url.host for request in seen] == ["vllm", "vllm"]
    assert all(request.headers["Authorization"] == "Bearer k1" for request in seen)
    assert seen[1].headers["Content-Type"] == "application/json"
    assert json.loads(seen[1].content)["model"] == "m"


def test_images_go_first_as_resized_png_data_urls(settings: Settings) -> None:
    fake = FakeVLLM()
    scan = Image.effect_noise((3000, 2000), 30)  # 6 MP, greyscale
    run(fake.client(settings).chat(ask("Describe.", [scan])))
    content = fake.requests[0][1]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "text"]
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "L"  # a grey scan goes as greyscale: the server makes it RGB again
    assert sent.width * sent.height <= settings.vllm_image_max_pixels
    assert sent.width % 28 == 0 and sent.height % 28 == 0


def _image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        part
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def test_a_server_is_sent_an_image_once_then_the_image_is_named(settings: Settings) -> None:
    fake = FakeVLLM(completion("ok"), sse(delta("Yes."), "[DONE]"), completion("ok"))
    client = fake.client(settings, urls=["http://a:1"])
    scan, other = Image.effect_noise((600, 400), 30), Image.effect_noise((300, 300), 20)

    async def main() -> list[str]:
        await client.chat(ask("Look.", [scan]))
        parts = [part async for part in client.stream(ask("Answer.", [scan]))]
        await client.chat(ask("Compare.", [scan, other]))
        return parts

    assert run(main()) == ["Yes."]
    first, streamed, compared = (_image_parts(body) for _, body in fake.wire)
    uuid = first[0]["uuid"]
    assert first[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert len(uuid) == 64  # the SHA-256 of the data URL: one id per content
    assert streamed == [{"type": "image_url", "image_url": None, "uuid": uuid}]
    assert compared[0] == streamed[0] and compared[1]["image_url"]["url"]  # the new one in full
    # The model saw every image every time: the server took the named ones from its cache.
    seen = [[p["image_url"]["url"] for p in _image_parts(body)] for _, body in fake.requests]
    assert seen[0] == seen[1] == seen[2][:1]
    assert len(json.dumps(fake.wire[1][1])) < len(json.dumps(fake.wire[0][1])) // 10


def test_each_server_is_sent_the_image_in_full_once(settings: Settings) -> None:
    fake = FakeVLLM()
    client = fake.client(settings, urls=["http://a:1", "http://b:2"])
    scan = Image.effect_noise((400, 400), 30)

    async def main() -> None:
        for _ in range(6):
            await client.chat(ask("Look.", [scan]))

    run(main())
    full = [server for server, body in fake.wire if _image_parts(body)[0]["image_url"]]
    assert sorted(full) == ["http://a:1", "http://b:2"]
    assert len(fake.requests) == 6


def test_a_server_that_lost_the_image_is_sent_it_again_in_full(settings: Settings) -> None:
    fake = FakeVLLM()
    client = fake.client(settings, urls=["http://a:1"])
    scan = Image.effect_noise((400, 400), 30)

    async def main() -> list[CallRecord]:
        with recording() as log:
            await client.chat(ask("Look.", [scan]))
            fake.held.clear()  # the server restarted: its multimodal cache is empty
            await client.chat(ask("Again.", [scan]))
            await client.chat(ask("And again.", [scan]))
        return log.records

    records = run(main())
    sent = [bool(_image_parts(body)[0]["image_url"]) for _, body in fake.wire]
    assert sent == [True, False, True, False]  # full, named (miss), full again, named
    assert all(record.ok for record in records) and len(fake.requests) == 3


def test_a_server_without_an_image_cache_is_sent_every_image_in_full(settings: Settings) -> None:
    fake = FakeVLLM()
    fake.image_cache = False  # as vLLM with --mm-processor-cache-gb 0
    client = fake.client(settings, urls=["http://a:1"])
    scan = Image.effect_noise((400, 400), 30)

    async def main() -> None:
        for _ in range(8):
            await client.chat(ask("Look.", [scan]))

    run(main())
    named = [not _image_parts(body)[0]["image_url"] for _, body in fake.wire]
    assert sum(named) == 3 and not any(named[-5:])  # three misses, then always in full
    assert len(fake.requests) == 8


def test_images_named_only_when_the_setting_allows(settings: Settings) -> None:
    fake = FakeVLLM()
    client = fake.client(settings.model_copy(update={"vllm_image_ids": False}))
    scan = Image.effect_noise((400, 400), 30)

    async def main() -> None:
        await client.chat(ask("Look.", [scan]))
        await client.chat(ask("Again.", [scan]))

    run(main())
    parts = [_image_parts(body)[0] for _, body in fake.wire]
    assert all(set(part) == {"type", "image_url"} and part["image_url"] for part in parts)


def test_other_errors_with_a_named_image_are_not_resent(settings: Settings) -> None:
    fake = FakeVLLM(completion("ok"), error(400, "prompt too long"))
    client = fake.client(settings, urls=["http://a:1"])
    scan = Image.effect_noise((400, 400), 30)

    async def main() -> None:
        await client.chat(ask("Look.", [scan]))
        await client.chat(ask("Again.", [scan]))

    with pytest.raises(ModelError, match="answered 400: prompt too long"):
        run(main())
    assert len(fake.wire) == 2


def test_an_image_sent_twice_is_encoded_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from suwen.llm import images

    encoded: list[int] = []
    real = images.image_to_data_url
    monkeypatch.setattr(
        images, "image_to_data_url", lambda im, lo, hi: encoded.append(1) or real(im, lo, hi)
    )
    fake = FakeVLLM()
    client = fake.client(settings)
    scan = Image.effect_noise((600, 400), 30)

    async def main() -> None:
        await client.chat(ask("Look.", [scan]))
        await client.chat(ask("Look again.", [scan]))

    run(main())
    urls = [body["messages"][0]["content"][0]["image_url"]["url"] for _, body in fake.requests]
    assert urls[0] == urls[1] and len(encoded) == 1


def test_unreadable_image_fails_before_any_request(settings: Settings, tmp_path: Path) -> None:
    broken = tmp_path / "scan.png"
    Image.new("RGB", (64, 64)).save(broken)
    broken.write_bytes(broken.read_bytes()[:60])
    fake = FakeVLLM()
    with pytest.raises(InputError, match=r"scan\.png"):
        run(fake.client(settings).chat(ask(images=[Image.open(broken)])))
    assert fake.requests == []


def test_too_many_images_fail_before_any_request(settings: Settings) -> None:
    fake = FakeVLLM()
    images = [Image.new("RGB", (56, 56))] * (settings.vllm_max_images + 1)
    with pytest.raises(InputError, match="vllm_max_images"):
        run(fake.client(settings).chat(ask(images=images)))
    assert fake.requests == []


def test_model_name_is_discovered_when_not_given(settings: Settings) -> None:
    fake = FakeVLLM(served=["some/other-model"])
    run(fake.client(settings).chat(ask()))
    assert fake.requests[0][1]["model"] == "some/other-model"
    ambiguous = FakeVLLM(served=["a", "b"])
    with pytest.raises(ModelError, match="serves a, b, not fake-vlm"):
        run(ambiguous.client(settings).chat(ask()))


# -- structured output ---------------------------------------------------------------------


def test_response_format_is_the_pydantic_json_schema() -> None:
    response_format = response_format_for(Answer)
    assert response_format["type"] == "json_schema"
    spec = response_format["json_schema"]
    assert spec["name"] == "Answer" and spec["strict"] is True
    assert spec["schema"] == Answer.model_json_schema()
    assert spec["schema"]["required"] == ["answer", "confidence"]
    assert "Finding" in spec["schema"]["$defs"]


def test_valid_structured_reply_needs_one_call(settings: Settings) -> None:
    fake = FakeVLLM(completion(GOOD))

    async def main() -> Any:
        with recording() as log:
            return await fake.client(settings).structured(ask(), Answer, max_tokens=99), log

    answer, log = run(main())
    assert answer == Answer.model_validate_json(GOOD)
    assert fake.requests[0][1]["response_format"] == response_format_for(Answer)
    assert fake.requests[0][1]["max_tokens"] == 99
    assert [r.kind for r in log.records] == ["structured"]


def test_invalid_reply_is_repaired_once_with_the_error_shown(settings: Settings) -> None:
    bad = '{"answer":"pneumonia","confidence":7}'
    fake = FakeVLLM(completion(bad), completion(GOOD))

    async def main() -> Any:
        with recording() as log:
            return await fake.client(settings).structured(ask(), Answer, max_tokens=40), log

    answer, log = run(main())
    assert answer.answer == "pneumonia"
    assert [r.kind for r in log.records] == ["structured", "repair"]
    repair = fake.requests[1][1]
    assert repair["response_format"] == response_format_for(Answer)
    assert repair["messages"][-2] == {"role": "assistant", "content": bad}
    assert "confidence" in repair["messages"][-1]["content"]
    assert "less than or equal to 1" in repair["messages"][-1]["content"]
    assert repair["max_tokens"] == 40  # not truncated: same budget


def test_truncated_reply_is_completed_locally_when_that_validates(settings: Settings) -> None:
    cut = '{"answer":"pneumonia","confidence":0.8,"findings":[{"organ":"lung","abnormal":tr'
    fake = FakeVLLM(completion(cut, finish="length"))
    answer = run(fake.client(settings).structured(ask(), Answer))
    assert answer.findings == [Finding(organ="lung", abnormal=True)]
    assert len(fake.requests) == 1


def test_truncated_reply_missing_fields_gets_a_bigger_repair_budget(settings: Settings) -> None:
    cut = '{"answer":"a very long answer that never ends'
    fake = FakeVLLM(completion(cut, finish="length"), completion(GOOD))
    answer = run(fake.client(settings).structured(ask(), Answer, max_tokens=30))
    assert answer.answer == "pneumonia"
    repair = fake.requests[1][1]
    assert repair["max_tokens"] == 60
    assert "cut off at max_tokens" in repair["messages"][-1]["content"]


def test_still_invalid_after_repair_raises_structured_output_error(settings: Settings) -> None:
    fake = FakeVLLM(completion("{\n\n\n\n", finish="length"))

    async def main() -> Any:
        with recording() as log, pytest.raises(StructuredOutputError) as raised:
            await fake.client(settings).structured(ask(), Answer)
        return raised.value, log

    exc, log = run(main())
    assert "Answer" in str(exc) and "one repair attempt" in str(exc)
    assert "\n" not in str(exc)
    assert [r.kind for r in log.records] == ["structured", "repair"]
    assert len(fake.requests) == 2  # bounded: exactly one repair


def test_parse_structured_rules() -> None:
    assert parse_structured(f"```json\n{GOOD}\n```", "stop", Answer).answer == "pneumonia"
    with pytest.raises(InvalidReplyError, match="confidence"):
        parse_structured('{"answer":"x"}', "stop", Answer)
    # A cut-off number is dropped, never guessed.
    assert complete_truncated_json('{"answer":"x","confidence":0.') == {"answer": "x"}
    with pytest.raises(InvalidReplyError, match="cut off"):
        parse_structured('{"answer":"x","confidence":0.', "length", Answer)
    # Not truncated: no local completion, even when it would validate.
    with pytest.raises(InvalidReplyError):
        parse_structured('{"answer":"x","confidence":0.5', "stop", Answer)


# -- retries, timeouts, failures ---------------------------------------------------------


def test_5xx_is_retried_with_backoff(settings: Settings) -> None:
    fake = FakeVLLM(error(503, "busy"), error(500, "oops"), completion("fine"))
    assert run(fake.client(settings).chat(ask())).text == "fine"
    assert len(fake.requests) == 3


def test_connection_errors_are_retried_then_reported(settings: Settings) -> None:
    fake = FakeVLLM(httpx.ConnectError("Connection refused"))

    async def main() -> Any:
        with recording() as log, pytest.raises(ModelError) as raised:
            await fake.client(settings).chat(ask())
        return raised.value, log

    exc, log = run(main())
    assert len(fake.requests) == settings.max_retries + 1
    assert str(exc).startswith("cannot reach vLLM at http://vllm:8000")
    assert "after 4 attempts" in str(exc)
    assert [r.ok for r in log.records] == [False]


def test_4xx_is_not_retried_and_shows_vllms_message(settings: Settings) -> None:
    fake = FakeVLLM(error(400, "Input length (9000) exceeds model's maximum context length"))
    with pytest.raises(ModelError, match=r"answered 400: Input length \(9000\) exceeds"):
        run(fake.client(settings).chat(ask()))
    assert len(fake.requests) == 1


def test_server_dying_mid_reply_is_a_clear_error(settings: Settings) -> None:
    fake = FakeVLLM(httpx.RemoteProtocolError("Server disconnected without sending a response."))
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"connection lost mid-reply.*after 4 attempts"):
        run(fake.client(settings).chat(ask()))
    assert time.monotonic() - started < 3


def test_a_hung_server_times_out_within_the_request_timeout(settings: Settings) -> None:
    settings.request_timeout = 0.5
    fake = FakeVLLM(completion("late"), delay=30)
    started = time.monotonic()
    with pytest.raises(ModelError, match=r"no reply within 0\.5 s"):
        run(fake.client(settings).chat(ask()))
    assert time.monotonic() - started < 2


def test_status_hint_explains_an_unreachable_managed_server(settings: Settings) -> None:
    fake = FakeVLLM(httpx.ConnectError("Connection refused"))
    client = fake.client(settings, status_hint=lambda: "the managed vLLM server died")
    with pytest.raises(ModelError, match=r"\(the managed vLLM server died\)$"):
        run(client.chat(ask()))


# -- concurrency and several servers ---------------------------------------------------------


def test_concurrency_limit_holds(settings: Settings) -> None:
    settings.concurrency = 3
    fake = FakeVLLM(delay=0.05)
    client = fake.client(settings)

    async def main() -> None:
        await asyncio.gather(*(client.chat(ask(f"q{i}")) for i in range(12)))

    run(main())
    assert len(fake.requests) == 12
    assert fake.peak == 3


def test_requests_spread_over_servers_by_load(settings: Settings) -> None:
    settings.concurrency = 8
    fake = FakeVLLM(delay=0.05)
    urls = ["http://gpu-a:8000", "http://gpu-b:8000/v1"]
    client = fake.client(settings, urls)

    async def main() -> None:
        await asyncio.gather(*(client.chat(ask(f"q{i}")) for i in range(16)))

    run(main())
    per_server = [server for server, _ in fake.requests]
    assert per_server.count("http://gpu-a:8000") == 8
    assert per_server.count("http://gpu-b:8000") == 8


def test_a_slow_server_gets_fewer_requests(settings: Settings) -> None:
    settings.concurrency = 2
    fake = FakeVLLM(delay=0.01)
    fake.slow["http://gpu-a:8000"] = 0.5
    client = fake.client(settings, ["http://gpu-a:8000", "http://gpu-b:8000"])

    async def main() -> None:
        await asyncio.gather(*(client.chat(ask(f"q{i}")) for i in range(12)))

    run(main())
    per_server = [server for server, _ in fake.requests]
    # Least-in-flight: the busy server gets one request while the free one takes the rest
    # (round-robin would send six to each).
    assert per_server.count("http://gpu-a:8000") == 1
    assert per_server.count("http://gpu-b:8000") == 11


def test_a_dead_server_is_avoided(settings: Settings) -> None:
    fake = FakeVLLM()
    fake.down.add("http://gpu-a:8000")
    client = fake.client(settings, ["http://gpu-a:8000", "http://gpu-b:8000"])

    async def main() -> list[str]:
        urls = []
        for _ in range(6):
            with recording() as log:
                await client.chat(ask())
            urls.append(log.records[0].url)
        return urls

    assert run(main()) == ["http://gpu-b:8000"] * 6


def test_one_client_serves_several_event_loops(settings: Settings) -> None:
    fake = FakeVLLM()
    client = fake.client(settings)
    assert run(client.chat(ask())).text == "ok"
    assert run(client.chat(ask())).text == "ok"


def test_bad_url_is_an_input_error(settings: Settings) -> None:
    with pytest.raises(InputError, match="'gpu-a:8000'"):
        VLLMClient(["gpu-a:8000"], settings)


# -- streaming ---------------------------------------------------------------------------


def test_stream_yields_text_and_records_usage(settings: Settings) -> None:
    usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3}}
    fake = FakeVLLM(sse(delta("No"), delta(" fracture"), delta("."), usage, "[DONE]"))

    async def main() -> Any:
        with recording() as log:
            parts = [part async for part in fake.client(settings).stream(ask(), max_tokens=5)]
        return parts, log

    parts, log = run(main())
    assert parts == ["No", " fracture", "."]
    assert fake.requests[0][1]["stream"] is True
    assert fake.requests[0][1]["stream_options"] == {"include_usage": True}
    (record,) = log.records
    assert (record.kind, record.prompt_tokens, record.completion_tokens) == ("stream", 40, 3)


def test_stream_stopped_early_releases_the_server(settings: Settings) -> None:
    fake = FakeVLLM(sse(delta("a"), delta("b"), delta("c"), "[DONE]"))
    client = fake.client(settings)

    async def main() -> Any:
        with recording() as log:
            async with contextlib.aclosing(client.stream(ask())) as parts:
                async for part in parts:
                    assert part == "a"
                    break
        return log

    (record,) = run(main()).records
    assert record.ok and record.kind == "stream"
    assert client.endpoints[0].in_flight == 0


def test_stream_error_event_is_a_model_error(settings: Settings) -> None:
    fake = FakeVLLM(sse(delta("No"), {"error": {"message": "engine died", "code": 500}}))

    async def main() -> list[str]:
        parts = []
        with pytest.raises(ModelError, match="failed mid-reply: engine died"):
            async for part in fake.client(settings).stream(ask()):
                parts.append(part)
        return parts

    assert run(main()) == ["No"]


def test_stream_open_is_retried_on_5xx(settings: Settings) -> None:
    fake = FakeVLLM(error(502, "bad gateway"), sse(delta("ok"), "[DONE]"))

    async def main() -> list[str]:
        return [part async for part in fake.client(settings).stream(ask())]

    assert run(main()) == ["ok"]
