"""What Suwen's VLLMClient costs over a bare ``openai`` client, against the same vLLM server.

For concurrency 1, 4 and 16, the same chat request (a VQA-RAD question, text only or with its
radiograph) goes through ``VLLMClient.chat`` and through ``openai.AsyncOpenAI``
``chat.completions.create`` with the same concurrency cap (closed loop: ``concurrency``
requests in flight). Reports requests/s and completion tokens/s per client, and the overhead
= 1 - Suwen requests/s / bare requests/s; the target is overhead within 5%.

Against vLLM (default ``--vllm-method simultaneous``) both clients run at the same time, each
in its own process, for ``--windows`` windows of ``--window-seconds``; the overhead is the
median over windows (with its interquartile range). Run one after the other, in short
alternating rounds (``--vllm-method alternating``), the tiny model on a shared 2-core machine
moved single rounds by +-30% or more, swamping a 5% difference: batching, the engine's
OpenMP threads and other load change from second to second. Run together, both clients see
the same server at every moment.

With a managed server on a machine with 2 or more cores, the engine's OpenMP threads are
bound to all cores but the last and the clients run on the last (``--no-pin`` to turn off):
a client sharing a core with spinning OpenMP threads stalls their barriers.

The same comparison also runs against a stand-in server in another process that answers
every chat completion with a fixed reply after a fixed 50 ms, in alternating rounds (A-B, B-A):
there the server costs the same for every request, so it isolates what each client itself
costs.

Why separate processes, not one event loop: in one loop the two HTTP stacks interfere
(openai uses httpx2, VLLMClient httpx; interleaved, plain httpx requests took 20-40% longer
than httpx2 ones against a fixed-latency fake server, although run alone httpx was the
faster), which measures the loop's fairness, not what a client costs.

In the image workload both clients send the same radiograph on every call, as the agent does
within one question: the bare client a data URL encoded once up front, VLLMClient the PIL
image, which it resizes and encodes on its first call (in the warm-up) and then serves from
its per-image cache. The one-off encoding cost is reported separately (``image_encode_ms``).

Model: a running server (``--vllm-url``) or a managed server started on ``--vlm`` (default:
the tiny checkpoint, built into a temporary directory with ``suwen.devtools.tiny_qwen``).

    .venv/bin/python -m benchmarks.client_overhead
    .venv/bin/python -m benchmarks.client_overhead --vllm-url http://127.0.0.1:8000

Prints a table and writes benchmarks/results/client_overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from PIL import Image

from benchmarks.common import shared_data_default
from suwen.config import Settings
from suwen.llm.base import Message
from suwen.llm.client import VLLMClient, to_openai_messages
from suwen.llm.images import image_to_data_url
from suwen.llm.server import ManagedServer, free_port

HERE = Path(__file__).resolve().parent
IMAGE = "synpic42202.jpg"  # a chest radiograph from the VQA-RAD test split
LEVELS = (1, 4, 16)

# One request: returns its completion tokens.
Request = Callable[[], Awaitable[int]]


@dataclass
class Round:
    client: str
    requests: int
    seconds: float
    completion_tokens: int

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds


@dataclass
class Level:
    server: str
    workload: str
    concurrency: int
    requests_per_client: int
    suwen_rps: float
    bare_rps: float
    suwen_tps: float
    bare_tps: float
    overhead_percent: float  # median over pairs of rounds, or over windows
    overhead_iqr: tuple[float, float]
    pair_overheads: list[float]
    method: str = "alternating rounds"


async def timed_round(request: Request, client: str, count: int, concurrency: int) -> Round:
    """``count`` requests, at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with gate:
            return await request()

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one() for _ in range(count)))
    return Round(client, count, time.perf_counter() - started, sum(tokens))


def pooled(rounds: list[Round]) -> tuple[float, float]:
    """(requests/s, tokens/s) over all ``rounds``."""
    seconds = sum(r.seconds for r in rounds)
    return sum(r.requests for r in rounds) / seconds, sum(
        r.completion_tokens for r in rounds
    ) / seconds


def requests_for(
    url: str, settings: Settings, messages: list[Message], max_tokens: int
) -> tuple[VLLMClient, AsyncOpenAI, Request, Request]:
    suwen = VLLMClient([url], settings, model=settings.vlm)
    bare = AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
    payload: Any = to_openai_messages(messages, settings)  # encoded once for the bare client

    async def through_suwen() -> int:
        reply = await suwen.chat(messages, max_tokens=max_tokens, temperature=0.0)
        return reply.record.completion_tokens

    async def through_openai() -> int:
        response = await bare.chat.completions.create(
            model=settings.vlm, messages=payload, max_tokens=max_tokens, temperature=0.0
        )
        return response.usage.completion_tokens if response.usage else 0

    return suwen, bare, through_suwen, through_openai


async def measure(
    server: str,
    url: str,
    settings: Settings,
    workload: str,
    messages: list[Message],
    concurrency: int,
    pairs_wanted: int,
    max_tokens: int,
) -> Level:
    settings = settings.model_copy(update={"concurrency": concurrency})
    suwen, bare, through_suwen, through_openai = requests_for(url, settings, messages, max_tokens)
    count = max(8, 4 * concurrency)  # per round: a second or two
    # Warm up both paths (connections, prefix cache, the image cache) before timing.
    await timed_round(through_suwen, "suwen", concurrency, concurrency)
    await timed_round(through_openai, "openai", concurrency, concurrency)
    pairs: list[tuple[Round, Round]] = []
    for index in range(pairs_wanted):
        if index % 2 == 0:  # A-B, then B-A: neither client always goes first
            ours = await timed_round(through_suwen, "suwen", count, concurrency)
            bare_round = await timed_round(through_openai, "openai", count, concurrency)
        else:
            bare_round = await timed_round(through_openai, "openai", count, concurrency)
            ours = await timed_round(through_suwen, "suwen", count, concurrency)
        pairs.append((ours, bare_round))
    await suwen.aclose()
    await bare.close()
    overheads = sorted(
        100 * (1 - ours.requests_per_second / other.requests_per_second) for ours, other in pairs
    )
    quartiles = statistics.quantiles(overheads, n=4)
    suwen_rps, suwen_tps = pooled([ours for ours, _ in pairs])
    bare_rps, bare_tps = pooled([other for _, other in pairs])
    return Level(
        server=server,
        workload=workload,
        concurrency=concurrency,
        requests_per_client=count * pairs_wanted,
        suwen_rps=suwen_rps,
        bare_rps=bare_rps,
        suwen_tps=suwen_tps,
        bare_tps=bare_tps,
        overhead_percent=statistics.median(overheads),
        overhead_iqr=(round(quartiles[0], 2), round(quartiles[2], 2)),
        pair_overheads=[round(value, 2) for value in overheads],
    )


# ---------------------------------------------------------------------------------------------
# Against vLLM: both clients at once, each in its own process, over the same time windows


def closed_loop_worker(
    client: str,
    url: str,
    settings_json: str,
    messages_of: tuple[str, str],
    concurrency: int,
    max_tokens: int,
    windows: int,
    seconds: float,
    barrier: Any,
    results: Any,
) -> None:
    """One client's closed loop (``concurrency`` in flight) for ``windows`` x ``seconds``,
    started together with the other client's process; puts per-window request and token
    counts on ``results``."""
    settings = Settings.model_validate_json(settings_json)
    messages = workloads(Path(messages_of[0]))[messages_of[1]]

    async def run() -> tuple[list[int], list[int]]:
        suwen, bare, through_suwen, through_openai = requests_for(
            url, settings, messages, max_tokens
        )
        request = through_suwen if client == "suwen" else through_openai
        await asyncio.gather(*(request() for _ in range(concurrency)))  # warm up
        counts, tokens = [0] * windows, [0] * windows
        await asyncio.to_thread(barrier.wait)
        began = time.monotonic()
        end = began + windows * seconds

        async def loop() -> None:
            while time.monotonic() < end:
                completion = await request()
                window = int((time.monotonic() - began) // seconds)
                if window < windows:
                    counts[window] += 1
                    tokens[window] += completion

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        await suwen.aclose()
        await bare.close()
        return counts, tokens

    counts, tokens = asyncio.run(run())
    results.put((client, counts, tokens))


def measure_simultaneous(
    url: str,
    settings: Settings,
    shared_data: Path,
    workload: str,
    concurrency: int,
    windows: int,
    seconds: float,
    max_tokens: int,
) -> Level:
    """Suwen's client and the bare openai client drive the same server at the same time,
    each from its own process with ``concurrency`` requests in flight: the server's moods
    (batching, the engine's threads, other load) hit both alike, which short alternating
    rounds cannot ensure on a 2-core machine. Overhead per window = 1 - Suwen's completed
    requests / the bare client's."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    settings = settings.model_copy(update={"concurrency": concurrency})
    workers = [
        context.Process(
            target=closed_loop_worker,
            args=(
                client,
                url,
                settings.model_dump_json(),
                (str(shared_data), workload),
                concurrency,
                max_tokens,
                windows,
                seconds,
                barrier,
                results,
            ),
        )
        for client in ("suwen", "openai")
    ]
    for worker in workers:
        worker.start()
    got = {}
    for _ in workers:
        client, counts, tokens = results.get()
        got[client] = (counts, tokens)
    for worker in workers:
        worker.join()
    (ours, our_tokens), (theirs, their_tokens) = got["suwen"], got["openai"]
    overheads = sorted(100 * (1 - a / b) for a, b in zip(ours, theirs, strict=True) if b)
    quartiles = statistics.quantiles(overheads, n=4)
    total = windows * seconds
    return Level(
        server="vLLM",
        workload=workload,
        concurrency=concurrency,
        requests_per_client=sum(ours),
        suwen_rps=sum(ours) / total,
        bare_rps=sum(theirs) / total,
        suwen_tps=sum(our_tokens) / total,
        bare_tps=sum(their_tokens) / total,
        overhead_percent=statistics.median(overheads),
        overhead_iqr=(round(quartiles[0], 2), round(quartiles[2], 2)),
        pair_overheads=[round(value, 2) for value in overheads],
        method=f"simultaneous processes, {windows} windows of {seconds:g} s",
    )


STAND_IN_SECONDS = 0.05


def serve_stand_in(port: int, model: str, completion_tokens: int) -> None:
    """A fixed-latency chat-completions server (runs in its own process)."""
    import http.server

    body = json.dumps(
        {
            "id": "stand-in",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "word " * completion_tokens},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 20, "completion_tokens": completion_tokens},
        }
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(STAND_IN_SECONDS)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        request_queue_size = 128  # 16 clients connect at once
        daemon_threads = True

    Server(("127.0.0.1", port), Handler).serve_forever()


@contextmanager
def stand_in_url(model: str, completion_tokens: int) -> Iterator[str]:
    port = free_port("127.0.0.1")
    process = multiprocessing.get_context("spawn").Process(
        target=serve_stand_in, args=(port, model, completion_tokens), daemon=True
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.post(f"{url}/v1/chat/completions", json={}, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.join(10)


def image_encode_ms(image: Image.Image, settings: Settings, repeats: int = 10) -> float:
    started = time.perf_counter()
    for _ in range(repeats):
        image_to_data_url(image, settings.vllm_image_min_pixels, settings.vllm_image_max_pixels)
    return 1000 * (time.perf_counter() - started) / repeats


def workloads(shared_data: Path) -> dict[str, list[Message]]:
    questions = json.loads((shared_data / "vqa_rad" / "testset.json").read_text())
    question = next(q["question"] for q in questions if q["image_name"] == IMAGE)
    image = Image.open(shared_data / "vqa_rad" / "images" / IMAGE)
    image.load()
    return {
        "text": [Message(role="user", text=question)],
        "image": [Message(role="user", text=question, images=[image])],
    }


def served_model(url: str) -> str:
    """The (first) model a running server serves."""
    response = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


@contextmanager
def server_url(args: argparse.Namespace, settings: Settings) -> Iterator[str]:
    if args.vllm_url:
        yield args.vllm_url.rstrip("/").removesuffix("/v1")
        return
    cores = sorted(os.sched_getaffinity(0))
    pin = args.pin and len(cores) >= 2
    if pin:
        # vLLM's CPU engine spins OpenMP threads on every core it is given; a client sharing
        # a core with them stalls their barriers and moves round times by tens of percent.
        # Engine on all cores but the last, the clients on the last.
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cores[0]}-{cores[-2]}"
    with ManagedServer(settings, port=free_port("127.0.0.1")) as server:
        if pin:
            os.sched_setaffinity(0, {cores[-1]})
        try:
            yield server.url
        finally:
            os.sched_setaffinity(0, cores)


@contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[str]:
    if args.vlm:
        yield args.vlm
        return
    from suwen.devtools.tiny_qwen import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="suwen-client-bench-") as tmp:
        write_tiny_model(Path(tmp) / "tiny-model")
        yield str(Path(tmp) / "tiny-model")


HEADER = (
    f"{'server':<9} {'workload':<8} {'conc':>4} {'n':>4} {'suwen req/s':>12} "
    f"{'openai req/s':>13} {'suwen tok/s':>12} {'openai tok/s':>13} "
    f"{'overhead % (median)':>20} {'IQR':>16}"
)


def print_row(level: Level) -> None:
    low, high = level.overhead_iqr
    print(
        f"{level.server:<9} {level.workload:<8} {level.concurrency:>4} "
        f"{level.requests_per_client:>4} {level.suwen_rps:>12.2f} {level.bare_rps:>13.2f} "
        f"{level.suwen_tps:>12.1f} {level.bare_tps:>13.1f} {level.overhead_percent:>20.2f} "
        f"{f'[{low:.1f}, {high:.1f}]':>16}",
        flush=True,
    )


def print_table(levels: list[Level]) -> None:
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for level in levels:
        print_row(level)


def run_levels(server: str, url: str, settings: Settings, args: argparse.Namespace) -> list[Level]:
    levels = []
    for name, messages in workloads(args.shared_data).items():
        for concurrency in LEVELS:
            if server == "vLLM" and args.vllm_method == "simultaneous":
                levels.append(
                    measure_simultaneous(
                        url,
                        settings,
                        args.shared_data,
                        name,
                        concurrency,
                        args.windows,
                        args.window_seconds,
                        args.max_tokens,
                    )
                )
                print_row(levels[-1])
                continue
            levels.append(
                asyncio.run(
                    measure(
                        server,
                        url,
                        settings,
                        name,
                        messages,
                        concurrency,
                        args.pairs,
                        args.max_tokens,
                    )
                )
            )
            print_row(levels[-1])
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-url", help="A running vLLM server (default: start one).")
    parser.add_argument("--vlm", help="Model to serve (default: the tiny checkpoint).")
    parser.add_argument("--shared-data", type=Path, default=shared_data_default())
    parser.add_argument("--pairs", type=int, default=12, help="Pairs of rounds per level.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--servers", nargs="+", choices=["vllm", "stand-in"], default=["vllm", "stand-in"]
    )
    parser.add_argument(
        "--vllm-method",
        choices=["simultaneous", "alternating"],
        default="simultaneous",
        help="Against vLLM: both clients at once in two processes, or alternating rounds.",
    )
    parser.add_argument("--windows", type=int, default=8, help="Windows per level.")
    parser.add_argument("--window-seconds", type=float, default=8.0)
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="Let the managed vLLM engine and the clients share every core (noisier).",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "client_overhead.json")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="suwen-client-bench-home-") as home,
        model_dir(args) as vlm,
    ):
        settings = Settings(
            home=Path(home),
            vlm=vlm,
            vllm_cpu_kvcache_gib=1,
            # The tiny model's compile costs minutes and is not what is measured here.
            vllm_extra_args=["--enforce-eager"],
        )
        levels: list[Level] = []
        if "vllm" in args.servers:
            with server_url(args, settings) as url:
                if args.vllm_url:
                    settings.vlm = served_model(url)
                levels += run_levels("vLLM", url, settings, args)
        if "stand-in" in args.servers:
            with stand_in_url(settings.vlm, args.max_tokens) as url:
                levels += run_levels("stand-in", url, settings, args)
    print_table(levels)
    encode_ms = image_encode_ms(workloads(args.shared_data)["image"][0].images[0], settings)
    print(f"one-off resize + PNG encoding of the radiograph: {encode_ms:.1f} ms")
    result = {
        "benchmark": "client_overhead",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "servers": {
            "vLLM": args.vllm_url or "managed vLLM on the tiny Qwen2.5-VL checkpoint (CPU)",
            "stand-in": f"fixed {STAND_IN_SECONDS * 1000:.0f} ms reply, in another process",
        },
        "pinned": bool(args.pin and not args.vllm_url and len(os.sched_getaffinity(0)) >= 2),
        "max_tokens": args.max_tokens,
        "pairs_of_rounds": args.pairs,
        "target_overhead_percent": 5.0,
        "image_encode_ms": round(encode_ms, 2),
        "levels": [asdict(level) for level in levels],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
