#!/usr/bin/env python3
"""Masked-diffusion LM decoding speed, one sitting: the published loop against zomni's variants
one request at a time, then many requests batched against one after another.

    python scripts/bench_dllm.py                  # the demo dLLM, then the bench shape
    python scripts/bench_dllm.py --only demo --requests 8

Two models, both LLaDA's layout:
- demo: `zomni/demo_dllm_model` (trained here); prompts are the first --demo-prompt-len tokens
  of held-out standard-library files (`demo_model_data.split_corpus`, as its training held
  them out);
- bench: shape "small" of `zomni.testing` (hidden 512, 8 layers, 8 heads / 4 KV heads of 64,
  SwiGLU 1536, vocab 8192; 33M parameters) with RANDOM weights, built to a temporary folder;
  prompts are --bench-prompt-len random token ids. Its confidences are a random model's, so
  threshold decoding finds little to commit in parallel: it measures the caches.

Per model, one request at a time, --gen-length tokens in blocks of --block-length, greedy
(temperature 0), EOS ignored so every answer has the full length:

    reference   LLaDA's published `generate` (tests/dllm_reference.py) on transformers' Llama
                with a full attention mask, one token a step: the baseline
    zomni       the same schedule, served by zomni's engine (`LLM`, engine + worker processes)
    threshold   + Fast-dLLM parallel decoding at --threshold
    prefix      + the prefix KV cache
    dual        + the dual KV cache

tok/s counts generated tokens over wall time; NFE/token is denoising forwards per generated
token (the engine's request-step counter); "equal" is the fraction of generated positions equal
to the reference loop's output (the zomni row must be 1.000: the same algorithm; threshold
decoding and the caches are approximations by design).

Then --requests prompts with the fastest variant: one after another vs all submitted at once
(the engine runs one denoising step of every running request per step), and the AR demo
(`zomni/demo_model`, the same tokenizer's ids) under both loads at the same length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the reference loops live beside the tests using them

from dllm_reference import RefModel, llada_generate  # noqa: E402

from zomni import LLM, DiffusionParams, SamplingParams  # noqa: E402

VARIANTS = {  # row -> DiffusionParams fields beyond block_length (None: the reference loop)
    "reference": None,
    "zomni": {},
    "threshold": {"threshold": "T"},
    "prefix": {"threshold": "T", "cache": "prefix"},
    "dual": {"threshold": "T", "cache": "dual"},
}


def demo_prompts(tokenizer_path: Path, count: int, length: int) -> list[list[int]]:
    from demo_model_data import split_corpus
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    prompts = []
    for _, text in split_corpus(25).val_files:
        ids = tok.encode(text).ids
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} held-out files have {length} tokens")


def bench_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab - 1, (count, length), generator=gen).tolist()


def diffusion(variant: str, args) -> DiffusionParams:
    fields = {k: args.threshold if v == "T" else v for k, v in VARIANTS[variant].items()}
    return DiffusionParams(block_length=args.block_length, **fields)


def run_reference(model_dir: Path, prompts, args) -> tuple[float, list[list[int]]]:
    mask_id = json.loads((model_dir / "config.json").read_text())["mask_token_id"]
    ref = RefModel(model_dir)
    outs, start = [], time.perf_counter()
    for prompt in prompts:
        outs.append(llada_generate(ref, prompt, args.gen_length, args.gen_length,
                                   args.block_length, mask_id))
    return time.perf_counter() - start, outs


def generate(llm: LLM, prompts, params: SamplingParams, together: bool
             ) -> tuple[float, int, list[list[int]]]:
    """(seconds, denoising request-steps, outputs): all prompts in one call, or one a call."""
    steps0 = getattr(llm.get_stats().scheduler, "denoising_steps_total", 0)
    start = time.perf_counter()
    batches = [prompts] if together else [[p] for p in prompts]
    outs = []
    for batch in batches:
        results = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        outs += [r.outputs[0].token_ids for r in results]
    seconds = time.perf_counter() - start
    steps = getattr(llm.get_stats().scheduler, "denoising_steps_total", 0) - steps0
    assert all(len(o) == len(outs[0]) for o in outs), "answers of different lengths"
    return seconds, steps, [list(o) for o in outs]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def engine(model: Path, args) -> LLM:
    return LLM(model=str(model), num_threads=args.threads, dtype="float32",
               max_num_seqs=max(16, args.requests))


def bench_model(name: str, model_dir: Path, prompts: list[list[int]], args) -> None:
    tokens = args.gen_length
    ref_prompts = prompts[:args.ref_prompts]
    print(f"\n## {name}: {model_dir}\n")
    print(f"prompt {len(prompts[0])} tokens, {tokens} generated in blocks of "
          f"{args.block_length}, threshold {args.threshold}, one request at a time over "
          f"{len(ref_prompts)} prompts\n")
    ref_s, ref_out = run_reference(model_dir, ref_prompts, args)
    ref_tps = tokens * len(ref_prompts) / ref_s
    print("| variant | tok/s | NFE/token | speed-up | equal to reference |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| reference (transformers) | {ref_tps:.1f} | 1.000 | 1.00× | 1.000 |")
    best = ("", 0.0)
    with engine(model_dir, args) as llm:
        warm = SamplingParams(max_tokens=args.block_length, temperature=0, ignore_eos=True,
                              diffusion=DiffusionParams(block_length=args.block_length))
        llm.generate({"prompt_token_ids": prompts[0]}, warm, use_tqdm=False)
        for variant in list(VARIANTS)[1:]:
            params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                    diffusion=diffusion(variant, args))
            s, steps, out = generate(llm, ref_prompts, params, together=False)
            tps = tokens * len(ref_prompts) / s
            best = max(best, (variant, tps), key=lambda b: b[1])
            print(f"| {variant} | {tps:.1f} | {steps / (tokens * len(ref_prompts)):.3f} | "
                  f"{tps / ref_tps:.2f}× | {agreement(out, ref_out):.3f} |")
        variant = best[0]
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                diffusion=diffusion(variant, args))
        load = prompts[:args.requests]
        one_s, _, one_out = generate(llm, load, params, together=False)
        all_s, all_steps, all_out = generate(llm, load, params, together=True)
    n = len(load)
    print(f"\n{n} requests, {variant}: one after another {n * tokens / one_s:.1f} tok/s, "
          f"batched {n * tokens / all_s:.1f} tok/s = **{one_s / all_s:.2f}×** "
          f"(NFE/token {all_steps / (n * tokens):.3f}; outputs equal to the one-at-a-time "
          f"ones: {agreement(all_out, one_out):.3f})")
    if name == "demo":
        with engine(args.ar_model, args) as ar:
            greedy = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
            ar.generate({"prompt_token_ids": prompts[0]}, greedy, use_tqdm=False)
            ar_one, _, _ = generate(ar, load, greedy, together=False)
            ar_all, _, _ = generate(ar, load, greedy, together=True)
        print(f"AR demo ({args.ar_model.name}, greedy, same prompts and length): one after "
              f"another {n * tokens / ar_one:.1f} tok/s, batched {n * tokens / ar_all:.1f} "
              "tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("demo", "bench"))
    ap.add_argument("--model", type=Path, default=REPO / "zomni" / "demo_dllm_model")
    ap.add_argument("--ar-model", type=Path, default=REPO / "zomni" / "demo_model")
    ap.add_argument("--demo-prompt-len", type=int, default=128)
    ap.add_argument("--bench-prompt-len", type=int, default=256)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--ref-prompts", type=int, default=4,
                    help="prompts of the one-at-a-time table (the reference loop is slow)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    count = max(args.requests, args.ref_prompts)
    print(f"# bench_dllm: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}, fp32")
    if args.only in (None, "demo"):
        prompts = demo_prompts(args.model / "tokenizer.json", count, args.demo_prompt_len)
        bench_model("demo", args.model, prompts, args)
    if args.only in (None, "bench"):
        from zomni.testing import SHAPES
        from zomni.testing_dllm import build_llada_model

        with tempfile.TemporaryDirectory(prefix="zomni-bench-dllm-") as tmp:
            build_llada_model(tmp, shape="small")
            prompts = bench_prompts(count, args.bench_prompt_len, SHAPES["small"][-1])
            bench_model("bench", Path(tmp), prompts, args)


if __name__ == "__main__":
    main()
