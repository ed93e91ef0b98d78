"""The coordinator's ceiling: how many agent questions per second one Suwen process can drive
when the model costs nothing, so how many GPUs one batch or evaluation process can keep busy.

A stand-in OpenAI-compatible server runs in another process on 127.0.0.1 and answers every
request at once (look, plan, reread, decide, short answer, confidence probe and the streamed
answer, each with a reply of the right shape, chosen as the scripted test model chooses them:
``tests/fake_model.py``). Suwen's real ``VLLMClient`` (HTTP, JSON parsing, validation), the
real agent (agent mode, retrieval rounds) and real indexes (MiniLM text index of the 1000
PubMedQA abstracts, tiny-clip image index of VQA-RAD training images) run in this process;
questions are VQA-RAD and PubMedQA test questions (half each; ``--kind image`` or ``text`` for one
kind only), ``--concurrency`` at a time.

Reports questions/s, model calls/s and this process's CPU seconds per question (user + system,
all threads; the server's CPU is not counted), and with ``--profile`` the functions where that
CPU goes (cProfile, cumulative). ``--processes N`` answers with N agent processes as ``suwen
batch --processes N`` does; ``--eval`` asks through ``suwen eval``'s runner in agent mode (each
answer scored and recorded, as an evaluation run does), so the parent's own CPU per question
(``own_cpu_s_per_question``) says how many agent processes one evaluation can coordinate.

    .venv/bin/python -m benchmarks.coordinator [--questions 60] [--concurrency 16] [--profile]

Prints a table and writes benchmarks/results/coordinator.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import hashlib
import io
import json
import os
import pstats
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    cpu_seconds,
    minilm_or_exit,
    processor,
    shared_data_default,
    write_json,
)
from suwen.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from suwen.privacy import private_dir
from suwen.runtime import run_async

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "coordinator.json"
HOST = "127.0.0.1"
MODEL_NAME = "stand-in"
TARGET_QPS = 50.0
MODEL_LEN = 32768  # the stand-in's model length: every answer prompt fits
IMAGE_CASES = 200

# -- the stand-in server ---------------------------------------------------------------------

PURPOSE_OF_SCHEMA = {
    "PlanReply": "plan",
    "RereadReply": "reread",
    "DecideReply": "decide",
    "ShortAnswerReply": "short_answer",
}


@dataclass
class _Said:
    """A request message as the scripted model reads it (text and image count)."""

    text: str
    images: list[None]


def _messages(body: dict[str, Any]) -> list[_Said]:
    said = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            said.append(_Said(content, []))
            continue
        parts = content or []
        text = "\n".join(p.get("text", "") for p in parts if p.get("type") == "text")
        said.append(_Said(text, [None] * sum(p.get("type") == "image_url" for p in parts)))
    return said


def token_id(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:6], 16)


def tokenized(request: dict[str, Any]) -> dict[str, Any]:
    """vLLM's /tokenize reply: a prompt's first token (the confidence probe's candidates), or
    a chat's token count and the model length (the answer prompt fitted to the model)."""
    if "prompt" in request:
        return {"count": 1, "tokens": [token_id(request["prompt"])], "max_model_len": MODEL_LEN}
    return {"count": prompt_tokens(request), "tokens": [], "max_model_len": MODEL_LEN}


def prompt_tokens(request: dict[str, Any]) -> int:
    """A chat's prompt length as the stand-in counts it: a token per four characters."""
    return len(" ".join(said.text for said in _messages(request))) // 4


def reply_for(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]] | None]:
    """(content, logprobs content or None) for one chat request."""
    from tests.fake_model import FakeCall, default_reply

    schema = (body.get("response_format") or {}).get("json_schema", {}).get("name", "")
    purpose = PURPOSE_OF_SCHEMA.get(schema, "look") if schema else "answer"
    wanted = body.get("logprob_token_ids")
    call = FakeCall(kind="chat", purpose=purpose, messages=_messages(body), max_tokens=None)  # type: ignore[arg-type]
    if wanted:
        # A confidence probe: one position, most of the mass on the first candidate.
        first = wanted[0]
        top = [
            {"token": f"token_id:{tid}", "logprob": -0.5 if tid == first else -2.5}
            for tid in wanted
        ]
        return "A", [{"token": f"token_id:{first}", "logprob": -0.5, "top_logprobs": top}]
    reply = default_reply(call)
    content = reply if isinstance(reply, str) else "A"
    return (padded(content) if purpose == "answer" else content), None


ANSWER_WORDS = {"words": 0}  # in the stand-in's process: --answer-words
FILLER = "The image and the question are read together with the evidence in this sentence."


def padded(answer: str) -> str:
    """The scripted answer lengthened to ``--answer-words`` words by sentences before its
    short answer line (a real model's answer is a few hundred tokens, the script's a few
    dozen words)."""
    body, marker, short = answer.partition("\nShort answer:")
    words = FILLER.split()
    missing = ANSWER_WORDS["words"] - len(answer.split())
    filler = " ".join(words[i % len(words)] for i in range(max(0, missing)))
    return (body + " " + filler).rstrip() + marker + short if filler else answer


def completion(content: str, logprobs: list[dict[str, Any]] | None, prompt: int) -> bytes:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "finish_reason": "stop",
    }
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    usage = {"prompt_tokens": prompt, "completion_tokens": max(1, len(content.split()))}
    return json.dumps(
        {"id": "x", "object": "chat.completion", "choices": [choice], "usage": usage}
    ).encode()


def streamed(content: str, prompt: int) -> bytes:
    """A streamed reply as vLLM writes one: an event per token (here per word), each a whole
    chunk object."""
    words = content.split(" ")
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": (" " if i else "") + word} for i, word in enumerate(words)]
    chunks = [
        _chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]) for d in deltas
    ]
    chunks.append(_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    usage = {"prompt_tokens": prompt, "completion_tokens": len(words)}
    chunks.append(_chunk([]) | {"usage": usage})
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def _chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1764720000,
        "model": MODEL_NAME,
        "choices": choices,
    }


SERVED = {"requests": 0, "bytes": 0}  # in the stand-in's process
HELD: set[str] = set()  # ids of the images sent in full, as vLLM's multimodal cache keeps them


def image_cache_miss(request: dict[str, Any]) -> bytes | None:
    """vLLM's 400 for a request naming an image it was never sent; the others kept."""
    parts = [
        part
        for message in request.get("messages", [])
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]
    for index, part in enumerate(parts):
        if part.get("image_url") is None and part.get("uuid") not in HELD:
            message = f"Cache miss for image at index {index} but data is not provided."
            return json.dumps({"error": {"message": message, "code": 400}}).encode()
    HELD.update(part["uuid"] for part in parts if part.get("uuid") and part.get("image_url"))
    return None


def respond(method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
    if method == "GET" and path.startswith("/served"):
        counts = SERVED | {"cpu_s": time.process_time()}
        return 200, "application/json", json.dumps(counts).encode()
    SERVED["requests"] += 1
    SERVED["bytes"] += len(body)
    if method == "GET" and path.startswith("/v1/models"):
        return 200, "application/json", json.dumps({"data": [{"id": MODEL_NAME}]}).encode()
    if method == "GET" and path.startswith("/health"):
        return 200, "application/json", b"{}"
    request = json.loads(body or b"{}")
    if path.startswith("/tokenize"):
        return 200, "application/json", json.dumps(tokenized(request)).encode()
    if path.startswith("/v1/chat/completions"):
        miss = image_cache_miss(request)
        if miss is not None:
            return 400, "application/json", miss
        content, logprobs = reply_for(request)
        prompt = prompt_tokens(request)
        if request.get("stream"):
            return 200, "text/event-stream", streamed(content, prompt)
        return 200, "application/json", completion(content, logprobs, prompt)
    return 404, "application/json", b'{"error": "not found"}'


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive, one request after another on each connection."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            status, kind, payload = respond(method, path, body)
            writer.write(
                f"HTTP/1.1 {status} OK\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def serve(port: int, answer_words: int) -> None:
    ANSWER_WORDS["words"] = answer_words

    async def main() -> None:
        server = await asyncio.start_server(handle, HOST, port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def stand_in(answer_words: int = 0) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "benchmarks.coordinator", "--serve", str(port)),
            *("--answer-words", str(answer_words)),
        ],
        cwd=HERE.parent,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 0.5):
                break
            time.sleep(0.2)
        yield f"http://{HOST}:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- indexes ------------------------------------------------------------------------------------


def build_indexes(home: Path, data: Path, work: Path) -> dict[str, str]:
    """The MiniLM text index of PubMedQA's abstracts and the tiny-clip image index of VQA-RAD
    training images (none of the test split's), in ``home``; the settings they need."""
    from suwen.config import Settings
    from suwen.devtools.tiny_clip import write_tiny_clip
    from suwen.indexes.image_index import build_image_index
    from suwen.indexes.text_index import build_text_index

    private_dir(work)
    clip = work / "tiny-clip"
    if not clip.exists():
        write_tiny_clip(clip)
    values = {"text_encoder": minilm_or_exit(), "image_encoder": str(clip), "device": "cpu"}
    settings = Settings(home=home, **values)  # type: ignore[arg-type]
    print("indexing PubMedQA's 1000 abstracts with MiniLM", flush=True)
    report = build_text_index(settings, settings.text_index, [data / "pubmedqa" / "ori_pqal.json"])
    assert not report.errors, report.errors
    root = data / "vqa_rad"
    train = json.loads((root / "trainset.json").read_text(encoding="utf-8"))
    test = {qa["image_name"] for qa in json.loads((root / "testset.json").read_text("utf-8"))}
    cases: dict[str, dict[str, str]] = {}
    for qa in train:
        if qa["image_name"] not in test:
            case = cases.setdefault(qa["image_name"], {"caption": "", "organ": qa["image_organ"]})
            case["caption"] = f"{case['caption']} {qa['question']} {qa['answer']}.".strip()
    folder = private_dir(work / "cases")
    lines = []
    for name in sorted(cases)[:IMAGE_CASES]:
        atomic_write_bytes(folder / name, (root / "images" / name).read_bytes())
        row = {"path": name, "id": Path(name).stem, "caption": cases[name]["caption"]}
        lines.append(json.dumps(row | {"body_part": cases[name]["organ"], "source": "VQA-RAD"}))
    atomic_write_text(folder / "manifest.jsonl", "\n".join(lines) + "\n")
    print(f"indexing {len(lines)} VQA-RAD training images with tiny-clip", flush=True)
    build_image_index(settings, settings.image_index, folder / "manifest.jsonl")
    return values


# -- the measurement ---------------------------------------------------------------------------


class CollectorTime:
    """How often and how long Python's cyclic garbage collector ran (CPU seconds, by
    generation) while it is installed: with PyTorch and open_clip loaded a full collection
    walks every one of their objects."""

    def __init__(self) -> None:
        self.runs = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        # The collector runs in the thread that triggered it: that thread's CPU clock is the
        # exact one, and much cheaper to read than the whole process's.
        if phase == "start":
            self._began = time.thread_time()
            return
        generation = info["generation"]
        self.runs[generation] += 1
        self.seconds[generation] += time.thread_time() - self._began

    @contextlib.contextmanager
    def installed(self) -> Iterator[CollectorTime]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


async def evaluated(samples: list[Any], answer: Any, concurrency: int, home: Path) -> list[int]:
    """``samples`` asked through ``suwen eval``'s runner in agent mode, as ``suwen eval
    --modes agent`` asks them (scored, each record written to its samples file); each answer's
    model calls."""
    from suwen.answer_processes import AnsweringProcesses
    from suwen.evaluate.runner import EvalConfig, read_records, run_evaluation, samples_path

    by_benchmark: dict[str, list[Any]] = {}
    for sample in samples:
        by_benchmark.setdefault(sample.benchmark, []).append(sample)
    out = Path(tempfile.mkdtemp(prefix="eval-", dir=home))
    config = EvalConfig(
        benchmarks=list(by_benchmark), modes=["agent"], out=out, concurrency=concurrency
    )
    asked = answer.asking("agent") if isinstance(answer, AnsweringProcesses) else answer
    await run_evaluation(config, by_benchmark, model=None, answerer=asked)
    records = [read_records(samples_path(out, name, "agent")) for name in by_benchmark]
    return [record.model_calls for found in records for record in found]


def served(url: str) -> tuple[int, int, float]:
    """Requests and request-body bytes the stand-in has received, and its CPU seconds."""
    import httpx

    counts = httpx.get(f"{url}/served", timeout=10).json()
    return int(counts["requests"]), int(counts["bytes"]), float(counts["cpu_s"])


def processes_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_idle() -> tuple[int, int]:
    """(idle, all) clock ticks of every core since boot, from /proc/stat."""
    with Path("/proc/stat").open(encoding="ascii") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait


class Listened:
    """Asks as ``suwen ask`` and ``suwen chat`` do: someone listens to the run, so the answer
    is streamed token by token (batch and eval, which nobody watches, get it in one reply)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    async def __call__(self, question: Any) -> Any:
        return await self.agent.run(question, mode="agent", on_event=lambda event: None)


async def drive(args: argparse.Namespace, values: dict[str, str], home: Path, url: str) -> Any:
    from suwen.answer_processes import answering
    from suwen.config import Settings
    from suwen.evaluate.benchmarks import LoadContext, load_pubmedqa, load_vqa_rad
    from suwen.runtime import AgentAnswerer, open_agent

    settings = Settings(
        home=home,
        vlm=MODEL_NAME,
        vllm_url=[url],
        concurrency=args.concurrency * 4,  # model requests in flight: rereads go in parallel
        **values,  # type: ignore[arg-type]
    )
    context = LoadContext(data=args.data, cache_dir=home / "cache")
    images = {"mixed": args.questions // 2, "image": args.questions, "text": 0}[args.kind]
    samples = load_vqa_rad(context)[:images] + load_pubmedqa(context)[: args.questions - images]
    notices: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        if args.processes > 1:
            answer: Any = await stack.enter_async_context(
                answering(settings, [url], args.processes, on_notice=notices.append)
            )
            agents = [child.process.pid for child in answer.children]
        else:
            agent = await stack.enter_async_context(
                open_agent(settings, [url], sessions=False, on_notice=notices.append)
            )
            answer = Listened(agent) if args.listen else AgentAnswerer(agent, "agent")
            agents = []
        gate = asyncio.Semaphore(args.concurrency)

        async def one(sample: Any) -> int:
            async with gate:
                result = await answer(sample.to_question())
                return int(result.model_calls)

        # Warm-up: imports, the query encoder, the first connections; not measured.
        warm = samples[: args.concurrency]
        if args.eval:  # and the scoring's imports
            await evaluated(warm, answer, args.concurrency, home)
        else:
            await asyncio.gather(*(one(s) for s in warm))
        profiler = cProfile.Profile() if args.profile else None
        requests, sent, server_cpu = served(url)
        idle = machine_idle()
        own_cpu, started = cpu_seconds(), time.perf_counter()
        cpu = own_cpu + processes_cpu(agents)
        loop_cpu = time.thread_time()  # the event loop's own thread
        with CollectorTime().installed() as collector:
            if profiler:
                profiler.enable()
            if args.eval:
                calls = await evaluated(samples, answer, args.concurrency, home)
            else:
                calls = await asyncio.gather(*(one(s) for s in samples))
            if profiler:
                profiler.disable()
        wall = time.perf_counter() - started
        own_cpu = cpu_seconds() - own_cpu
        cpu = cpu_seconds() + processes_cpu(agents) - cpu
        loop_cpu = time.thread_time() - loop_cpu
        idle_now = machine_idle()
        requests_now, sent_now, server_cpu_now = served(url)
        requests, sent = requests_now - requests, sent_now - sent
        server_cpu = server_cpu_now - server_cpu
        idle_share = (idle_now[0] - idle[0]) / max(1, idle_now[1] - idle[1])
        agents_peak_mb = sum(peak_rss_mb(pid) for pid in agents)
    result: dict[str, Any] = {
        "questions": len(samples),
        "kind": args.kind,
        "image_questions": sum(bool(s.to_question().images) for s in samples),
        "concurrency": args.concurrency,
        "wall_s": round(wall, 2),
        "questions_per_s": round(len(samples) / wall, 2),
        "processes": args.processes,
        "asked_by": "suwen eval's runner (agent mode, scored)" if args.eval else "the agent",
        "answer": "streamed to a listener" if args.listen else "one reply",
        "answer_words": args.answer_words or "as scripted",
        "model_calls": sum(calls),
        "model_calls_per_question": round(sum(calls) / len(samples), 2),
        "model_calls_per_s": round(sum(calls) / wall, 1),
        # Model calls plus what is not one: /tokenize (answer prompt length, probe tokens).
        "http_requests_per_question": round(requests / len(samples), 2),
        "request_kb_per_question": round(sent / 1000 / len(samples), 1),
        "cpu_s_per_question": round(cpu / len(samples), 4),
        "cpu_share_of_wall": round(cpu / wall, 2),
        # This process alone: with agent processes, what the coordinating parent costs.
        "own_cpu_s_per_question": round(own_cpu / len(samples), 4),
        "event_loop_cpu_s_per_question": round(loop_cpu / len(samples), 4),
        "event_loop_share_of_wall": round(loop_cpu / wall, 2),
        # The stand-in's own CPU (it shares these cores) and how much of the machine sat idle.
        "stand_in_cpu_s_per_question": round(server_cpu / len(samples), 4),
        "machine_idle_share": round(idle_share, 2),
        "gc_runs_by_generation": collector.runs,
        "gc_cpu_s_per_question": round(sum(collector.seconds) / len(samples), 4),
        "objects_tracked_by_gc": len(gc.get_objects()),
        # The query encoders' ONNX exports keep PyTorch out of the agent's process.
        "torch_imported": "torch" in sys.modules,
        # With agent processes: the parent's peak plus each agent's (read before they close).
        "peak_rss_mb": round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 + agents_peak_mb, 1
        ),
        "notices": notices,
        "load": [round(x, 2) for x in os.getloadavg()],
    }
    if profiler and args.profile_out:
        profiler.dump_stats(args.profile_out)
    if profiler:
        # Own time first (where the CPU is spent), then cumulative (which caller spends it);
        # cumulative counts in coroutines count every resumption as a call.
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(40)
            result[f"profile_{order}"] = out.getvalue().splitlines()[:80]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--kind",
        choices=("mixed", "image", "text"),
        default="mixed",
        help="half VQA-RAD image questions and half PubMedQA (mixed), or one kind only",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="agent processes (suwen.answer_processes, as suwen batch --processes) instead of "
        "one agent in this process",
    )
    parser.add_argument("--home", type=Path, default=None, help="reuse indexes built here")
    parser.add_argument(
        "--eval",
        action="store_true",
        help="ask through suwen eval's runner (agent mode: scored and recorded per question)",
    )
    parser.add_argument(
        "--answer-words",
        type=int,
        default=0,
        help="lengthen every answer to this many words, streamed a word per event (0: the "
        "scripted answers, a few dozen words)",
    )
    parser.add_argument(
        "--listen",
        action="store_true",
        help="ask as suwen ask and chat do, with a listener: the answer streamed token by token",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", type=Path, default=None, help="save the pstats here")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.answer_words)
        return
    if args.listen and (args.processes > 1 or args.eval):
        parser.error(
            "--listen asks in this process, as suwen ask does (not with --processes or --eval)"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="suwen-coordinator-") as tmp:
        work = Path(tmp)
        home = args.home or work / "home"
        marker = private_dir(home) / "coordinator-settings.json"
        if marker.is_file():
            values = json.loads(marker.read_text(encoding="utf-8"))
        else:
            values = build_indexes(home, args.data, home.parent / "coordinator-models")
            atomic_write_json(marker, values)
        with stand_in(args.answer_words) as url:
            result = run_async(drive(args, values, home, url))
    result["machine"] = {"cpus": os.cpu_count(), **processor()}
    result["target_questions_per_s"] = TARGET_QPS
    result["command"] = f"python -m benchmarks.coordinator --questions {args.questions} " + (
        f"--concurrency {args.concurrency} --kind {args.kind}"
        + (f" --processes {args.processes}" if args.processes > 1 else "")
        + (" --eval" if args.eval else "")
        + (f" --answer-words {args.answer_words}" if args.answer_words else "")
        + (" --listen" if args.listen else "")
        + (" --profile" if args.profile else "")
    )
    write_json(args.out, result)
    print(
        f"{result['questions']} agent questions ({result['image_questions']} with an image), "
        f"concurrency {result['concurrency']}: "
        f"{result['questions_per_s']} questions/s, {result['model_calls_per_s']} model calls/s "
        f"({result['model_calls_per_question']} per question), "
        f"{result['cpu_s_per_question']} CPU s per question "
        f"({result['event_loop_cpu_s_per_question']} on the event loop's thread, "
        f"{result['gc_cpu_s_per_question']} in the garbage collector; the stand-in "
        f"{result['stand_in_cpu_s_per_question']}; machine idle {result['machine_idle_share']}), "
        f"{result['request_kb_per_question']} kB sent per question; load {result['load']}"
    )
    for order in ("tottime", "cumulative"):
        for line in result.get(f"profile_{order}", [])[:45]:
            print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
