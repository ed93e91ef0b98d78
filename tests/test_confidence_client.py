"""The client's log-probability request, against a vLLM stand-in on an httpx MockTransport:
candidates are tokenized by the server once, asked for by id after a prefill, and read back."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from suwen.config import Settings
from suwen.errors import InputError
from suwen.llm.base import LogprobRequest, Message, recording
from suwen.llm.client import VLLMClient

TOKENS = {"A": [32], " A": [220, 32], "B": [33], " B": [220, 33], " ": [220]}


class Server:
    def __init__(self) -> None:
        self.tokenized: list[str] = []
        self.chats: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if request.url.path == "/tokenize":
            self.tokenized.append(body["prompt"])
            assert body["add_special_tokens"] is False
            return httpx.Response(200, json={"tokens": TOKENS[body["prompt"]], "count": 1})
        self.chats.append(body)
        top = [
            {"token": "token_id:32", "logprob": -0.5},
            {"token": "token_id:33", "logprob": -1.5},
            {"token": "token_id:220", "logprob": -2.0},
        ]
        choice = {
            "message": {"role": "assistant", "content": " A"},
            "finish_reason": "length",
            "logprobs": {
                "content": [{"token": "token_id:220", "logprob": -2.0, "top_logprobs": top}]
            },
        }
        usage = {"prompt_tokens": 40, "completion_tokens": 1}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


def test_candidates_are_asked_by_first_token_id_after_the_prefill(tmp_path: Path) -> None:
    server = Server()
    settings = Settings(home=tmp_path)
    client = VLLMClient(["http://vllm:8000"], settings, transport=httpx.MockTransport(server))
    request = LogprobRequest(candidates=["A", " A", "B", " B", " "])

    async def go():  # type: ignore[no-untyped-def]
        with recording() as log:
            first = await client.chat(
                [Message(role="user", text="Q?")],
                max_tokens=1,
                prefill="Short answer:",
                logprobs=request,
            )
            again = await client.chat([Message(role="user", text="Q?")], logprobs=request)
        await client.aclose()
        return first, again, log

    first, again, log = asyncio.run(go())
    assert again.logprobs is not None and again.logprobs[0].candidates
    body = server.chats[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "Short answer:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["logprobs"] is True and body["return_tokens_as_token_ids"] is True
    assert body["logprob_token_ids"] == [32, 33, 220]
    # Tokenized once per candidate, not once per request; tokenizing is not a model call.
    assert sorted(server.tokenized) == sorted(TOKENS) and log.calls == 2
    assert "continue_final_message" not in server.chats[1]
    assert first.logprobs is not None and len(first.logprobs) == 1
    by_text = {c.text: (c.token_id, c.logprob) for c in first.logprobs[0].candidates}
    assert by_text == {
        "A": (32, -0.5),
        " A": (220, -2.0),
        "B": (33, -1.5),
        " B": (220, -2.0),
        " ": (220, -2.0),
    }


def test_too_many_candidate_tokens_are_refused_before_asking(tmp_path: Path) -> None:
    many = {f"w{i}": [1000 + i] for i in range(25)}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        prompt = json.loads(request.content)["prompt"]
        return httpx.Response(200, json={"tokens": many[prompt], "count": 1})

    client = VLLMClient(
        ["http://vllm:8000"], Settings(home=tmp_path), transport=httpx.MockTransport(handler)
    )
    with pytest.raises(InputError, match="at most 20"):
        asyncio.run(
            client.chat(
                [Message(role="user", text="Q?")], logprobs=LogprobRequest(candidates=list(many))
            )
        )
