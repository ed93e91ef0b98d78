"""Batch and evaluation questions answered by several agent processes, for a machine with more
cores than one Python process can use.

One Python process runs every question's graph steps, HTTP requests and bookkeeping on one
event loop under one interpreter lock: that bounds how many agent questions per second it can
feed to model servers, however many servers and cores there are (``benchmarks/coordinator.py``).
With ``processes`` above 1, ``suwen batch`` (and ``suwen eval``, for its agent modes) starts
that many child processes (``python -m suwen.answer_processes``), each opening its own agent
(indexes, query encoders, model client) on the same model servers, and hands them the
questions. The parent keeps the rest: the question file, the answer log (it alone writes it,
so resuming works as with one process), the progress bar, and the managed model server when
one is started.

Parent and children speak JSON lines, never pickle: the parent writes to a child's stdin, the
child answers on its original stdout (its own prints go to stderr). A request may name the
mode and the number of case examples to answer with; a reply carries the model calls made for
it, recorded in the parent as if made there (the evaluation tells a refusing server from an
answer by them). A child whose parent is gone (killed, or Ctrl-C, which the children ignore)
reads end-of-file and exits; a child that dies fails only the questions it held, as error lines
the next run asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import BaseModel, Field

from suwen import errors, privacy
from suwen.config import Settings
from suwen.errors import InputError, ModelError, SuwenError
from suwen.llm.base import CallRecord, record_call, recording
from suwen.types import AgentResult, Mode, Question

if TYPE_CHECKING:
    from suwen.llm.client import VLLMClient

# One reply line holds a whole AgentResult (answer, evidence, trace): far above asyncio's
# default 64 KiB line limit.
LINE_LIMIT = 64 * 1024 * 1024
STOP_SECONDS = 10.0  # a child's time to finish after end-of-file before it is killed

Notice = Callable[[str], None]
log = logging.getLogger(__name__)


class ChildSpec(BaseModel):
    """What a child needs to open the same agent as the parent: the first line it reads."""

    settings: dict[str, Any]
    urls: list[str]
    model: str | None = None
    text_index: str | None = None
    image_index: str | None = None
    mode: Mode = "agent"
    report: bool = False


class Request(BaseModel):
    """One question for a child: answered in ``mode`` (default: the spec's) showing
    ``examples`` case examples (default: the settings' ``case_examples``)."""

    id: int
    question: Question
    mode: Mode | None = None
    examples: int | None = Field(None, ge=0)


class _Answered(NamedTuple):
    """A child's reply: the result or the error, and the model calls made for it."""

    result: AgentResult | None
    error: SuwenError | None
    calls: list[CallRecord]


# ---------------------------------------------------------------------------------------------
# The parent


class AnsweringProcesses:
    """An ``Answerer`` (``suwen.batch``) that hands each question to the child with the fewest
    in flight. It ``ReadsImages``: each child's agent decodes its question's images and refuses
    an unreadable one, so the parent does not decode them too. The model calls a child made
    for a question are recorded here as if made here (``suwen.llm.base.recording``)."""

    reads_images: Literal[True] = True

    def __init__(self, children: list[_Child]) -> None:
        self.children = children

    async def __call__(self, question: Question) -> AgentResult:
        return await self.ask(question)

    async def ask(
        self, question: Question, mode: Mode | None = None, examples: int | None = None
    ) -> AgentResult:
        """``question`` answered in ``mode`` showing ``examples`` case examples (None: the
        spec's mode, the settings' count)."""
        while alive := [child for child in self.children if child.alive]:
            child = min(alive, key=lambda child: len(child.waiting))
            try:
                return await child.ask(
                    Request(id=0, question=question, mode=mode, examples=examples)
                )
            except _UndeliveredError:
                continue  # that child is gone; the question never reached it
        raise ModelError("every answering process has exited")

    def asking(self, mode: Mode, examples: int | None = None) -> Asking:
        """The ``Answerer`` that asks in ``mode`` showing ``examples`` case examples."""
        return Asking(self, mode, examples)

    def with_examples(self, mode: Mode, count: int) -> Asking | None:
        """The eval runner's ``ExampleAnswerers`` (``runtime.ExampleVariants``) in the children."""
        return None if mode == "plain" else self.asking(mode, count)


@dataclass(frozen=True)
class Asking:
    """An ``Answerer`` on the children in one mode and number of case examples."""

    processes: AnsweringProcesses
    mode: Mode
    examples: int | None = None
    reads_images: Literal[True] = True

    async def __call__(self, question: Question) -> AgentResult:
        return await self.processes.ask(question, self.mode, self.examples)


class _UndeliveredError(Exception):
    """A question could not be written to its child (the child has exited)."""


class _Child:
    """One child process: requests numbered, replies matched to them by number."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.waiting: dict[int, asyncio.Future[_Answered]] = {}
        self._numbers = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self.alive = True

    @property
    def stdin(self) -> asyncio.StreamWriter:
        assert self.process.stdin is not None
        return self.process.stdin

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.process.stdout is not None
        return self.process.stdout

    async def start(self, spec: ChildSpec) -> list[str]:
        """Send the spec and wait until the child's agent is open; its notices. Raises the
        error the child met opening it (a damaged index, an unreachable server)."""
        self.stdin.write(spec.model_dump_json().encode() + b"\n")
        await self.stdin.drain()
        line = await self.stdout.readline()
        if not line:
            await self.process.wait()
            raise self._gone()
        reply = json.loads(line)
        if "failed" in reply:
            raise _error(reply["failed"], reply["message"])
        self._reader = asyncio.create_task(self._read())
        return [str(notice) for notice in reply.get("notices", [])]

    async def ask(self, request: Request) -> AgentResult:
        """``request`` (its id replaced by this child's next number) answered; the child's model
        calls for it recorded in this task's call logs."""
        number = next(self._numbers)
        future: asyncio.Future[_Answered] = asyncio.get_running_loop().create_future()
        self.waiting[number] = future
        line = request.model_copy(update={"id": number}).model_dump_json()
        try:
            self.stdin.write(line.encode() + b"\n")
            await self.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self.waiting.pop(number, None)
            self.alive = False
            raise _UndeliveredError from exc
        answered = await future
        for call in answered.calls:
            record_call(call)
        if answered.error is not None:
            raise answered.error
        assert answered.result is not None
        return answered.result

    async def _read(self) -> None:
        """Settle each reply's question until the child ends; a reply that cannot be read
        (not Suwen's JSON, or past ``LINE_LIMIT``) ends the child, so no question waits on a
        reply that will never come."""
        try:
            while line := await self.stdout.readline():
                self._settle(*_reply(line))
        except Exception as exc:
            log.error("answering process %s: unreadable reply (%s); stopping it", self.pid, exc)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        self.alive = False
        await self.process.wait()
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(self._gone())
        self.waiting.clear()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _settle(self, number: int, answered: _Answered) -> None:
        future = self.waiting.pop(number, None)
        if future is not None and not future.done():
            future.set_result(answered)

    def _gone(self) -> ModelError:
        code = self.process.returncode
        how = f"exited with code {code}" if code is not None else "stopped reading"
        return ModelError(f"answering process {self.pid} {how}")

    async def close(self) -> None:
        """End-of-file to the child, then its exit (killed after ``STOP_SECONDS``)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            self.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_SECONDS)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await asyncio.shield(self.process.wait())
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _reply(line: bytes) -> tuple[int, _Answered]:
    reply = json.loads(line)
    number = int(reply["id"])
    calls = [CallRecord.model_validate(call) for call in reply.get("calls", [])]
    if "error" in reply:
        return number, _Answered(
            None, _error(reply.get("kind", "SuwenError"), reply["error"]), calls
        )
    return number, _Answered(AgentResult.model_validate(reply["result"]), None, calls)


def _error(kind: str, message: str) -> SuwenError:
    """The child's error as the same class here (its exit code and meaning kept)."""
    found = getattr(errors, kind, None)
    cls = found if isinstance(found, type) and issubclass(found, SuwenError) else SuwenError
    return cls(message)


CHILD_COMMAND = (sys.executable, "-m", "suwen.answer_processes")


@asynccontextmanager
async def started(
    spec: ChildSpec,
    count: int,
    on_notice: Notice | None = None,
    command: Sequence[str] = CHILD_COMMAND,
) -> AsyncIterator[AnsweringProcesses]:
    """``count`` children (``command``: this module's ``main``) opened on ``spec`` all at
    once, closed again on the way out."""
    children: list[_Child] = []
    try:
        for _ in range(count):
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=LINE_LIMIT,
                env=privacy.child_env(),
            )
            children.append(_Child(process))
        starts = [asyncio.ensure_future(child.start(spec)) for child in children]
        try:
            notices = await asyncio.gather(*starts)
        except BaseException:
            for start in starts:
                start.cancel()
            raise
        for notice in dict.fromkeys(itertools.chain.from_iterable(notices)):
            if on_notice is not None:
                on_notice(notice)
        yield AnsweringProcesses(children)
    finally:
        await asyncio.shield(asyncio.gather(*(child.close() for child in children)))


@asynccontextmanager
async def answering(
    settings: Settings,
    urls: Sequence[str],
    count: int,
    *,
    mode: Mode = "agent",
    report: bool = False,
    text_index: str | None = None,
    image_index: str | None = None,
    on_notice: Notice | None = None,
) -> AsyncIterator[AnsweringProcesses]:
    """``count`` agent processes on ``urls`` (else a managed server this process starts and
    stops), each answering as ``runtime.AgentAnswerer`` in ``mode`` does."""
    from suwen.llm.server import served

    async with served(settings, urls) as (endpoints, model):
        spec = ChildSpec(
            settings=settings.model_dump(mode="json"),
            urls=endpoints,
            model=model,
            text_index=text_index,
            image_index=image_index,
            mode=mode,
            report=report,
        )
        async with started(spec, count, on_notice) as processes:
            yield processes


# ---------------------------------------------------------------------------------------------
# The child


@dataclass
class _Replies:
    """The child's reply channel: its original stdout, written whole lines at a time."""

    writer: asyncio.StreamWriter

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()


def main() -> None:
    """The child process: read the spec, open the agent, answer until end-of-file."""
    privacy.enforce()
    privacy.private_umask()
    # Ctrl-C reaches the whole process group: the parent handles it and the child ends at
    # end-of-file, after the parent saved what was answered.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr
    from suwen.runtime import run_async

    run_async(_serve(replies))


async def _serve(replies_file: IO[bytes]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, replies_file
    )
    replies = _Replies(asyncio.StreamWriter(transport, protocol, None, loop))
    line = await reader.readline()
    if not line:
        return
    spec = ChildSpec.model_validate_json(line)
    try:
        async with _opened(spec) as (answer, notices):
            await replies.send({"ready": True, "notices": notices})
            await _answer_until_end(reader, replies, answer)
    except SuwenError as exc:
        await replies.send({"failed": type(exc).__name__, "message": str(exc)})
    finally:
        transport.close()


class _ChildAnswerers:
    """The child's answerer for each request: the spec's mode, or the request's mode and
    number of case examples (``runtime.ExampleVariants``: one agent per count)."""

    def __init__(self, agent: Any, spec: ChildSpec) -> None:
        from suwen.runtime import AgentAnswerer, ExampleVariants

        self.agent = agent
        self.spec = spec
        self.default = AgentAnswerer(agent, spec.mode, report=spec.report)
        self.variants = ExampleVariants(agent)

    def __call__(self, request: Request) -> Callable[[Question], Awaitable[AgentResult]]:
        from suwen.runtime import AgentAnswerer

        mode = request.mode or self.spec.mode
        if request.examples is not None:
            chosen = self.variants(mode, request.examples)
            if chosen is None:
                raise InputError(f"{mode} mode shows no case examples")
            return chosen
        if mode == self.spec.mode:
            return self.default
        return AgentAnswerer(self.agent, mode, report=self.spec.report)


@asynccontextmanager
async def _opened(spec: ChildSpec) -> AsyncIterator[tuple[_ChildAnswerers, list[str]]]:
    from suwen import logs
    from suwen.runtime import current_backends, open_agent

    settings = Settings.model_validate(spec.settings)
    logs.configure(settings.home)
    notices: list[str] = []
    # This process's searchers, and a client on the parent's servers and model.
    backends = replace(
        current_backends(), open_model=lambda s, urls: model_client(s, urls, spec.model)
    )
    async with open_agent(
        settings,
        spec.urls,
        text_index=spec.text_index,
        image_index=spec.image_index,
        sessions=False,
        backends=backends,
        on_notice=notices.append,
    ) as agent:
        yield _ChildAnswerers(agent, spec), notices


@asynccontextmanager
async def model_client(
    settings: Settings, urls: Sequence[str], model: str | None
) -> AsyncIterator[VLLMClient]:
    """A client on servers another process started or was given (``llm.server.served``)."""
    from suwen.llm.client import VLLMClient

    client = VLLMClient(list(urls), settings, model=model)
    try:
        yield client
    finally:
        await client.aclose()


async def _answer_until_end(
    reader: asyncio.StreamReader, replies: _Replies, answerers: _ChildAnswerers
) -> None:
    """Answer each request as it comes, all at once (the parent bounds how many are in
    flight). End-of-file: the parent is done, or gone; what is still being answered is
    dropped (a parent that is gone cannot save it; the next run asks those again)."""
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(
            _answer_one(Request.model_validate_json(line), replies, answerers)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _answer_one(request: Request, replies: _Replies, answerers: _ChildAnswerers) -> None:
    """Answer ``request`` and reply with the result or the error, and the model calls made."""
    reply: dict[str, Any] = {"id": request.id}
    with recording() as log:
        try:
            result = await answerers(request)(request.question)
        except Exception as exc:  # one failing question must not stop the others
            from suwen.batch import error_text

            reply["error"] = error_text(exc)
            reply["kind"] = type(exc).__name__ if isinstance(exc, SuwenError) else "SuwenError"
        else:
            reply["result"] = result.model_dump(mode="json")
    reply["calls"] = [call.model_dump(mode="json") for call in log.records]
    await replies.send(reply)


if __name__ == "__main__":
    main()
