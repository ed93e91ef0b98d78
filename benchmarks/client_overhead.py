"""What Suwen's VLLMClient costs over a bare ``openai`` client, against the same vLLM server.

For concurrency 1, 4 and 16, sends the same chat request (a VQA-RAD question, text only or
with its radiograph) through ``VLLMClient.chat`` and through ``openai.AsyncOpenAI``
``chat.completions.create`` with the same concurrency cap, in alternating rounds so both see
the same server load (other work on the machine drifts; alternation pairs each Suwen round
with the bare round next to it). Reports requests/s and completion tokens/s per client and
the client's overhead = 1 - (Suwen requests/s / bare requests/s), the median over rounds.
The target is overhead within 5%.

In the image workload the bare client sends a data URL encoded once, up front, while
VLLMClient resizes and encodes the PIL image on every call (as the agent does): its overhead
includes that work.

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

from suwen.config import Settings
from suwen.llm.base import Message
from suwen.llm.client import VLLMClient, to_openai_messages
from suwen.llm.server import ManagedServer, free_port

HERE = Path(__file__).resolve().parent
SHARED_DATA = HERE.parent.parent / "shared" / "data"
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

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds


@dataclass
class Level:
    workload: str
    concurrency: int
    suwen_rps: float
    bare_rps: float
    suwen_tps: float
    bare_tps: float
    overhead_percent: float  # median over paired rounds
    round_overheads: list[float]


async def timed_round(name: str, request: Request, count: int, concurrency: int) -> Round:
    """``count`` requests, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with gate:
            return await request()

    started = time.perf_counter()
    tokens = await asyncio.gather(*(one() for _ in range(count)))
    return Round(name, count, time.perf_counter() - started, sum(tokens))


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
    url: str,
    settings: Settings,
    workload: str,
    messages: list[Message],
    concurrency: int,
    rounds: int,
    max_tokens: int,
) -> Level:
    settings = settings.model_copy(update={"concurrency": concurrency})
    suwen, bare, through_suwen, through_openai = requests_for(url, settings, messages, max_tokens)
    count = max(8, 4 * concurrency)
    # Warm up both paths (connections, prefix cache) before timing.
    await timed_round("warm-up", through_suwen, concurrency, concurrency)
    await timed_round("warm-up", through_openai, concurrency, concurrency)
    pairs: list[tuple[Round, Round]] = []
    for index in range(rounds):
        # Alternate which client goes first, so neither always meets a warmer server.
        if index % 2 == 0:
            s = await timed_round("suwen", through_suwen, count, concurrency)
            b = await timed_round("openai", through_openai, count, concurrency)
        else:
            b = await timed_round("openai", through_openai, count, concurrency)
            s = await timed_round("suwen", through_suwen, count, concurrency)
        pairs.append((s, b))
    await suwen.aclose()
    await bare.close()
    overheads = [100 * (1 - s.requests_per_second / b.requests_per_second) for s, b in pairs]
    return Level(
        workload=workload,
        concurrency=concurrency,
        suwen_rps=sum(s.requests for s, _ in pairs) / sum(s.seconds for s, _ in pairs),
        bare_rps=sum(b.requests for _, b in pairs) / sum(b.seconds for _, b in pairs),
        suwen_tps=sum(s.completion_tokens for s, _ in pairs) / sum(s.seconds for s, _ in pairs),
        bare_tps=sum(b.completion_tokens for _, b in pairs) / sum(b.seconds for _, b in pairs),
        overhead_percent=statistics.median(overheads),
        round_overheads=[round(value, 2) for value in overheads],
    )


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
    with ManagedServer(settings, port=free_port("127.0.0.1")) as server:
        yield server.url


@contextmanager
def model_dir(args: argparse.Namespace) -> Iterator[str]:
    if args.vlm:
        yield args.vlm
        return
    from suwen.devtools.tiny_qwen import write_tiny_model

    with tempfile.TemporaryDirectory(prefix="suwen-client-bench-") as tmp:
        write_tiny_model(Path(tmp) / "tiny-model")
        yield str(Path(tmp) / "tiny-model")


def print_table(levels: list[Level]) -> None:
    header = (
        f"{'workload':<8} {'conc':>4} {'suwen req/s':>12} {'openai req/s':>13} "
        f"{'suwen tok/s':>12} {'openai tok/s':>13} {'overhead %':>11}  rounds"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        print(
            f"{level.workload:<8} {level.concurrency:>4} {level.suwen_rps:>12.2f} "
            f"{level.bare_rps:>13.2f} {level.suwen_tps:>12.1f} {level.bare_tps:>13.1f} "
            f"{level.overhead_percent:>11.2f}  {level.round_overheads}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-url", help="A running vLLM server (default: start one).")
    parser.add_argument("--vlm", help="Model to serve (default: the tiny checkpoint).")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    parser.add_argument("--rounds", type=int, default=5, help="Paired rounds per level.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "client_overhead.json")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="suwen-client-bench-home-") as home,
        model_dir(args) as vlm,
    ):
        settings = Settings(home=Path(home), vlm=vlm, vllm_cpu_kvcache_gib=1)
        with server_url(args, settings) as url:
            if args.vllm_url:
                settings.vlm = served_model(url)
            levels = [
                asyncio.run(
                    measure(url, settings, name, messages, level, args.rounds, args.max_tokens)
                )
                for name, messages in workloads(args.shared_data).items()
                for level in LEVELS
            ]
    print_table(levels)
    result = {
        "benchmark": "client_overhead",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "server": args.vllm_url or "managed vLLM on the tiny Qwen2.5-VL checkpoint (CPU)",
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "target_overhead_percent": 5.0,
        "levels": [asdict(level) for level in levels],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
