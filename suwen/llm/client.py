"""VLLMClient: the agent's model, talking to one or several vLLM OpenAI-compatible servers.

It speaks vLLM's OpenAI-compatible HTTP API itself, through aiohttp's connection pool
(``suwen.llm.transport``; the ``openai`` SDK changes its HTTP stack between releases, the wire
protocol does not). What it adds, and why:
- images as PNG data URLs resized within Qwen2.5-VL's pixel limits (``suwen.llm.images``),
  prepared before anything is sent, so an unreadable image costs no request, and encoded
  once per image however many calls send it; each server is sent an image in full once and
  afterwards given only its content id (``uuid``, the SHA-256 of the data URL), which vLLM
  resolves from its multimodal cache (``ServerImages``: a miss is sent again in full);
- requests spread over several servers (the least busy first), which is how a user scales to
  several GPUs or machines;
- retries with exponential backoff on connection errors and 5xx, an overall
  deadline per request, a concurrency limit, and one-line ``ModelError``s naming the server;
- structured output: a pydantic model becomes a JSON-schema ``response_format``; the reply is
  validated, and invalid or truncated JSON gets one bounded repair (truncated JSON is first
  completed locally; otherwise the model is shown the error once), then StructuredOutputError;
- every call's token usage and latency recorded (``suwen.llm.base.record_call``).

Event-loop-bound state (the HTTP connection pools, the semaphore) is created per running
loop, so one client can serve several ``asyncio.run`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import httpx
import orjson
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError

from suwen.agent.prompts import REPAIR_INSTRUCTION
from suwen.config import Settings
from suwen.errors import InputError, ModelError, StructuredOutputError
from suwen.llm.base import (
    CallKind,
    CallRecord,
    CandidateLogprob,
    ChatReply,
    LogprobRequest,
    Message,
    PromptSize,
    TokenLogprobs,
    record_call,
)
from suwen.llm.images import ImageEncoder, visual_tokens
from suwen.llm.transport import AiohttpHttp, Http, Reply, TransportHttp
from suwen.privacy import is_loopback_url, local_api_key
from suwen.sanitize import for_prompt

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")

CONNECT_TIMEOUT = 10.0
BACKOFF_SECONDS = 0.5  # first retry after 0.5 s, then 1, 2, ... (capped below)
BACKOFF_MAX_SECONDS = 8.0
FAILURE_COOLDOWN_SECONDS = 5.0  # a server that just failed is tried last for this long
REPAIR_ECHO_CHARS = 4000  # how much of a broken reply the repair request shows the model
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
# vLLM's default --max-logprobs: the most token ids one request may ask log-probabilities for.
MAX_LOGPROB_TOKENS = 20
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")


# -- messages and schemas -------------------------------------------------------------------


def to_openai_messages(
    messages: Sequence[Message], settings: Settings, encoder: ImageEncoder | None = None
) -> list[dict[str, Any]]:
    """Suwen messages as OpenAI chat messages; images (first, as Qwen expects) become data
    URLs. Raises InputError for an unusable image or too many images, before any request."""
    count = sum(len(message.images) for message in messages)
    if count > settings.vllm_max_images:
        raise InputError(
            f"{count} images in one prompt: the server admits {settings.vllm_max_images} "
            "(setting vllm_max_images)"
        )
    encoder = encoder or ImageEncoder(
        settings.vllm_image_min_pixels, settings.vllm_image_max_pixels
    )
    converted: list[dict[str, Any]] = []
    for message in messages:
        if not message.images:
            converted.append({"role": message.role, "content": message.text})
            continue
        parts: list[dict[str, Any]] = []
        labels = message.image_labels
        if labels and len(labels) != len(message.images):
            raise InputError(f"{len(labels)} image labels for {len(message.images)} images")
        for index, image in enumerate(message.images):
            if labels:
                parts.append({"type": "text", "text": labels[index]})
            encoded = encoder.encoded(image)
            parts.append(
                {"type": "image_url", "image_url": {"url": encoded.url}, "uuid": encoded.uuid}
            )
        parts.append({"type": "text", "text": message.text})
        converted.append({"role": message.role, "content": parts})
    return converted


def text_only_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages as ``to_openai_messages`` sends them with every image left out (its label
    kept): what the server's tokenizer counts as the prompt's text."""
    converted: list[dict[str, Any]] = []
    for message in messages:
        texts = [*message.image_labels, message.text] if message.images else [message.text]
        parts = [{"type": "text", "text": text} for text in texts]
        converted.append({"role": message.role, "content": parts})
    return converted


def json_body(model: str, payload: dict[str, Any]) -> bytes:
    """A chat request's body. orjson, not the standard library: a request that carries an
    image is a few hundred kB of base64, which ``json.dumps`` scans for characters to escape
    at about half a millisecond per request; orjson writes it in a hundredth of that."""
    return orjson.dumps({"model": model, **payload})


def schema_name(schema: type[BaseModel]) -> str:
    """OpenAI's ``json_schema.name`` admits ``[A-Za-z0-9_-]{1,64}``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64] or "reply"


def response_format_for(schema: type[BaseModel]) -> dict[str, Any]:
    """The ``response_format`` vLLM turns into a JSON-schema grammar for ``schema``. Built
    once per schema (pydantic takes milliseconds to generate one, and every structured call
    sends it); the payload holds it read-only, as the request body's encoder only reads it."""
    return _response_format(schema)


@functools.cache
def _response_format(schema: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": schema_name(schema),
            "schema": schema.model_json_schema(),
            "strict": True,
        },
    }


class InvalidReplyError(ValueError):
    """A structured reply that does not validate; the message says why, in one line."""


def validation_summary(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{where + ': ' if where else ''}{first['msg']}{more}")


def complete_truncated_json(text: str) -> Any:
    """Close the strings, arrays and objects of JSON cut off at max_tokens. A cut-off number
    is dropped rather than guessed (``12`` might have been ``120``). None if not JSON."""
    from partial_json_parser import Allow, loads

    try:
        return loads(text, Allow.ALL & ~Allow.NUM)
    except (ValueError, RecursionError):
        return None


def parse_structured(text: str, finish_reason: str | None, schema: type[T]) -> T:
    """The reply as ``schema``; truncated replies are completed locally when that validates.
    Raises InvalidReplyError."""
    fenced = _FENCE.match(text.strip())
    body = fenced.group(1) if fenced else text
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        error = validation_summary(exc)
    if finish_reason != "length":
        raise InvalidReplyError(error)
    completed = complete_truncated_json(body)
    if completed is None:
        raise InvalidReplyError(f"cut off at max_tokens: {error}")
    try:
        return schema.model_validate(completed)
    except ValidationError as exc:
        raise InvalidReplyError(f"cut off at max_tokens: {validation_summary(exc)}") from exc


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- servers, replies, retries and errors ---------------------------------------------------


def normalize_url(url: str) -> str:
    """``http://host:port`` from what a user may type (a trailing ``/`` or ``/v1``)."""
    base = url.strip().rstrip("/").removesuffix("/v1")
    try:
        parsed = httpx.URL(base)
    except httpx.InvalidURL as exc:
        raise InputError(f"vLLM URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InputError(f"vLLM URL {url!r}: expected http://HOST:PORT")
    return base


@dataclass
class ServerImages:
    """The images one server has been sent in full and answered, by content id: later
    requests name them (``{"image_url": null, "uuid": ...}``) and vLLM takes them from its
    multimodal cache, so a question's image crosses the wire and is decoded on the server
    once, not once per call. vLLM's cache is bounded and lost on restart, so a request it
    cannot serve ("cache miss") is sent again in full; a server that misses
    ``MISSES_TO_GIVE_UP`` times in a row with no hit between (its cache turned off) is sent
    every image in full from then on."""

    CAPACITY: ClassVar[int] = 4096
    MISSES_TO_GIVE_UP: ClassVar[int] = 3

    refer: bool = True
    held: OrderedDict[str, None] = field(default_factory=OrderedDict)
    misses: int = 0

    def holds(self, uuid: str) -> bool:
        return self.refer and uuid in self.held

    def answered(self, sent: Sequence[str], named: Sequence[str]) -> None:
        """A request that sent ``sent`` in full and named ``named`` was accepted."""
        if not self.refer:
            return
        if named:
            self.misses = 0
        for uuid in (*sent, *named):
            self.held[uuid] = None
            self.held.move_to_end(uuid)
        while len(self.held) > self.CAPACITY:
            self.held.popitem(last=False)

    def missed(self, named: Sequence[str]) -> None:
        """The server no longer holds (some of) ``named``."""
        for uuid in named:
            self.held.pop(uuid, None)
        self.misses += 1
        if self.misses >= self.MISSES_TO_GIVE_UP:
            self.refer = False
            self.held.clear()


@dataclass
class Endpoint:
    """One vLLM server and what the client knows about it."""

    url: str
    in_flight: int = 0
    last_failure: float = -math.inf
    model: str | None = None
    images: ServerImages = field(default_factory=ServerImages)


def is_image_cache_miss(message: str) -> bool:
    """vLLM's answer to a request naming an image its multimodal cache no longer holds
    ("Cache miss for image at index 0 but data is not provided.", or the engine's
    "Multi-modal processor cache miss.")."""
    return "cache miss" in message.lower()


def with_named_images(
    payload: dict[str, Any], images: ServerImages | None, *, ids: bool = True
) -> tuple[dict[str, Any], list[str], list[str]]:
    """``payload`` with each image the server holds named by its content id instead of sent
    (without ``ids``, every image sent in full and without its id); the ids sent in full and
    the ids named."""
    sent: list[str] = []
    named: list[str] = []
    messages = []
    for message in payload["messages"]:
        content = message["content"]
        if not isinstance(content, list):
            messages.append(message)
            continue
        parts = []
        for part in content:
            uuid = part.get("uuid") if part.get("type") == "image_url" else None
            if uuid is not None and not ids:
                part = {key: value for key, value in part.items() if key != "uuid"}
            elif uuid is not None and images is not None and images.holds(uuid):
                named.append(uuid)
                part = {"type": "image_url", "image_url": None, "uuid": uuid}
            elif uuid is not None:
                sent.append(uuid)
            parts.append(part)
        messages.append({**message, "content": parts})
    if ids and not named:
        return payload, sent, named
    return {**payload, "messages": messages}, sent, named


class ServerReplyError(Exception):
    """vLLM answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def backoff_seconds(attempt: int) -> float:
    """The wait after failed attempt number ``attempt`` (from 1): 0.5 s, 1, 2, ... capped."""
    return float(min(BACKOFF_MAX_SECONDS, BACKOFF_SECONDS * 2 ** (attempt - 1)))


def is_transient(exc: BaseException) -> bool:
    """Connection errors and 5xx are worth retrying; a timeout or a 4xx is not (a timed-out
    request already used its time, and a rejected one would be rejected again)."""
    if isinstance(exc, httpx.TimeoutException):
        return False
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ServerReplyError) and exc.status >= 500


def error_message(response: Reply) -> str:
    """vLLM's own error text (``{"error": {"message": ...}}``), else the raw body."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text[:300]) or response.reason_phrase
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return one_line(str(inner["message"]))
        if body.get("message"):
            return one_line(str(body["message"]))
    return one_line(str(body)[:300])


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Usage(_Reply):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Content(_Reply):
    content: str | None = None


class _TopLogprob(_Reply):
    token: str
    logprob: float


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob] = []


class _Logprobs(_Reply):
    content: list[_TokenLogprob] | None = None


class _Choice(_Reply):
    message: _Content | None = None
    delta: _Content | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Tokenized(_Reply):
    tokens: list[int]


class _Counted(_Reply):
    count: int
    max_model_len: int | None = None


def _token_id(token: str) -> int | None:
    """The id in a ``token_id:N`` token (``return_tokens_as_token_ids``)."""
    match = _TOKEN_ID.match(token)
    return int(match.group(1)) if match else None


def token_logprobs(
    content: Sequence[_TokenLogprob], first_ids: dict[str, int]
) -> list[TokenLogprobs]:
    """Each generated position, with the log-probability of every candidate's first token
    (matched by id: the request asked for tokens as ``token_id:N``)."""
    positions = []
    for item in content:
        by_id = {_token_id(alt.token): alt.logprob for alt in item.top_logprobs}
        candidates = [
            CandidateLogprob(text=text, token_id=token, logprob=by_id[token])
            for text, token in first_ids.items()
            if token in by_id
        ]
        top = [(alt.token, alt.logprob) for alt in item.top_logprobs]
        positions.append(
            TokenLogprobs(token=item.token, logprob=item.logprob, top=top, candidates=candidates)
        )
    return positions


class _Completion(_Reply):
    """A chat completion, or one chunk of a streamed one."""

    choices: list[_Choice] = []
    usage: _Usage | None = None


@dataclass
class _LoopState:
    """What belongs to one event loop: the connection pool and the semaphore."""

    loop: asyncio.AbstractEventLoop
    semaphore: asyncio.Semaphore
    http: Http


Send = Callable[[Http, str, str], Awaitable[R]]


class VLLMClient:
    """``suwen.llm.base.VisionLanguageModel`` over one or several vLLM servers."""

    def __init__(
        self,
        urls: Sequence[str],
        settings: Settings,
        *,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        status_hint: Callable[[], str | None] | None = None,
        api_key: str | None = None,
    ) -> None:
        """``model``: the served model name (default: ``settings.vlm`` if a server serves
        it, else the one model it serves). ``transport``: an httpx transport (tests).
        ``status_hint``: says why a managed server cannot be reached (it died, say).
        ``api_key``: the servers' key (default: VLLM_API_KEY, else for servers on this
        machine the key of those started from the data home)."""
        if not urls:
            raise InputError("no vLLM URL given")
        self.settings = settings
        self.endpoints = [Endpoint(normalize_url(url)) for url in urls]
        self._model = model
        self._transport = transport
        self._status_hint = status_hint
        if api_key is None and all(is_loopback_url(url) for url in urls):
            api_key = local_api_key(settings.home)  # servers started from this data home
        self._api_key = api_key or os.environ.get("VLLM_API_KEY") or "EMPTY"
        self._rotation = itertools.count()
        self._state: _LoopState | None = None
        self._images = ImageEncoder(settings.vllm_image_min_pixels, settings.vllm_image_max_pixels)
        self._first_tokens: dict[str, int] = {}  # candidate text -> its first token id (-1: none)

    @property
    def urls(self) -> list[str]:
        return [endpoint.url for endpoint in self.endpoints]

    # -- the protocol ----------------------------------------------------------------------

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
        prefill: str | None = None,
        logprobs: LogprobRequest | None = None,
    ) -> ChatReply:
        payload = await self._payload(messages, max_tokens, temperature)
        if prefill is not None:
            # vLLM renders the last assistant message open-ended and the model continues it.
            payload["messages"].append({"role": "assistant", "content": prefill})
            payload["add_generation_prompt"] = False
            payload["continue_final_message"] = True
        first_ids: dict[str, int] = {}
        if logprobs is not None:
            payload["logprobs"] = True
            if logprobs.candidates:
                first_ids = await self._first_token_ids(logprobs.candidates)
                payload["logprob_token_ids"] = sorted(set(first_ids.values()))
                payload["return_tokens_as_token_ids"] = True
            else:
                payload["top_logprobs"] = logprobs.top
        return await self._complete(
            "chat", purpose, payload, first_ids if logprobs is not None else None
        )

    async def _first_token_ids(self, texts: Sequence[str]) -> dict[str, int]:
        """The id of each text's first token, from the server's own tokenizer (cached)."""
        missing = [text for text in dict.fromkeys(texts) if text not in self._first_tokens]
        for text in missing:
            self._first_tokens[text] = await self._tokenize_first(text)
        ids = {text: self._first_tokens[text] for text in texts if self._first_tokens[text] >= 0}
        if len(set(ids.values())) > MAX_LOGPROB_TOKENS:
            raise InputError(
                f"{len(set(ids.values()))} candidate tokens: vLLM returns at most "
                f"{MAX_LOGPROB_TOKENS} log-probabilities per position"
            )
        return ids

    async def _tokenize_first(self, text: str) -> int:
        async def post(http: Http, url: str, model: str) -> Reply:
            body = {"model": model, "prompt": text, "add_special_tokens": False}
            response = await http.post(f"{url}/tokenize", orjson.dumps(body))
            if response.status_code >= 400:
                raise ServerReplyError(response.status_code, error_message(response))
            return response

        # Tokenizing is not a model call: its record is not logged.
        response, endpoint = await self._send(CallRecord(kind="chat"), post, keep_busy=False)
        try:
            tokens = _Tokenized.model_validate_json(response.content).tokens
        except ValidationError as exc:
            raise ModelError(f"vLLM at {endpoint.url}: unexpected /tokenize reply") from exc
        return tokens[0] if tokens else -1

    async def prompt_size(self, messages: list[Message]) -> PromptSize:
        """The prompt's tokens as the server will count them, and its model length: the text
        through the server's own chat template and tokenizer (``/tokenize``, images left out,
        so no image is sent or processed twice), plus each image's visual tokens for the size
        it is sent at (``suwen.llm.images.visual_tokens``). Exact while the server resizes
        within the same pixel budget as this client, as a managed server does (its
        ``--mm-processor-kwargs`` come from the same settings)."""
        body: dict[str, Any] = {
            "messages": text_only_messages(messages),
            "add_generation_prompt": True,
        }

        async def post(http: Http, url: str, model: str) -> Reply:
            response = await http.post(f"{url}/tokenize", json_body(model, body))
            if response.status_code >= 400:
                raise ServerReplyError(response.status_code, error_message(response))
            return response

        # Counting is not a model call: its record is not logged.
        response, endpoint = await self._send(CallRecord(kind="chat"), post, keep_busy=False)
        try:
            counted = _Counted.model_validate_json(response.content)
        except ValidationError as exc:
            raise ModelError(f"vLLM at {endpoint.url}: unexpected /tokenize reply") from exc
        visual = sum(self._visual_tokens(image) for m in messages for image in m.images)
        return PromptSize(tokens=counted.count + visual, limit=counted.max_model_len)

    def _visual_tokens(self, image: Image.Image) -> int:
        try:
            return visual_tokens(image, self._images.min_pixels, self._images.max_pixels)
        except ValueError:
            return 0  # an image Qwen cannot take: the request itself reports it

    async def stream(
        self,
        messages: list[Message],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        purpose: str = "",
    ) -> AsyncIterator[str]:
        payload = await self._payload(messages, max_tokens, temperature)
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        record = CallRecord(kind="stream", purpose=purpose)
        async with self._loop_state().semaphore:
            started = time.perf_counter()
            try:
                # aclosing: a consumer that stops early still releases the connection now.
                async with contextlib.aclosing(self._stream_chunks(payload, record)) as chunks:
                    async for text in chunks:
                        yield text
            except Exception:
                record.ok = False
                raise
            finally:
                record.seconds = time.perf_counter() - started
                record_call(record)

    async def structured(
        self,
        messages: list[Message],
        schema: type[T],
        *,
        max_tokens: int | None = None,
        purpose: str = "",
    ) -> T:
        budget = max_tokens or self.settings.max_tokens
        payload = await self._payload(messages, budget, None)
        payload["response_format"] = response_format_for(schema)
        reply = await self._complete("structured", purpose, payload)
        try:
            return parse_structured(reply.text, reply.finish_reason, schema)
        except InvalidReplyError as first:
            repair = self._repair_payload(payload, reply, str(first), budget)
        fixed = await self._complete("repair", purpose, repair)
        try:
            return parse_structured(fixed.text, fixed.finish_reason, schema)
        except InvalidReplyError as second:
            raise StructuredOutputError(
                f"{schema.__name__}: the model's reply is not valid JSON for the schema even "
                f"after one repair attempt: {second}"
            ) from second

    async def aclose(self) -> None:
        """Close the connection pool of the current event loop."""
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            await state.http.aclose()
        elif state is not None:
            self._abandon(state)

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- requests --------------------------------------------------------------------------

    async def _payload(
        self, messages: list[Message], max_tokens: int | None, temperature: float | None
    ) -> dict[str, Any]:
        images = [image for message in messages for image in message.images]
        if all(self._images.cached(image) for image in images):
            converted = to_openai_messages(messages, self.settings, self._images)
        else:
            # Resizing and PNG-encoding a large scan takes a while: not on the event loop.
            converted = await asyncio.to_thread(
                to_openai_messages, messages, self.settings, self._images
            )
        return {
            "messages": converted,
            "max_tokens": max_tokens or self.settings.max_tokens,
            "temperature": self.settings.temperature if temperature is None else temperature,
            **self.sampling(),
        }

    def sampling(self) -> dict[str, Any]:
        """The sampling fields set in the settings (top_p, top_k, repetition_penalty), sent
        with every request so the server's own defaults (a model's generation_config.json)
        do not decide them; vLLM's OpenAI server reads top_k and repetition_penalty as extra
        body fields."""
        fields = {
            "top_p": self.settings.top_p,
            "top_k": self.settings.top_k,
            "repetition_penalty": self.settings.repetition_penalty,
        }
        return {name: value for name, value in fields.items() if value is not None}

    def _repair_payload(
        self, payload: dict[str, Any], reply: ChatReply, error: str, budget: int
    ) -> dict[str, Any]:
        """The original request plus the broken reply and what is wrong with it. A reply cut
        off at max_tokens gets twice the budget: the same budget would cut it off again."""
        truncated = reply.finish_reason == "length"
        return {
            **payload,
            "messages": [
                *payload["messages"],
                # The model's own text goes back into a prompt: sanitised like any other.
                {"role": "assistant", "content": for_prompt(reply.text[:REPAIR_ECHO_CHARS])},
                {"role": "user", "content": REPAIR_INSTRUCTION.format(error=for_prompt(error))},
            ],
            "max_tokens": budget * 2 if truncated else budget,
        }

    async def _complete(
        self,
        kind: CallKind,
        purpose: str,
        payload: dict[str, Any],
        first_ids: dict[str, int] | None = None,
    ) -> ChatReply:
        """One request. ``first_ids`` (candidate text -> first token id): log-probabilities
        were asked for; the reply carries them."""
        record = CallRecord(kind=kind, purpose=purpose)

        async def post(http: Http, url: str, model: str) -> Reply:
            return await self._post_chat(http, url, model, payload, stream=False)

        async with self._loop_state().semaphore:
            started = time.perf_counter()
            try:
                response, endpoint = await self._send(record, post, keep_busy=False)
                completion = self._parse(response.content, endpoint.url)
                if completion.usage is not None:
                    record.prompt_tokens = completion.usage.prompt_tokens
                    record.completion_tokens = completion.usage.completion_tokens
                if not completion.choices or completion.choices[0].message is None:
                    raise ModelError(f"vLLM at {endpoint.url}: the reply has no message")
            except BaseException:
                record.ok = False
                raise
            finally:
                record.seconds = time.perf_counter() - started
                record_call(record)
        choice = completion.choices[0]
        text = choice.message.content if choice.message else None
        positions = None
        if first_ids is not None:
            content = choice.logprobs.content if choice.logprobs else None
            positions = token_logprobs(content or [], first_ids)
        return ChatReply(
            text=text or "", finish_reason=choice.finish_reason, record=record, logprobs=positions
        )

    async def _stream_chunks(
        self, payload: dict[str, Any], record: CallRecord
    ) -> AsyncGenerator[str, None]:
        async def open_stream(http: Http, url: str, model: str) -> Reply:
            return await self._post_chat(http, url, model, payload, stream=True)

        # The server stays counted as busy until the stream is read to its end.
        response, endpoint = await self._send(record, open_stream, keep_busy=True)
        try:
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip()
                if not line.startswith("data:") or not data:
                    continue  # SSE comments and blank separators
                if data == "[DONE]":
                    break
                chunk = self._parse(data, endpoint.url)
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    record.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
        except httpx.HTTPError as exc:
            raise self._error(exc, endpoint.url) from exc
        finally:
            endpoint.in_flight -= 1
            await response.aclose()

    async def _post_chat(
        self, http: Http, url: str, model: str, payload: dict[str, Any], *, stream: bool
    ) -> Reply:
        """POST a chat request to the server at ``url``, naming the images it holds rather
        than sending them (``ServerImages``); sent again in full if it no longer holds one.
        With ``stream`` the response is left open for the caller."""
        ids = self.settings.vllm_image_ids
        images = next(e.images for e in self.endpoints if e.url == url) if ids else None
        url = f"{url}/v1/chat/completions"
        body, sent, named = with_named_images(payload, images, ids=ids)
        try:
            response = await self._post_body(http, url, body, model, stream)
        except ServerReplyError as exc:
            if images is None or not named or not is_image_cache_miss(exc.message):
                raise
            images.missed(named)
            body, sent, named = with_named_images(payload, None)  # every image in full
            response = await self._post_body(http, url, body, model, stream)
        if images is not None:
            images.answered(sent, named)
        return response

    @staticmethod
    async def _post_body(
        http: Http, url: str, payload: dict[str, Any], model: str, stream: bool
    ) -> Reply:
        response = await http.request("POST", url, json_body(model, payload), stream=stream)
        if response.status_code >= 400:
            if stream:
                await response.aread()
                await response.aclose()
            raise ServerReplyError(response.status_code, error_message(response))
        return response

    @staticmethod
    def _parse(body: bytes | str, url: str) -> _Completion:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise ModelError(f"vLLM at {url}: the reply is not JSON: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            # vLLM reports errors inside a stream as an event of their own.
            message = one_line(str(data["error"].get("message", data["error"])))
            raise ModelError(f"vLLM at {url} failed mid-reply: {message}")
        try:
            return _Completion.model_validate(data)
        except ValidationError as exc:
            raise ModelError(f"vLLM at {url}: unexpected reply: {validation_summary(exc)}") from exc

    async def _send(
        self, record: CallRecord, send: Send[R], *, keep_busy: bool
    ) -> tuple[R, Endpoint]:
        """``send`` to the least busy server, retrying transient failures (on another server
        when there is one) within the request deadline. With ``keep_busy`` the server stays
        counted as busy after success; the caller releases it."""
        timeout = self.settings.request_timeout
        endpoint = self.endpoints[0]
        attempts = 0
        try:
            async with asyncio.timeout(timeout):
                # A plain loop, not a retry library's: nearly every call succeeds at once,
                # and a library's per-call machinery showed in the coordinator's profile.
                while True:
                    attempts += 1
                    endpoint = self._pick()
                    record.url = endpoint.url
                    try:
                        result = await self._attempt(endpoint, send, keep_busy)
                    except Exception as exc:
                        if attempts > self.settings.max_retries or not is_transient(exc):
                            raise
                        wait = backoff_seconds(attempts)
                        log.info(
                            "retrying a model request in %.1f s (attempt %d failed: %s)",
                            wait,
                            attempts,
                            exc,
                        )
                        await asyncio.sleep(wait)
                    else:
                        return result, endpoint
        except TimeoutError as exc:
            log.warning(
                "%s request to %s: no reply within %g s", record.kind, endpoint.url, timeout
            )
            raise ModelError(f"vLLM at {endpoint.url}: no reply within {timeout:g} s") from exc
        except (httpx.HTTPError, ServerReplyError) as exc:
            tries = f" (after {attempts} attempts)" if attempts > 1 else ""
            error = self._error(exc, endpoint.url, tries)
            log.warning("%s request failed: %s", record.kind, error)
            raise error from exc

    async def _attempt(self, endpoint: Endpoint, send: Send[R], keep_busy: bool) -> R:
        endpoint.in_flight += 1
        succeeded = False
        try:
            http = self._loop_state().http
            result = await send(http, endpoint.url, await self._model_of(endpoint, http))
            succeeded = True
            return result
        except BaseException as exc:
            if is_transient(exc):
                endpoint.last_failure = time.monotonic()
            raise
        finally:
            if not (keep_busy and succeeded):
                endpoint.in_flight -= 1

    def _pick(self) -> Endpoint:
        """The server with the fewest requests in flight, avoiding one that just failed;
        ties go round-robin."""
        now = time.monotonic()
        start = next(self._rotation) % len(self.endpoints)
        order = self.endpoints[start:] + self.endpoints[:start]
        return min(
            order,
            key=lambda e: (now - e.last_failure < FAILURE_COOLDOWN_SECONDS, e.in_flight),
        )

    async def _model_of(self, endpoint: Endpoint, http: Http) -> str:
        """The served model name: given, or found by asking the server once."""
        if self._model is not None:
            return self._model
        if endpoint.model is None:
            response = await http.get(f"{endpoint.url}/v1/models")
            if response.status_code >= 400:
                raise ServerReplyError(response.status_code, error_message(response))
            served = [str(item.get("id")) for item in response.json().get("data", [])]
            if self.settings.vlm in served:
                endpoint.model = self.settings.vlm
            elif len(served) == 1:
                endpoint.model = served[0]
            else:
                raise ModelError(
                    f"vLLM at {endpoint.url} serves {', '.join(served) or 'no model'}, "
                    f"not {self.settings.vlm} (set vlm to the one to use)"
                )
        return endpoint.model

    def _error(self, exc: BaseException, url: str, tries: str = "") -> ModelError:
        """One line a user can act on, naming the server."""
        if isinstance(exc, ServerReplyError):
            text = f"vLLM at {url} answered {exc.status}: {exc.message}{tries}"
        elif isinstance(exc, httpx.TimeoutException):
            text = f"vLLM at {url}: no reply within {self.settings.request_timeout:g} s"
        elif isinstance(exc, httpx.ConnectError):
            text = f"cannot reach vLLM at {url}: {exc or 'connection refused'}{tries}"
        else:
            what = str(exc) or type(exc).__name__
            text = f"vLLM at {url}: connection lost mid-reply ({what}){tries}"
        hint = self._status_hint() if self._status_hint else None
        return ModelError(one_line(f"{text} ({hint})" if hint else text))

    # -- event-loop-bound state ------------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            if self._state is not None:
                self._abandon(self._state)
            semaphore = asyncio.Semaphore(self.settings.concurrency)
            self._state = _LoopState(loop, semaphore, self._http())
        return self._state

    @staticmethod
    def _abandon(state: _LoopState) -> None:
        """The pool of a loop this client is no longer used from."""
        if state.loop.is_closed():
            state.http.abandon()

    def _http(self) -> Http:
        # Prompts and images go to the configured servers only, never through a proxy picked
        # up from the environment (the aiohttp session reads none).
        # vLLM started with --api-key checks it; otherwise any value is accepted.
        headers = {"Authorization": f"Bearer {self._api_key}"}
        read = self.settings.request_timeout
        if self._transport is None:
            return AiohttpHttp(headers, connect=CONNECT_TIMEOUT, read=read)
        return TransportHttp(self._transport, headers, httpx.Timeout(read, connect=CONNECT_TIMEOUT))
