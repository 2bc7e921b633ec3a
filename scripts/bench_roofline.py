"""Matmul roofline of this machine, and the fraction of it a throughput run reached.

    python scripts/bench_roofline.py                       # peaks only
    python scripts/bench_roofline.py --tok-s 650 --dtype float32   # + fraction of a run's figure
    python scripts/bench_roofline.py --run                 # runs bench_throughput (zomni only)

Peaks: GFLOP/s of `x @ w.T` (a Linear) at the workload's prefill shape (2048 x 512 x 1536) and
decode shape (64 x 512 x 1536), fp32 and bf16, through torch's default path (MKL for fp32),
oneDNN with a prepacked weight, zomni's own fp32 kernel on weight panels (what its CPU linears
use on AVX-512; workers/csrc/gemm.c) and numpy (no bf16), with the thread counts given; and
the memory bandwidth (a large copy).

The floor of a workload: prefill is its matmul FLOPs (2 * params_of_linears per token, plus the
LM head on sampled rows only) at the best prefill peak; each decode step takes at least the
longer of its FLOPs at the best decode peak and its bytes (all weights, plus the batch's whole
KV) at the measured bandwidth. "fraction" = floor time / measured time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

PREFILL_SHAPE = (2048, 512, 1536)
DECODE_SHAPE = (64, 512, 1536)


def _gflops(run, m: int, k: int, n: int, seconds: float) -> float:
    for _ in range(3):
        run()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - start) / 1e9


def torch_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    return _gflops(lambda: torch.matmul(x, w.t(), out=out), m, k, n, seconds)


def onednn_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
    return _gflops(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
                   m, k, n, seconds)


def zomni_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """zomni's native kernel; NaN where it does not run (not fp32, no AVX-512)."""
    from zomni.workers import native

    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    if not native.has_gemm(w):
        return float("nan")
    panels = native.pack_panels(w)
    return _gflops(lambda: native.gemm(x, panels, n), m, k, n, seconds)


def bandwidth_gbs(seconds: float = 0.5) -> float:
    """GB/s moved (read + write) by copying 256 MiB, far past any cache."""
    src = torch.ones(2**26)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        reps += 1
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


def numpy_gflops(m: int, k: int, n: int, seconds: float = 0.5) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    return _gflops(lambda: x @ w.T, m, k, n, seconds)


def workload_gflop(cfg: dict, n: int, input_len: int, output_len: int) -> tuple[float, float]:
    """(prefill, decode) matmul GFLOP of n prompts: linears per token, LM head per sample."""
    linear, head = _linear_params(cfg)
    prefill = n * (input_len * 2 * linear + 2 * head)
    decode = n * (output_len - 1) * 2 * (linear + head)
    return prefill / 1e9, decode / 1e9


def _linear_params(cfg: dict) -> tuple[int, int]:
    """(parameters of all decoder linears, of the LM head)."""
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv) * d + heads * d * h + 3 * h * inter
    return layers * per_layer, h * cfg["vocab_size"]


def decode_step_gb(cfg: dict, n: int, context: int, element_size: int) -> float:
    """GB one decode step of n requests at `context` tokens must read: weights and the KV."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    weights = sum(_linear_params(cfg)) * element_size
    cache = n * context * cfg["num_hidden_layers"] * 2 * kv * d * element_size
    return (weights + cache) / 1e9


def measure_peaks(threads: list[int]) -> dict[tuple[str, str, str, int], float]:
    peaks = {}
    for t in threads:
        torch.set_num_threads(t)
        for name, shape in (("prefill", PREFILL_SHAPE), ("decode", DECODE_SHAPE)):
            for dtype in (torch.float32, torch.bfloat16):
                for lib, measure in (("torch", torch_gflops), ("onednn", onednn_gflops),
                                     ("zomni", zomni_gflops)):
                    key = (lib, str(dtype).removeprefix("torch."), name, t)
                    peaks[key] = measure(*shape, dtype)
                    print(f"  {lib:6s} {key[1]:8s} {name:7s} {shape} threads={t}: "
                          f"{peaks[key]:7.1f} GFLOP/s", flush=True)
        peaks[("bandwidth", "", "", t)] = bandwidth_gbs()
        print(f"  memory bandwidth, threads={t}: {peaks[('bandwidth', '', '', t)]:.1f} GB/s")
    key = ("numpy", "float32", "decode", 0)
    peaks[key] = numpy_gflops(*DECODE_SHAPE)
    print(f"  numpy float32  decode  {DECODE_SHAPE} (its BLAS threads): {peaks[key]:7.1f} GFLOP/s")
    key = ("numpy", "float32", "prefill", 0)
    peaks[key] = numpy_gflops(*PREFILL_SHAPE)
    print(f"  numpy float32  prefill {PREFILL_SHAPE} (its BLAS threads): {peaks[key]:7.1f} GFLOP/s")
    return peaks


def run_throughput(args) -> float:
    cmd = [sys.executable, str(Path(__file__).with_name("bench_throughput.py")), "--no-hf",
           "--shape", args.shape, "--dtype", args.dtype, "-n", str(args.num_prompts),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out, end="")
    line = next(x for x in out.splitlines() if x.startswith("zomni TP=1"))
    return float(line.split(":")[1].split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("-n", "--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="dtype of the run to rate")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    ap.add_argument("--tok-s", type=float, help="output tok/s of a run of the workload")
    ap.add_argument("--run", action="store_true", help="run bench_throughput --no-hf first")
    args = ap.parse_args()

    from zomni.testing import build_model

    model = Path(f"/tmp/zomni-bench-{args.arch}-{args.shape}")
    if not (model / "model.safetensors").exists():
        build_model(str(model), args.arch, shape=args.shape, seed=0)
    cfg = json.loads((model / "config.json").read_text())
    tok_s = run_throughput(args) if args.run else args.tok_s

    print("matmul peaks:")
    threads = [int(t) for t in args.threads.split(",")]
    peaks = measure_peaks(threads)
    pre, dec = workload_gflop(cfg, args.num_prompts, args.input_len, args.output_len)
    n_out = args.num_prompts * args.output_len
    print(f"workload: {pre:.0f} GFLOP prefill + {dec:.0f} GFLOP decode = {pre + dec:.0f} GFLOP "
          f"({pre * 1e9 / (args.num_prompts * args.input_len) / 1e6:.0f} MFLOP/prompt token, "
          f"{dec * 1e9 / (n_out - args.num_prompts) / 1e6:.0f} MFLOP/output token)")
    size = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    per_step = dec / (args.output_len - 1)

    def best(phase: str, t: int) -> float:
        return max(v for (_, dt, ph, th), v in peaks.items()
                   if (dt, ph, th) == (args.dtype, phase, t) and v == v)  # v == v: not NaN

    for t in threads:
        floor = pre / best("prefill", t) + sum(
            max(per_step / best("decode", t),
                decode_step_gb(cfg, args.num_prompts, args.input_len + i, size)
                / peaks[("bandwidth", "", "", t)])
            for i in range(1, args.output_len))
        line = f"floor at {t} thread(s), {args.dtype}: {floor:6.2f} s = {n_out / floor:7.1f} tok/s"
        if tok_s:
            line += f"; the run ({tok_s:.1f} tok/s) reached {tok_s * floor / n_out:.0%} of it"
        print(line)


if __name__ == "__main__":
    main()
