"""Load test of a running server: does every request come back, and does the server's memory?

    .venv/bin/zomni serve --port 8011 &
    .venv/bin/python scripts/load_test.py --url http://127.0.0.1:8011 \
        --requests 1000 --concurrency 64

Sends `--requests` requests, at most `--concurrency` at a time, to any OpenAI-compatible
server; a seeded mix (`--seed`) of streamed and non-streamed, /v1/chat/completions and
/v1/completions, each asking for `--max-tokens` tokens. Each request ends as one of:

    completed  200, and every choice has a finish_reason (a stream: and ends with [DONE])
    error      an HTTP status other than 200, or an error event inside a stream ("stream-N")
    lost       no answer (refused, reset, timed out), a stream that ended without [DONE] or
               without a finish_reason for some choice, or a 200 body that is not a response

Prints the server's RSS before and after the run (the process listening on the URL's port,
found with psutil, or `--pid`; "tree" adds its children: engine core and workers), the wall
time and requests/s, then one JSON line with the same figures. Exit status 1 if a request was
lost or got a 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

try:
    import psutil
except ImportError:  # RSS is then reported as unknown
    psutil = None

PROMPTS = ["def fibonacci(n):\n", "import os\n\n", "class Stack:\n    def push(self, x):\n",
           "Write a function that reverses a list.", "for i in range(10):\n",
           "What does a context manager do?", "# parse a CSV file\n", "async def main():\n"]


@dataclass
class Outcome:
    kind: str  # "completed" | "error" | "lost"
    detail: str = ""  # the status of an error, the reason a request was lost
    latency: float = 0.0
    output_tokens: int = 0


def request_body(rng: random.Random, model: str, max_tokens: int) -> tuple[str, dict]:
    """(path, body) of one request of the mix."""
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    prompt = rng.choice(PROMPTS)
    body = {"model": model, "max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]),
            "seed": rng.randrange(2**31), "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                               "content": prompt}]}
    return "/v1/completions", {**body, "prompt": prompt}


async def read_stream(resp: aiohttp.ClientResponse) -> Outcome:
    """The outcome of a 200 event stream, read to its end."""
    done, tokens, unfinished, finished = False, 0, set(), set()
    async for raw in resp.content:  # one SSE line at a time
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        if line == b"data: [DONE]":
            done = True
            continue
        chunk = json.loads(line[5:])
        if "error" in chunk:
            return Outcome("error", f"stream-{chunk['error'].get('code')}")
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            (finished if choice.get("finish_reason") else unfinished).add(choice["index"])
    if not done:
        return Outcome("lost", "stream without [DONE]")
    if not finished or unfinished - finished:
        return Outcome("lost", "stream without finish_reason")
    return Outcome("completed", output_tokens=tokens)


async def one_request(session: aiohttp.ClientSession, url: str, body: dict) -> Outcome:
    start = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return Outcome("error", str(resp.status))
            if body["stream"]:
                outcome = await read_stream(resp)
            else:
                data = await resp.json(content_type=None)
                choices = data["choices"]
                outcome = Outcome("completed", output_tokens=data["usage"]["completion_tokens"])
                if not choices or not all(c.get("finish_reason") for c in choices):
                    outcome = Outcome("lost", "response without finish_reason")
    except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as e:
        return Outcome("lost", type(e).__name__)
    except (ValueError, KeyError, TypeError) as e:  # a 200 that is not a response
        return Outcome("lost", f"bad body ({type(e).__name__})")
    outcome.latency = time.perf_counter() - start
    return outcome


async def first_model(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


def server_process(url: str, pid: int | None):
    """The process listening on the URL's port (or `pid`), or None if psutil cannot tell."""
    if psutil is None:
        return None
    if pid is not None:
        return psutil.Process(pid)
    port = urlsplit(url).port or 80
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.AccessDenied:
        pass
    return None


def rss_mb(proc) -> tuple[float | None, float | None]:
    """(the process's RSS, with its children's) in MiB; None where unknown."""
    if proc is None:
        return None, None
    try:
        own = proc.memory_info().rss
        tree = own + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return None, None
    return round(own / 2**20, 1), round(tree / 2**20, 1)


async def run(args: argparse.Namespace) -> dict:
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=connector) as session:
        model = args.model or await first_model(session, base)
        rng = random.Random(args.seed)
        bodies = [request_body(rng, model, args.max_tokens) for _ in range(args.requests)]
        proc = server_process(base, args.pid)
        before = rss_mb(proc)
        pending = iter(bodies)
        outcomes: list[Outcome] = []

        async def worker() -> None:
            for path, body in pending:  # shared: each body goes to one worker
                outcomes.append(await one_request(session, base + path, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
        after = rss_mb(proc)
    return summary(args, model, proc, outcomes, wall, before, after)


def summary(args, model, proc, outcomes: list[Outcome], wall: float, before, after) -> dict:
    done = [o for o in outcomes if o.kind == "completed"]
    latencies = sorted(o.latency for o in done)
    return {
        "url": args.url, "model": model, "requests": args.requests,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "completed": len(done),
        "errors": dict(Counter(o.detail for o in outcomes if o.kind == "error")),
        "lost": sum(o.kind == "lost" for o in outcomes),
        "lost_reasons": dict(Counter(o.detail for o in outcomes if o.kind == "lost")),
        "wall_s": round(wall, 2), "requests_per_s": round(len(outcomes) / wall, 1),
        "output_tokens_per_s": round(sum(o.output_tokens for o in done) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3)
        if latencies else None,
        "server_pid": proc.pid if proc is not None else None,
        "rss_mb_before": before[0], "rss_mb_after": after[0],
        "tree_rss_mb_before": before[1], "tree_rss_mb_after": after[1],
    }


def print_summary(s: dict) -> None:
    def mb(x: float | None) -> str:
        return "unknown" if x is None else f"{x:.1f} MiB"

    print(f"{s['requests']} requests at concurrency {s['concurrency']} to {s['url']} "
          f"({s['model']}, max_tokens {s['max_tokens']})")
    reasons = f" {s['lost_reasons']}" if s["lost_reasons"] else ""
    print(f"  completed {s['completed']}, lost {s['lost']}{reasons}, "
          f"errors by status {s['errors'] or 'none'}")
    def sec(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f} s"

    print(f"  wall {s['wall_s']:.2f} s, {s['requests_per_s']:.1f} requests/s, "
          f"{s['output_tokens_per_s']:.1f} output tokens/s, latency p50 "
          f"{sec(s['latency_p50_s'])}, p99 {sec(s['latency_p99_s'])}")
    print(f"  server pid {s['server_pid']}: RSS {mb(s['rss_mb_before'])} -> "
          f"{mb(s['rss_mb_after'])}; with children {mb(s['tree_rss_mb_before'])} -> "
          f"{mb(s['tree_rss_mb_after'])}")
    print(json.dumps(s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", help="default: the first id of GET /v1/models")
    parser.add_argument("--api-key")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pid", type=int, help="the server's pid (default: the process "
                        "listening on the URL's port)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds one request may take in all")
    args = parser.parse_args()
    s = asyncio.run(run(args))
    print_summary(s)
    server_errors = sum(n for status, n in s["errors"].items()
                        if status.removeprefix("stream-").startswith("5"))
    return 1 if s["lost"] or server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
