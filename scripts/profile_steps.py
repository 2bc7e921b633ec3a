"""Where a step's time goes: a worker's ModelRunner in this process, driven by the engine's own
scheduler on a throughput workload, with each family of native kernels timed around its call.

    python scripts/profile_steps.py                                     # W: 64 x 128 / 128
    python scripts/profile_steps.py -n 16 --max-num-batched-tokens 192  # W's online batch
    python scripts/profile_steps.py --shape qwen3-0.6b --arch qwen3 -n 16

Prints, for decode-only steps and for steps with prompt tokens, the mean step time and its
parts: the decoder layers when they run as one native call each (workers/models/native_layers.py;
ZOMNI_NATIVE_LAYERS=0 times their kernels instead), GEMM (every linear, or only the LM head),
attention, layer ops (RMSNorm; q/k norm + RoPE + KV write), the sampler, and the rest (Python,
step metadata, torch ops). Steps run one after
the other, as with --no-async-scheduling, in the workers' environment (their malloc and
OpenMP settings, workers/device.worker_env). The model is built as bench_throughput.py builds it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import random
import sys
import time
from pathlib import Path

from zomni.workers.device import worker_env

PARTS = {"decoder_layer": "layers", "gemm": "gemm", "paged_attention": "attention",
         "rms_norm": "layer ops", "qkv_rope_cache": "layer ops"}


def timed(fn, part: str, spent: dict[str, float]):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start
    return wrapper


def run(args: argparse.Namespace) -> list[tuple[int, int, float, dict[str, float]]]:
    """(tokens, requests, seconds, seconds by part) of every step of the workload."""
    from zomni.core.token_scheduler import TokenScheduler
    from zomni.proto import (
        EngineConfig,
        EngineRequest,
        SamplingParams,
        SchedulerOutput,
        WorkerConfig,
    )
    from zomni.proto.model_info import read_model_info
    from zomni.testing import build_model
    from zomni.workers import native
    from zomni.workers.model_runner import ModelRunner

    model = args.model or f"/tmp/zomni-bench-{args.arch}-{args.shape}"
    if not Path(model, "model.safetensors").exists():
        build_model(model, args.arch, shape=args.shape, seed=args.seed)
    config = EngineConfig(model=model, device="cpu", dtype=args.dtype, async_scheduling=False,
                          block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_gb,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    runner = ModelRunner(WorkerConfig(engine=config, rank=0, engine_address=""))
    info = read_model_info(model)
    scheduler = TokenScheduler(config, info.details, runner.runner_info())
    rng = random.Random(args.seed)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.num_prompts):
        prompt = [rng.randrange(10, 300) for _ in range(args.input_len)]
        scheduler.add_request(EngineRequest(f"r{i}", prompt, sampling), b"")

    runner.execute_model(SchedulerOutput(0, [], [], {}, []))  # waits for the KV cache's pages
    spent: dict[str, float] = collections.defaultdict(float)
    for name, part in PARTS.items():
        setattr(native, name, timed(getattr(native, name), part, spent))
    runner.sampler = timed(runner.sampler, "sampler", spent)
    steps = []
    while scheduler.has_unfinished_requests():
        plan = scheduler.schedule()
        if plan is None:
            continue
        spent.clear()
        start = time.perf_counter()
        output = runner.execute_model(plan)
        seconds = time.perf_counter() - start
        steps.append((plan.total_num_scheduled_tokens, len(plan.num_scheduled_tokens), seconds,
                      dict(spent)))
        scheduler.update_from_output(plan, output)
    return steps


def report(kind: str, steps: list[tuple[int, int, float, dict[str, float]]]) -> None:
    if not steps:
        return
    n = len(steps)
    total = sum(s[2] for s in steps)
    parts = collections.Counter()
    for *_, spent in steps:
        parts.update(spent)
    tokens, requests = sum(s[0] for s in steps) / n, sum(s[1] for s in steps) / n
    print(f"{kind}: {n} steps, {total:.2f} s, {1e3 * total / n:.2f} ms a step "
          f"({tokens:.0f} tokens, {requests:.0f} requests on average)")
    for part in ("layers", "gemm", "attention", "layer ops", "sampler"):
        if part == "layers" and not parts[part]:
            continue
        print(f"  {part:10s} {1e3 * parts[part] / n:8.2f} ms  {parts[part] / total:6.1%}")
    rest = total - sum(parts.values())
    print(f"  {'rest':10s} {1e3 * rest / n:8.2f} ms  {rest / total:6.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: build a random one)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--shape", default="small", help="tiny | small | qwen3-0.6b")
    ap.add_argument("-n", "--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="step budget (default: the offline one)")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.environ.get("_ZOMNI_PROFILE_CHILD") != "1":  # again, in the workers' environment
        env = worker_env() | {"_ZOMNI_PROFILE_CHILD": "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    steps = run(args)
    report("decode-only steps", [s for s in steps if s[0] == s[1]])
    report("steps with prompt tokens", [s for s in steps if s[0] > s[1]])


if __name__ == "__main__":
    main()
