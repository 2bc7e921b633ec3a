"""Masked-diffusion LMs under tensor parallelism: TP=2 over gloo on the CPU, through the real
engine and workers, decodes each request as `workers.dllm_step.generate()` does alone on the
unsharded model (the TP=1 decoding checked against the published loops in
test_dllm_decoding): every rank runs the same choices on the all-gathered logits.

One batch per layout mixes the schedules and both KV caches, greedy and seeded sampling.
"""

from __future__ import annotations

import pytest
import torch

from zomni import LLM, DiffusionParams, SamplingParams
from zomni.workers.dllm_decoding import DecodingParams
from zomni.workers.dllm_step import generate
from zomni.workers.loader import load_model

# (prompt, request, the DecodingParams it must decode with, its seed)
CASES = {
    "llada": [
        ([5, 17, 99], dict(max_tokens=32, diffusion=dict(block_length=16)),
         DecodingParams(gen_length=32, block_length=16, steps=32), None),
        ([7, 250, 33, 8], dict(max_tokens=24, diffusion=dict(block_length=8, steps=12,
                                                            cache="prefix")),
         DecodingParams(gen_length=24, block_length=8, steps=12, cache="prefix"), None),
        ([9, 9, 40, 41], dict(max_tokens=32, diffusion=dict(block_length=16, threshold=0.5,
                                                           cache="dual")),
         DecodingParams(gen_length=32, block_length=16, threshold=0.5, cache="dual"), None),
        ([300, 2, 61], dict(max_tokens=16, temperature=0.8, seed=7,
                            diffusion=dict(block_length=8)),
         DecodingParams(gen_length=16, block_length=8, steps=16, temperature=0.8), 7),
    ],
    "dream": [
        ([5, 17, 99], dict(max_tokens=32, diffusion=dict(block_length=16, remasking="entropy")),
         DecodingParams(gen_length=32, block_length=16, steps=32, remasking="entropy"), None),
        ([12, 60, 3, 77], dict(max_tokens=16, diffusion=dict(block_length=8, cache="dual",
                                                            remasking="maskgit_plus")),
         DecodingParams(gen_length=16, block_length=8, steps=16, cache="dual",
                        remasking="maskgit_plus"), None),
    ],
}


def request(fields: dict) -> SamplingParams:
    fields = dict(fields)
    diffusion = DiffusionParams(**fields.pop("diffusion"))
    return SamplingParams(ignore_eos=True, diffusion=diffusion, **{"temperature": 0.0, **fields})


@pytest.mark.parametrize("layout", list(CASES))
def test_tp2_decodes_as_tp1(dllm_dirs, layout):
    model, _ = load_model(dllm_dirs[layout], torch.float32, "cpu")
    cases = CASES[layout]
    expected = [generate(model, [prompt], params,
                         [None if seed is None else torch.Generator().manual_seed(seed)])[0]
                for prompt, _, params, seed in cases]
    requests = [request(fields) for _, fields, _, _ in cases]
    with LLM(model=str(dllm_dirs[layout]), tensor_parallel_size=2, num_threads=1,
             num_kv_blocks=32, block_size=16) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p, *_ in cases], requests,
                            use_tqdm=False)
    for (prompt, *_), out, want in zip(cases, outs, expected):
        assert out.outputs[0].token_ids == want, prompt
