"""Decoding (`workers/dllm_decoding.py`, driven through `workers/dllm_step.py` by our models)
against the published loops in `dllm_reference`, run on transformers' Llama / Qwen2 with the
same weights: token-equal at temperature 0, and at temperature > 0 or with random remasking
given the same seed (the reference's draws come from the same generator, or, in Dream's loop,
from torch's default generator seeded alike).

Then: many requests at their own block and step in one batched forward decode as each does
alone; the KV caches are reused (a step after the refresh computes only its window); and the
pure parts (schedule, threshold rule, windows, validation).
"""

from __future__ import annotations

import pytest
import torch
from dllm_reference import RefModel, dream_sample, fast_dllm_generate, llada_generate

from zomni.workers.dllm_decoding import (
    DecodingParams,
    DiffusionLMState,
    Window,
    choose_commits,
    forward_window,
    llada_transfer_counts,
)
from zomni.workers.dllm_step import DiffusionLMRequest, denoise_step, generate
from zomni.workers.loader import load_model

MASK = 511  # the fixtures' mask token
PROMPTS = {"short": [5, 17, 99], "long": [7, 250, 33, 8, 140, 61, 9, 2, 300]}


@pytest.fixture(scope="module")
def models(dllm_dirs):
    torch.manual_seed(0)
    return {name: (load_model(path, torch.float32, "cpu")[0], RefModel(path))
            for name, path in dllm_dirs.items()}


def _ours(model, prompt, seed=None, **params) -> list[int]:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, [prompt], DecodingParams(**params), [gen])[0]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- LLaDA generate() -------------------------------------------------------------------------


@pytest.mark.parametrize("case", [
    dict(steps=8, gen_length=16, block_length=8),
    dict(steps=4, gen_length=16, block_length=4),
    dict(steps=16, gen_length=16, block_length=16),  # one block, one token a step
    dict(steps=6, gen_length=24, block_length=8, cfg_scale=1.5),
])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_llada_generate_greedy(models, case, prompt):
    model, ref = models["llada"]
    cfg = case.get("cfg_scale", 0.0)
    expected = llada_generate(ref, PROMPTS[prompt], case["steps"], case["gen_length"],
                              case["block_length"], MASK, cfg_scale=cfg)
    assert _ours(model, PROMPTS[prompt], **case) == expected


@pytest.mark.parametrize("remasking, temperature", [("random", 0.0), ("low_confidence", 1.0),
                                                    ("random", 0.7)])
def test_llada_generate_seeded(models, remasking, temperature):
    model, ref = models["llada"]
    prompt, case = PROMPTS["long"], dict(steps=8, gen_length=16, block_length=8)
    expected = llada_generate(ref, prompt, **case, mask_id=MASK, temperature=temperature,
                              remasking=remasking, generator=_gen(11))
    ours = _ours(model, prompt, seed=11, remasking=remasking, temperature=temperature, **case)
    assert ours == expected
    assert ours != _ours(model, prompt, seed=12, remasking=remasking, temperature=temperature,
                         **case)


# ---- Dream _sample ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("block_length", [None, 6])
def test_dream_greedy(models, alg, block_length):
    model, ref = models["dream"]
    prompt, steps, gen = PROMPTS["short"], 12, 18
    expected = dream_sample(ref, prompt, steps, gen, MASK, alg, block_length=block_length)
    assert _ours(model, prompt, steps=steps, gen_length=gen, block_length=block_length or gen,
                 remasking=alg) == expected


@pytest.mark.parametrize("alg, temperature, top_p, top_k", [
    ("origin", 0.0, None, None),
    ("origin", 0.8, 0.9, None),
    ("maskgit_plus", 1.0, None, None),
    ("entropy", 0.5, 0.95, None),
    ("topk_margin", 1.0, None, 20),
])
def test_dream_seeded(models, alg, temperature, top_p, top_k):
    model, ref = models["dream"]
    prompt, steps, gen = PROMPTS["long"], 8, 16
    torch.manual_seed(21)  # Dream's loop draws from torch's default generator
    expected = dream_sample(ref, prompt, steps, gen, MASK, alg, temperature=temperature,
                            top_p=top_p, top_k=top_k)
    ours = _ours(model, prompt, seed=21, steps=steps, gen_length=gen, block_length=gen,
                 remasking=alg, temperature=temperature, top_p=top_p, top_k=top_k)
    assert ours == expected


# ---- Fast-dLLM --------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.9, 0.5])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_fast_dllm_greedy(models, name, cache, threshold):
    model, ref = models[name]
    prompt, case = PROMPTS["long"], dict(steps=12, gen_length=24, block_length=8)
    expected = fast_dllm_generate(ref, prompt, **case, mask_id=MASK, threshold=threshold,
                                  cache=cache)
    assert _ours(model, prompt, threshold=threshold, cache=cache, **case) == expected


def test_threshold_decodes_in_parallel(models):
    """With a threshold a block takes fewer steps than tokens (parallel decoding); positions
    past the current block stay masked."""
    model, _ = models["llada"]
    state = DiffusionLMState(PROMPTS["long"], DecodingParams(
        steps=12, gen_length=24, block_length=8, threshold=0.5, cache="dual"), MASK)
    request = DiffusionLMRequest(state)
    while not state.done:
        denoise_step(model, [request])
        assert (state.tokens[state.block_end:] == MASK).all()
    assert state.num_forwards < 24 and MASK not in state.generated_token_ids()


# ---- batching and caches ----------------------------------------------------------------------


def test_batch_of_requests_at_their_own_steps(models):
    """Requests with their own prompts, remasking, caches and seeds, joining at different
    steps, decode in shared forwards exactly as each decodes alone."""
    model, _ = models["llada"]
    specs = [
        (PROMPTS["short"], dict(steps=8, gen_length=16, block_length=8), None),
        (PROMPTS["long"], dict(steps=12, gen_length=24, block_length=8, cache="prefix",
                               threshold=0.9), None),
        (PROMPTS["long"], dict(steps=4, gen_length=16, block_length=4, cache="dual"), None),
        (PROMPTS["short"], dict(steps=8, gen_length=16, block_length=8, cfg_scale=1.0), None),
        (PROMPTS["long"], dict(steps=8, gen_length=16, block_length=8, remasking="random",
                               temperature=1.0), 5),
    ]
    alone = [_ours(model, p, seed, **kw) for p, kw, seed in specs]
    requests = [DiffusionLMRequest(DiffusionLMState(
        p, DecodingParams(**kw), MASK, 0, None if seed is None else _gen(seed)))
        for p, kw, seed in specs]
    step = 0
    while not all(r.state.done for r in requests):
        joined = requests[: 1 + step]  # one more request joins at each step
        denoise_step(model, [r for r in joined if not r.state.done])
        step += 1
    assert [r.state.generated_token_ids() for r in requests] == alone


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("name", ["llada", "dream"])
def test_cache_is_reused(models, name, cache, monkeypatch):
    """After a block's refresh (every row, K/V stored, nothing read) a step computes only its
    window, reading the cached rest: the prefix (prefix cache), or the prefix and the suffix
    (dual), plus Dream's one shifted row. Without a cache nothing is stored."""
    model, _ = models[name]
    seen = []
    forward = type(model).forward

    def recording(self, input_ids, segments):
        seen.append([(s.start, s.end, s.kv is not None, s.read_prefix, s.read_suffix)
                     for s in segments])
        return forward(self, input_ids, segments)

    monkeypatch.setattr(type(model), "forward", recording)
    prompt, P, L = PROMPTS["short"], 3, 3 + 16
    state = DiffusionLMState(prompt, DecodingParams(steps=4, gen_length=16, block_length=8,
                                                    cache=cache), MASK, model.logits_shift)
    request = DiffusionLMRequest(state)
    while not state.done:
        denoise_step(model, [request])
    shift = model.logits_shift
    windows = {"none": [(0, L, False, False, False)] * 4,
               "prefix": [(0, L, True, False, False), (P - shift, L, True, True, False)] * 2,
               "dual": [(0, L, True, False, False), (P - shift, P + 8, True, True, True),
                        (0, L, True, False, False), (P + 8 - shift, P + 16, True, True, True)]}
    expected = windows[cache]
    if cache == "prefix":
        expected[3] = (P + 8 - shift, L, True, True, False)
    assert [s[0] for s in seen] == expected


# ---- pure parts -------------------------------------------------------------------------------


def test_transfer_counts_and_windows():
    assert llada_transfer_counts(8, 3) == [3, 3, 2]
    assert llada_transfer_counts(2, 4) == [1, 1, 0, 0]
    assert forward_window("none", 20, 4, 12, 3, 1) == Window(0, 20)
    assert forward_window("dual", 20, 4, 12, 0, 1) == Window(0, 20)
    assert forward_window("prefix", 20, 4, 12, 2, 0) == Window(4, 20, read_prefix=True)
    assert forward_window("dual", 20, 4, 12, 2, 1) == Window(3, 12, True, True)


def test_threshold_always_commits_the_most_confident():
    logits = torch.zeros(3, 8)
    logits[1, 5] = 1.0  # no candidate is near 0.99 confident: only the best is committed
    params = DecodingParams(gen_length=8, block_length=8, steps=8, threshold=0.99)
    rows, tokens = choose_commits(params, logits, 0, MASK)
    assert rows.tolist() == [1] and tokens.tolist() == [5]


@pytest.mark.parametrize("remasking, temperature", [("low_confidence", 0.0),
                                                    ("low_confidence", 1.0),
                                                    ("maskgit_plus", 0.0),
                                                    ("maskgit_plus", 1.0)])
def test_mask_token_is_never_committed(remasking, temperature):
    logits = torch.zeros(4, 16)
    logits[:, 7] = 30.0  # the mask token would win everywhere
    logits[:, 3] = 1.0
    params = DecodingParams(gen_length=4, block_length=4, steps=1, remasking=remasking,
                            temperature=temperature)
    rows, tokens = choose_commits(params, logits, 0, 7, torch.Generator().manual_seed(0))
    assert rows.numel() == 4 and 7 not in tokens.tolist()


@pytest.mark.parametrize("params, match", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=16, block_length=4, steps=6), "multiple of the number of blocks"),
    (dict(remasking="greedy"), "unknown remasking"),
    (dict(top_p=0.9), "Dream's remasking only"),
    (dict(remasking="entropy", threshold=0.9), "threshold"),
    (dict(cfg_scale=1.0, cache="prefix"), "without a KV cache"),
    (dict(cache="paged"), "unknown cache"),
])
def test_params_are_validated(params, match):
    with pytest.raises(ValueError, match=match):
        DecodingParams(**params)
    with pytest.raises(ValueError, match="prompt"):
        DiffusionLMState([], DecodingParams(), MASK)
