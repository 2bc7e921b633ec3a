"""Load generator for any OpenAI-compatible server (zomni, vLLM, SGLang, ...).

    zomni serve --model /tmp/small --port 8000 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 \
        --num-prompts 64 --concurrency 16 --input-len 128 --output-len 128

Sends `--num-prompts` streaming `/v1/completions` requests, at most `--concurrency` at a time.
Prompts are random token ids (fixed seed) and `ignore_eos` is set, so every request reads
exactly `--input-len` tokens and writes exactly `--output-len`. Output tokens are counted from
the server's `usage` (stream_options.include_usage), not from the text.

Reports request throughput, output tokens/s, TTFT (request sent → first streamed token) and
inter-token latency (gap between streamed chunks) p50 / p99, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field

import aiohttp


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    latency: float = 0.0


async def one_request(session: aiohttp.ClientSession, url: str, body: dict,
                      headers: dict[str, str]) -> Result:
    result = Result()
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:  # one SSE line at a time
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
        result.latency = time.perf_counter() - start
        result.ok = True
    except aiohttp.ClientError as e:
        result.error = repr(e)
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def resolve_model(session: aiohttp.ClientSession, base_url: str,
                        headers: dict[str, str]) -> str:
    async with session.get(f"{base_url}/v1/models", headers=headers) as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(args.min_token_id, args.max_token_id)
                for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.timeout)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await resolve_model(session, args.base_url, headers)
        url = f"{args.base_url}/v1/completions"

        def body(prompt: list[int]) -> dict:
            return {"model": model, "prompt": prompt, "max_tokens": args.output_len,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}

        for prompt in prompts[:args.warmup]:  # the first steps may compile or allocate
            await one_request(session, url, body(prompt), headers)
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(prompt: list[int]) -> Result:
            async with gate:
                return await one_request(session, url, body(prompt), headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - start
    return summarize(results, duration, model, args)


def summarize(results: list[Result], duration: float, model: str,
              args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "model": model, "num_prompts": len(results), "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "concurrency": args.concurrency, "input_len": args.input_len,
        "output_len": args.output_len, "duration_s": round(duration, 3),
        "request_throughput_per_s": round(len(ok) / duration, 3),
        "output_tokens_per_s": round(out_tokens / duration, 1),
        "total_output_tokens": out_tokens,
        "ttft_ms": {"mean": _ms(statistics.fmean(ttfts) if ttfts else float("nan")),
                    "p50": _ms(percentile(ttfts, 50)), "p99": _ms(percentile(ttfts, 99))},
        "itl_ms": {"mean": _ms(statistics.fmean(itls) if itls else float("nan")),
                   "p50": _ms(percentile(itls, 50)), "p99": _ms(percentile(itls, 99))},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "processor": platform.processor()},
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="model name (default: the server's first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--min-token-id", type=int, default=10)
    parser.add_argument("--max-token-id", type=int, default=300,
                        help="prompt token ids are drawn from [min, max)")
    parser.add_argument("--warmup", type=int, default=1, help="requests sent before timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for a chunk")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
        return
    print(f"model {report['model']}: {report['completed']}/{report['num_prompts']} requests "
          f"ok, concurrency {args.concurrency}, {args.input_len} in / {args.output_len} out")
    for error in report["errors"]:
        print("  error:", error)
    print(f"duration            {report['duration_s']:.2f} s")
    print(f"request throughput  {report['request_throughput_per_s']:.2f} req/s")
    print(f"output throughput   {report['output_tokens_per_s']:.1f} tok/s")
    for key, name in (("ttft_ms", "TTFT"), ("itl_ms", "inter-token latency")):
        m = report[key]
        print(f"{name:<19} mean {m['mean']:.1f} ms, p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms")
    print("machine:", json.dumps(report["machine"]))


if __name__ == "__main__":
    main()
