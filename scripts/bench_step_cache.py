"""Step cache (TeaCache / First-Block-Cache): speed-up and image quality against the uncached
image, several thresholds, one sitting.

    python scripts/bench_step_cache.py                       # the bench model, built on first use
    python scripts/bench_step_cache.py --cache fbcache:0.05 --cache teacache:0.4:3 --images 4

Each `--cache` is TYPE:THRESHOLD[:MAX_CONSECUTIVE_SKIPS]. For every seed the uncached image
and each cached one are generated back to back by the same engine (an engine process with its
worker, requests over ZMQ, one at a time), so machine noise hits them alike; `--repeats`
rounds of all settings, each image's time the median of its rounds. Printed per cache
setting, over the seeds:

- computed steps per image: steps that ran the whole denoiser, per CFG branch (cond / uncond);
- latency (end to end: prompt encoding, denoising, VAE decode) and its speed-up over
  uncached; the speed-up of the denoising part alone (from the first step to the image);
- PSNR and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, per RGB channel) of the
  cached image against the uncached one of the same seed;
- then the cache's own cost: one denoiser forward (in this process) uncached and with each
  type at threshold 0, nothing skipped.

The bench model (`zomni.testing_images`, shape "bench": an SD3 MMDiT of 8 blocks, width 512,
256x256 images) has RANDOM WEIGHTS: how much its blocks' outputs change between steps is not
a trained model's, so the thresholds, skip counts and quality figures here say little about
a real model; they check the mechanism and its cost. `--model zomni/demo_image_model --size 64`
measures the trained demo image model.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from zomni.proto import StepCacheParams

# in the demo image model's caption form (zomni-demo-image draws them; random weights don't care)
PROMPTS = ["a large red circle on a blue background, top left",
           "a small green square on a white background, bottom left",
           "a large yellow triangle on a black background, bottom right",
           "a small blue cross on a orange background, in the center"]


def parse_cache(spec: str) -> dict:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--cache {spec!r}: TYPE:THRESHOLD[:MAX_SKIPS]")
    cache = {"type": parts[0], "threshold": float(parts[1])}
    if len(parts) == 3:
        cache["max_consecutive_skips"] = int(parts[2])
    return cache


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two uint8 images [H, W, 3] (per channel, then averaged), valid window
    positions only, L = 255, K1 = 0.01, K2 = 0.03."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(a).double().permute(2, 0, 1)[:, None]  # [3, 1, H, W]
    y = torch.from_numpy(b).double().permute(2, 0, 1)[:, None]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return F.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


class Engine:
    """One engine process and a client; `generate` runs one request alone."""

    def __init__(self, model: str, args: argparse.Namespace):
        from zomni.frontend.launch import EngineProcess, make_config
        from zomni.proto.client import EngineClient

        config = make_config(model, online_default=True, num_threads=args.threads,
                             max_num_seqs=4, dtype="float32")
        self.process = EngineProcess(config)
        self.client = EngineClient(self.process.address, alive=self.process.alive)
        self.client.connect(timeout=600, client_name="bench_step_cache")
        self.counter = 0

    def generate(self, prompt: str, seed: int, cache: dict | None, args: argparse.Namespace):
        """(uint8 image [H, W, 3], latency s, from-first-step s, computed steps per branch)."""
        from zomni.proto import ImageParams, ImageRequest, MsgType
        from zomni.proto.arrays import read_array

        self.counter += 1
        params = ImageParams(height=args.size, width=args.size, num_inference_steps=args.steps,
                             guidance_scale=args.guidance, seed=seed, cache=cache)
        start = time.time()
        self.client.add_request(ImageRequest(f"bench-{self.counter}", prompt=prompt,
                                             params=params, arrival_time=start))
        while True:
            got = self.client.recv(timeout_ms=1000)
            if got is None or got[0] != MsgType.OUTPUTS:
                continue
            _, msg, frames = got
            for out in msg.outputs:
                if out.finish_reason is not None:
                    if out.pixels is None:
                        raise RuntimeError(f"request failed: {out.error}")
                    latency = time.time() - start
                    image = read_array(out.pixels, frames)[0].copy()
                    return image, latency, latency - out.queue_time_s, out.num_computed_steps

    def close(self) -> None:
        self.client.close()
        self.process.shutdown()


def forward_overhead(model: str, args: argparse.Namespace, rounds: int = 8) -> None:
    """The step cache's own cost: one denoiser forward over a CFG pair at the default size,
    uncached and with each cache type at threshold 0 (every row computes, the metrics and
    residuals are still taken), in alternating rounds; median ms."""
    import torch

    from zomni.workers.denoiser_loader import load_denoiser
    from zomni.workers.step_cache import BranchCache, CacheGroup, StepCache

    torch.set_num_threads(args.threads)
    denoiser = load_denoiser(Path(model, "transformer"), torch.float32, "cpu")
    for module in denoiser.modules():
        if hasattr(module, "pack"):
            module.pack(batch_hint=1024)
    cfg, gen = denoiser.config, torch.Generator().manual_seed(0)
    side = args.size // 8  # the bench VAE's scale factor
    inputs = (torch.randn(2, cfg.in_channels, side, side, generator=gen),
              torch.tensor([500.0, 500.0]),
              torch.randn(2, 333, cfg.joint_attention_dim, generator=gen),
              torch.randn(2, cfg.pooled_projection_dim, generator=gen))

    def plan(kind: str) -> StepCache:  # one request's two branches, at a middle step
        params = StepCacheParams(type=kind, threshold=0.0)
        branches = [BranchCache.create(params, 10**6, denoiser.teacache_rescale)
                    for _ in range(2)]
        return StepCache([CacheGroup(0, 1, branches[0]), CacheGroup(1, 2, branches[1])])

    plans = {None: None, "fbcache": plan("fbcache"), "teacache": plan("teacache")}
    times: dict = {k: [] for k in plans}
    with torch.inference_mode():
        for kind in list(plans) * (rounds + 1):  # the first round warms up
            start = time.perf_counter()
            denoiser(*inputs, cache=plans[kind])
            times[kind].append(time.perf_counter() - start)
    shown = ", ".join(f"{k or 'uncached'} {statistics.median(v[1:]) * 1e3:.1f} ms"
                      for k, v in times.items())
    print(f"\nstep cache overhead, one forward of a CFG pair, nothing skipped (median of "
          f"{rounds}): {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline folder (default: the bench model)")
    parser.add_argument("--cache", type=parse_cache, action="append",
                        help="TYPE:THRESHOLD[:MAX_SKIPS], repeatable (default: a sweep)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=7.0)
    parser.add_argument("--images", type=int, default=2, help="seeds (prompts) per setting")
    parser.add_argument("--repeats", type=int, default=2, help="timings per image (median)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    caches = args.cache or [parse_cache(s) for s in (
        "fbcache:0.05", "fbcache:0.2", "fbcache:0.4", "fbcache:0.6", "fbcache:0.8",
        "teacache:0.2", "teacache:0.4", "teacache:0.8", "teacache:1.2")]

    import torch

    model = args.model or "/tmp/zomni-bench-sd3-bench"
    if not Path(model, "model_index.json").exists():
        from zomni.testing_images import build_sd3_pipeline

        build_sd3_pipeline(model, shape="bench")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, python {sys.version.split()[0]}; {args.threads} threads")
    weights = "random weights" if args.model is None else "weights of the folder"
    print(f"model {model} ({weights}): {args.size}x{args.size}, {args.steps} steps, "
          f"guidance {args.guidance}; {args.images} seeds x {args.repeats} timings")

    engine = Engine(model, args)
    settings = [None] + caches
    rows: dict[int, list] = {i: [] for i in range(len(settings))}
    try:
        engine.generate(PROMPTS[0], 0, None, args)  # warm-up
        for k in range(args.images):
            prompt, seed = PROMPTS[k % len(PROMPTS)], 100 + k
            runs: dict[int, list] = {i: [] for i in range(len(settings))}
            for r in range(args.repeats):  # rounds of every setting, back to back, each
                for j in range(len(settings)):  # round in another order (drift hits all)
                    i = (j + r) % len(settings)
                    runs[i].append(engine.generate(prompt, seed, settings[i], args))
            for i, got in runs.items():
                rows[i].append((got[0][0], statistics.median(r[1] for r in got),
                                statistics.median(r[2] for r in got), got[0][3]))
    finally:
        engine.close()

    base = rows[0]
    print(f"\n{'cache':22s} {'computed steps (cond/uncond) per image':40s} {'latency':>8s} "
          f"{'speed-up':>8s} {'denoise':>8s} {'PSNR dB':>8s} {'SSIM':>6s}")
    for i, cache in enumerate(settings):
        name = "none" if cache is None else ":".join(str(v) for v in cache.values())
        computed = " ".join("/".join(map(str, r[3])) for r in rows[i])
        latency = statistics.mean(r[1] for r in rows[i])
        speedup = statistics.mean(b[1] / r[1] for b, r in zip(base, rows[i]))
        denoise = statistics.mean(b[2] / r[2] for b, r in zip(base, rows[i]))
        quality = [(psnr(r[0], b[0]), ssim(r[0], b[0])) for b, r in zip(base, rows[i])]
        mean_psnr = statistics.mean(min(q[0], 99.0) for q in quality)
        mean_ssim = statistics.mean(q[1] for q in quality)
        print(f"{name:22s} {computed:40s} {latency:7.2f}s {speedup:7.2f}x {denoise:7.2f}x "
              f"{mean_psnr:8.1f} {mean_ssim:6.3f}")
    print("(PSNR 99 = identical; speed-up and denoise: uncached / cached time, mean over seeds)")
    forward_overhead(model, args)


if __name__ == "__main__":
    main()
