"""Image generation: zomni against diffusers' own pipeline on the same weights, one sitting.

    python scripts/bench_images.py                       # the bench model, built on first use
    python scripts/bench_images.py --model DIR --size 512 --steps 28 --requests 16

The bench model (`zomni.testing_images`, shape "bench") is SD3-shaped and small: an MMDiT of 8
blocks, 8 heads x 64 (width 512), patch 2; 256x256 images (32x32 latents, 256 image tokens)
with 333 text tokens (CLIP 77 + T5 256); random weights. Both sides run in fp32 on the same
threads (`--threads`, default all cores), with classifier-free guidance.

It prints:
- one image's latency (median of `--repeats`, after a warm-up), zomni / diffusers;
- `--requests` requests arriving over time (Poisson, fixed seed; the mean gap between arrivals
  is `--load` x diffusers' single-image latency, so at the default 0.5 diffusers alone gets
  twice the work it can do): throughput, p50 / p99 latency from arrival to image, and the time
  from arrival to the first denoising step, for zomni (continuous batching across steps) and
  for diffusers called one request after another (a FIFO queue);
- with `--profile DIR`, where a zomni step's time goes (the worker's op table).
zomni runs as it serves: an engine process with its worker, requests over ZMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = ["a red circle on a blue background, top left", "a green square on a white background",
           "a yellow triangle on a black background, bottom right",
           "a blue star on an orange background, centre"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def arrival_offsets(n: int, mean_gap: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(1.0 / mean_gap)
    return out


# ---- diffusers ------------------------------------------------------------------------------


class Diffusers:
    """diffusers' pipeline; records when each call's first denoiser forward starts."""

    def __init__(self, model: str):
        import torch
        from diffusers import DiffusionPipeline

        self.torch = torch
        self.pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.first_forward: float | None = None
        self.pipe.transformer.register_forward_pre_hook(self._on_forward)

    def _on_forward(self, *_args) -> None:
        if self.first_forward is None:
            self.first_forward = time.time()

    def generate(self, prompt: str, seed: int, args: argparse.Namespace) -> float:
        """Run one request; returns the wall-clock time of its first denoising step."""
        self.first_forward = None
        self.pipe(prompt=prompt, height=args.size, width=args.size,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=self.torch.Generator("cpu").manual_seed(seed), output_type="pil")
        return self.first_forward

    def arrivals(self, offsets: list[float], args: argparse.Namespace) -> list[tuple]:
        """FIFO: each request starts when it has arrived and the previous one is done.
        (arrival, first step, finish) per request, wall-clock seconds."""
        start, out = time.time() + 0.5, []
        for i, offset in enumerate(offsets):
            arrival = start + offset
            time.sleep(max(0.0, arrival - time.time()))
            first = self.generate(PROMPTS[i % len(PROMPTS)], 100 + i, args)
            out.append((arrival, first, time.time()))
        return out


# ---- zomni ----------------------------------------------------------------------------------


class Zomni:
    """An engine process with its workers, driven over ZMQ from an asyncio loop in a thread."""

    def __init__(self, model: str, args: argparse.Namespace):
        from zomni.frontend.launch import EngineProcess, make_config

        if args.profile:
            os.environ["ZOMNI_PROFILE_DIR"] = args.profile
        self.config = make_config(model, online_default=True, num_threads=args.threads,
                                  max_num_seqs=args.max_num_seqs, dtype="float32")
        self.engine = EngineProcess(self.config)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.client = self._run(self._connect())
        self.counter = 0

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _connect(self):
        from zomni.proto.client import AsyncEngineClient

        client = AsyncEngineClient(self.engine.address, alive=self.engine.alive)
        await client.connect(client_name="bench_images")
        return client

    async def _one(self, prompt: str, seed: int, args: argparse.Namespace,
                   arrival: float) -> tuple[float, float, float]:
        from zomni.proto import ImageParams, ImageRequest

        self.counter += 1
        params = ImageParams(height=args.size, width=args.size, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, seed=seed)
        request = ImageRequest(f"bench-{self.counter}", prompt=prompt, params=params,
                               arrival_time=arrival)
        async for out, _frames in self.client.generate(request):
            if out.finish_reason is not None:
                return arrival, arrival + out.queue_time_s, time.time()
        raise RuntimeError("the engine ended the request without a result")

    def generate(self, prompt: str, seed: int, args: argparse.Namespace) -> float:
        arrival = time.time()
        return self._run(self._one(prompt, seed, args, arrival))[1]

    def arrivals(self, offsets: list[float], args: argparse.Namespace) -> list[tuple]:
        async def run() -> list[tuple]:
            start = time.time() + 0.5

            async def at(i: int, offset: float):
                await asyncio.sleep(max(0.0, start + offset - time.time()))
                return await self._one(PROMPTS[i % len(PROMPTS)], 100 + i, args, time.time())

            return list(await asyncio.gather(*(at(i, o) for i, o in enumerate(offsets))))

        return self._run(run())

    def step_time(self) -> float:
        return self._run(self.client.get_stats()).step_time_s

    def close(self) -> None:
        self.client.close()
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


# ---- the run --------------------------------------------------------------------------------


def single_latency(system, args: argparse.Namespace) -> float:
    system.generate(PROMPTS[0], 0, args)  # warm-up
    times = []
    for i in range(args.repeats):
        start = time.time()
        system.generate(PROMPTS[i % len(PROMPTS)], 1 + i, args)
        times.append(time.time() - start)
    return statistics.median(times)


def summary(name: str, rows: list[tuple]) -> dict[str, float]:
    latency = [f - a for a, _, f in rows]
    to_first = [s - a for a, s, _ in rows]
    span = max(f for *_, f in rows) - min(a for a, *_ in rows)
    result = {"throughput": len(rows) / span, "p50": percentile(latency, 50),
              "p99": percentile(latency, 99), "first_p50": percentile(to_first, 50),
              "first_max": max(to_first)}
    print(f"  {name:9s} {result['throughput'] * 60:7.2f} images/min   latency p50 "
          f"{result['p50']:6.2f} s  p99 {result['p99']:6.2f} s   arrival->first step p50 "
          f"{result['first_p50']:6.2f} s  max {result['first_max']:6.2f} s")
    return result


def print_profile(directory: str) -> None:
    table = Path(directory, "rank0.txt")
    if table.is_file():
        print(f"\nwhere a zomni step's time goes ({table}, self CPU time, top ops):")
        print("\n".join(table.read_text().splitlines()[:24]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder (default: the bench model)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--load", type=float, default=0.5,
                        help="mean gap between arrivals, in diffusers' single-image latencies")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-num-seqs", type=int, default=4, help="images per zomni batch")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", help="write zomni's step profile to this directory")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    model = args.model or "/tmp/zomni-bench-sd3-bench"
    if not Path(model, "model_index.json").exists():
        from zomni.testing_images import build_sd3_pipeline

        build_sd3_pipeline(model, shape="bench")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}; {args.threads} threads")
    print(f"model {model}: {args.size}x{args.size}, {args.steps} steps, guidance "
          f"{args.guidance}; zomni max_num_seqs {args.max_num_seqs}")

    diffusers = Diffusers(model)
    zomni = Zomni(model, args)
    try:
        d_single, z_single = single_latency(diffusers, args), single_latency(zomni, args)
        print(f"\none image: zomni {z_single:.2f} s, diffusers {d_single:.2f} s "
              f"(ratio {z_single / d_single:.2f}); zomni step time {zomni.step_time():.3f} s")
        offsets = arrival_offsets(args.requests, args.load * d_single, args.seed)
        print(f"\n{args.requests} requests over {offsets[-1]:.1f} s (mean gap "
              f"{args.load * d_single:.2f} s):")
        z = summary("zomni", zomni.arrivals(offsets, args))
        step = zomni.step_time()
        d = summary("diffusers", diffusers.arrivals(offsets, args))
        print(f"  ratios: throughput {z['throughput'] / d['throughput']:.2f}x, latency p50 "
              f"{z['p50'] / d['p50']:.2f}x, p99 {z['p99'] / d['p99']:.2f}x; zomni admission "
              f"p50 {z['first_p50']:.2f} s against a step time of {step:.3f} s")
    finally:
        zomni.close()
    if args.profile:
        print_profile(args.profile)


if __name__ == "__main__":
    main()
