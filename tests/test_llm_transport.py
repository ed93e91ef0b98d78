"""The model client over real sockets (its aiohttp transport): replies, streams, and every way a
server can fail becoming the error and retry behaviour the client promises."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from suwen.config import Settings
from suwen.errors import ModelError
from suwen.llm.base import Message
from suwen.llm.client import VLLMClient
from suwen.llm.server import free_port

HOST = "127.0.0.1"
Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # False: drop the connection


def response(kind: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def reply(text: str) -> bytes:
    body = json.dumps(
        {
            "choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    ).encode()
    return response("application/json", body)


def stream_reply(words: list[str]) -> bytes:
    events = [
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': w}}]})}\n\n"
        for w in words
    ]
    return response("text/event-stream", ("".join(events) + "data: [DONE]\n\n").encode())


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A keep-alive HTTP/1.1 server on 127.0.0.1; yields its URL and the request bodies."""
    bodies: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                bodies.append(body)
                if not await handler(body, writer):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listening = await asyncio.start_server(serve, HOST, 0)
    port = listening.sockets[0].getsockname()[1]
    async with listening:
        yield f"http://{HOST}:{port}", bodies


def client(url: str, tmp_path: Path, **values: object) -> VLLMClient:
    settings = Settings(home=tmp_path, **values)  # type: ignore[arg-type]
    return VLLMClient([url], settings, model="m", api_key="k")


ASK = [Message(role="user", text="Is the lung clear? (\u80ba, \u00e9panchement \u2264 5 mm)")]


def test_replies_and_streams_arrive_whole_over_one_kept_connection(tmp_path: Path) -> None:
    async def answer(body: bytes, writer: asyncio.StreamWriter) -> bool:
        request = json.loads(body)
        writer.write(stream_reply(["no ", "effusion"]) if request.get("stream") else reply("yes"))
        return True

    async def run() -> tuple[list[str], list[str], list[bytes]]:
        async with server(answer) as (url, bodies), client(url, tmp_path) as model:
            texts = [(await model.chat(ASK)).text for _ in range(3)]
            pieces = [piece async for piece in model.stream(ASK)]
            return texts, pieces, bodies

    texts, pieces, bodies = asyncio.run(run())
    assert texts == ["yes"] * 3 and "".join(pieces) == "no effusion" and len(bodies) == 4
    sent = [json.loads(body) for body in bodies]  # the question arrives as written
    assert all(s["messages"] == [{"role": "user", "content": ASK[0].text}] for s in sent)
    assert [s["model"] for s in sent] == ["m"] * 4 and sent[-1]["stream"] is True


def test_a_stream_of_long_lines_with_crlf_ends_arrives_whole_in_its_characters(
    tmp_path: Path,
) -> None:
    # One event far longer than a socket read (and than aiohttp's readline buffer), with
    # CRLF line ends and characters of several UTF-8 bytes split across reads.
    long = "\u80ba\u00e9" * 60_000 + " "
    words = [long, "fin"]

    async def answer(body: bytes, writer: asyncio.StreamWriter) -> bool:
        _, body = stream_reply(words).split(b"\r\n\r\n", 1)
        writer.write(response("text/event-stream", body.replace(b"\n", b"\r\n")))
        return True

    async def run() -> list[str]:
        async with server(answer) as (url, _), client(url, tmp_path) as model:
            return [piece async for piece in model.stream(ASK)]

    assert asyncio.run(run()) == words


def test_a_refused_connection_names_the_server(tmp_path: Path) -> None:
    url = f"http://{HOST}:{free_port(HOST)}"

    async def run() -> None:
        async with client(url, tmp_path, max_retries=0) as model:
            await model.chat(ASK)

    with pytest.raises(ModelError, match=f"^cannot reach vLLM at {url}"):
        asyncio.run(run())


def test_a_connection_dropped_mid_reply_is_retried(tmp_path: Path) -> None:
    async def drop_first(body: bytes, writer: asyncio.StreamWriter) -> bool:
        dropped.append(len(dropped) == 0)
        if dropped[-1]:
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"choi')
            return False
        writer.write(reply("recovered"))
        return True

    dropped: list[bool] = []

    async def run() -> str:
        async with server(drop_first) as (url, _), client(url, tmp_path, max_retries=2) as model:
            return (await model.chat(ASK)).text

    assert asyncio.run(run()) == "recovered" and dropped == [True, False]


def test_a_connection_that_keeps_dropping_says_so_after_every_attempt(tmp_path: Path) -> None:
    async def drop(body: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    async def run() -> None:
        async with server(drop) as (url, _), client(url, tmp_path, max_retries=1) as model:
            await model.chat(ASK)

    with pytest.raises(ModelError, match=r"connection lost mid-reply.*after 2 attempts"):
        asyncio.run(run())


def test_a_silent_server_times_out_within_the_request_deadline(tmp_path: Path) -> None:
    async def silent(body: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(30)
        return False

    async def run() -> None:
        async with server(silent) as (url, _), client(url, tmp_path, request_timeout=1) as model:
            await model.chat(ASK)

    with pytest.raises(ModelError, match="no reply within 1 s"):
        asyncio.run(run())


def test_a_stream_left_early_frees_its_connection_for_the_next_request(tmp_path: Path) -> None:
    async def answer(body: bytes, writer: asyncio.StreamWriter) -> bool:
        request = json.loads(body)
        words = [f"w{i} " for i in range(200)]
        writer.write(stream_reply(words) if request.get("stream") else reply("next"))
        return True

    async def run() -> str:
        async with server(answer) as (url, _), client(url, tmp_path) as model:
            async for _piece in model.stream(ASK):
                break
            return (await model.chat(ASK)).text

    assert asyncio.run(run()) == "next"


def test_one_client_used_from_two_event_loops_leaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import gc
    import threading

    async def answer(body: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply("ok"))
        return True

    ready, stop = threading.Event(), threading.Event()
    found: list[str] = []

    def serve() -> None:  # the server's own loop outlives the client's two
        async def main() -> None:
            async with server(answer) as (url, _):
                found.append(url)
                ready.set()
                await asyncio.to_thread(stop.wait)

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        ready.wait(10)
        model = client(found[0], tmp_path)
        first = asyncio.run(model.chat(ASK)).text

        async def last() -> str:
            async with model:
                return (await model.chat(ASK)).text

        second = asyncio.run(last())
        gc.collect()
    finally:
        stop.set()
        thread.join(10)
    assert first == second == "ok"
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]
