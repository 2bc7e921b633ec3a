"""Masked-diffusion LMs served by the engine (LLM, AsyncLLM): each request's tokens equal
`workers.dllm_step.generate()` run alone on the same weights with the same parameters (itself
checked against the published loops in test_dllm_decoding), for each cache mode with and
without a threshold, while many requests with different settings share every step, joining
at different steps. Streams carry whole committed blocks; stop tokens cut them; an abort
frees the request's worker state and KV blocks; bad parameters are refused with the others
unharmed.

One LLaDA engine (AsyncLLM) and one Dream engine (LLM) serve the module; their KV blocks are
16 positions, so a request's table spans several blocks.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from zomni import LLM, DiffusionParams, SamplingParams
from zomni.frontend.tokenizer import apply_chat_template
from zomni.proto import InvalidRequest
from zomni.workers.dllm_decoding import DecodingParams
from zomni.workers.dllm_step import generate
from zomni.workers.loader import load_model

ENGINE = dict(num_threads=1, num_kv_blocks=48, block_size=16, max_num_seqs=16)


@pytest.fixture(scope="module")
def llada(dllm_dirs, start_async_llm):
    return start_async_llm(dllm_dirs["llada"], **ENGINE)


@pytest.fixture(scope="module")
def dream(dllm_dirs):
    with LLM(model=str(dllm_dirs["dream"]), **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def models(dllm_dirs):
    return {name: load_model(path, torch.float32, "cpu")[0] for name, path in dllm_dirs.items()}


def alone(model, prompt: list[int], params: DecodingParams, seed: int | None = None,
          max_tokens: int | None = None) -> list[int]:
    """The reference: the request decoded on its own, cut at max_tokens."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return generate(model, [prompt], params, [gen])[0][:max_tokens]


def sp(max_tokens: int, seed: int | None = None, temperature: float = 0.0,
       **diffusion) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True,
                          seed=seed, diffusion=DiffusionParams(**diffusion) if diffusion else None)


# (prompt, what the request sends, the DecodingParams it must decode with), LLaDA's defaults
# being low_confidence in blocks of 32, one token a step
LLADA_CASES = [
    ([5, 17, 99], sp(40), DecodingParams(gen_length=64, block_length=32, steps=64)),
    ([7, 250, 33, 8], sp(24, steps=12, block_length=8, cache="prefix"),
     DecodingParams(gen_length=24, block_length=8, steps=12, cache="prefix")),
    ([9, 9, 40], sp(32, block_length=16, cache="dual", threshold=0.5),
     DecodingParams(gen_length=32, block_length=16, threshold=0.5, cache="dual", steps=32)),
    ([300, 2, 61, 8, 140], sp(16, block_length=8, threshold=0.7),
     DecodingParams(gen_length=16, block_length=8, threshold=0.7, steps=16)),
    ([11, 12], sp(32, block_length=16, cache="prefix", threshold=0.9),
     DecodingParams(gen_length=32, block_length=16, threshold=0.9, cache="prefix", steps=32)),
    ([77, 78, 79, 80], sp(30, block_length=16, steps=8, cache="dual"),
     DecodingParams(gen_length=32, block_length=16, steps=8, cache="dual")),
    ([5, 6], sp(16, seed=3, temperature=0.5, block_length=8, steps=8, cache="dual",
                remasking="random"),
     DecodingParams(gen_length=16, block_length=8, steps=8, cache="dual", remasking="random",
                    temperature=0.5)),
]


def test_llada_requests_joining_at_different_steps_decode_as_alone(llada, loop, models):
    """Each request starts once the one before it has streamed its first block, so they join
    the running batch at different steps, each at its own block; every stream is one output
    per committed block."""

    async def run():
        started = [asyncio.Event() for _ in LLADA_CASES]
        started[0].set()

        async def one(i, prompt, params):
            if i > 0:
                await started[i - 1].wait()
            streamed = []
            async for out in llada.generate({"prompt_token_ids": prompt}, params):
                streamed.append(list(out.outputs[0].token_ids))
                started[i].set()
            return streamed, out

        return await asyncio.gather(*(one(i, p, s) for i, (p, s, _) in enumerate(LLADA_CASES)))

    results = loop.run_until_complete(run())
    for (prompt, params, expected), (streamed, last) in zip(LLADA_CASES, results):
        want = alone(models["llada"], prompt, expected, params.seed, params.max_tokens)
        assert last.outputs[0].token_ids == want, (prompt, params.diffusion)
        assert last.finished and last.outputs[0].finish_reason == "length"
        block = expected.block_length
        sizes = [len(b) - len(a) for a, b in zip([[]] + streamed, streamed)]
        assert sizes == [block] * (len(want) // block) + ([len(want) % block] if len(want)
                                                          % block else []), sizes


DREAM_CASES = [  # Dream's default: entropy in blocks of 32, one token a step
    ([5, 17, 99], sp(32), DecodingParams(gen_length=32, block_length=32, steps=32,
                                         remasking="entropy")),
    ([7, 250, 33], sp(32, block_length=16, remasking="maskgit_plus", threshold=0.9,
                      cache="dual"),
     DecodingParams(gen_length=32, block_length=16, steps=32, remasking="maskgit_plus",
                    threshold=0.9, cache="dual")),
    ([8, 140, 61, 9], sp(16, block_length=8, steps=8, remasking="topk_margin",
                         cache="prefix"),
     DecodingParams(gen_length=16, block_length=8, steps=8, remasking="topk_margin",
                    cache="prefix")),
    ([300, 30], sp(20, block_length=16, steps=16, cache="dual"),
     DecodingParams(gen_length=32, block_length=16, steps=16, remasking="entropy",
                    cache="dual")),
    ([12, 13, 14], sp(16, block_length=8, remasking="maskgit_plus", threshold=0.5,
                      cache="prefix"),
     DecodingParams(gen_length=16, block_length=8, steps=16, remasking="maskgit_plus",
                    threshold=0.5, cache="prefix")),
    ([40, 41], sp(16, block_length=16, remasking="topk_margin", threshold=0.3),
     DecodingParams(gen_length=16, block_length=16, steps=16, remasking="topk_margin",
                    threshold=0.3)),
    ([50, 51, 52], sp(16, seed=4, block_length=8, steps=8, remasking="origin"),
     DecodingParams(gen_length=16, block_length=8, steps=8, remasking="origin")),
]


def test_dream_batch_decodes_as_alone(dream, models):
    outs = dream.generate([{"prompt_token_ids": p} for p, _, _ in DREAM_CASES],
                          [s for _, s, _ in DREAM_CASES], use_tqdm=False)
    for (prompt, params, expected), out in zip(DREAM_CASES, outs):
        want = alone(models["dream"], prompt, expected, params.seed, params.max_tokens)
        assert out.outputs[0].token_ids == want, (prompt, params.diffusion)


def test_stop_tokens_cut_the_output(dream, models):
    prompt = [5, 17, 99]
    full = alone(models["dream"], prompt, DecodingParams(gen_length=32, block_length=32,
                                                        steps=32, remasking="entropy"))
    stop = full[20]  # a token of the answer: the output ends at its first occurrence
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, stop_token_ids=[stop])
    [out] = dream.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert out.outputs[0].token_ids == full[: full.index(stop) + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop


def test_chat_uses_the_template(dream, models):
    messages = [{"role": "user", "content": "Say something."}]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    [out] = dream.chat(messages, params, use_tqdm=False)
    ids = apply_chat_template(dream.get_tokenizer(), messages, add_generation_prompt=True)
    want = alone(models["dream"], ids, DecodingParams(gen_length=32, block_length=32, steps=32,
                                                     remasking="entropy"), max_tokens=8)
    assert out.prompt_token_ids == ids and out.outputs[0].token_ids == want
    assert out.outputs[0].text == dream.get_tokenizer().decode(want, skip_special_tokens=True)


def test_abort_frees_worker_state_and_kv_blocks(llada, loop, models):
    long = sp(64, block_length=8, steps=64, cache="dual")  # 8 blocks of 8 steps

    async def run():
        gen = llada.generate({"prompt_token_ids": [5, 6, 7]}, long, request_id="to-abort")
        first = await gen.__anext__()  # the output object grows: note what it holds now
        streamed, finished = len(first.outputs[0].token_ids), first.finished
        busy = await llada.client.get_stats()
        await llada.abort("to-abort")
        last = first
        async for last in gen:  # noqa: B007 (the last one is the answer)
            pass
        idle = await llada.client.get_stats()
        after = [o async for o in llada.generate({"prompt_token_ids": [5, 6, 7]}, long)]
        return (streamed, finished), busy, last, idle, after[-1]

    first, busy, last, idle, after = loop.run_until_complete(run())
    assert first == (8, False)  # one block of 8 streamed, then aborted
    assert busy.scheduler.kv_usage > 0
    assert last.outputs[0].finish_reason == "abort"
    assert idle.scheduler.num_running == 0 and idle.scheduler.kv_usage == 0.0
    want = alone(models["llada"], [5, 6, 7], DecodingParams(gen_length=64, block_length=8,
                                                            steps=64, cache="dual"))
    assert after.outputs[0].token_ids == want  # the same request again decodes in full


@pytest.mark.parametrize("params, param", [
    (SamplingParams(max_tokens=8, logprobs=1), "logprobs"),
    (SamplingParams(max_tokens=8, presence_penalty=1.0), "presence_penalty"),
    (SamplingParams(max_tokens=8, logit_bias={5: 2.0}), "logit_bias"),
    (SamplingParams(max_tokens=40, diffusion=DiffusionParams(steps=4, block_length=16)),
     "steps"),
    (SamplingParams(max_tokens=8, diffusion=DiffusionParams(threshold=0.9)), "threshold"),
    (SamplingParams(max_tokens=5000), "max_tokens"),
])
def test_bad_params_are_refused_and_others_finish(dream, params, param):
    good = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with pytest.raises(InvalidRequest) as e:  # ContextLengthExceeded is one too
        dream.generate([{"prompt_token_ids": [5, 6]}] * 2, [good, params], use_tqdm=False)
    assert e.value.param == param, e.value
    [ok] = dream.generate({"prompt_token_ids": [5, 6]}, good, use_tqdm=False)
    assert len(ok.outputs[0].token_ids) == 8


def test_the_mask_token_is_no_prompt_token(dream):
    mask = dream.model_info.details.mask_token_id
    with pytest.raises(InvalidRequest, match="mask token") as e:
        dream.generate({"prompt_token_ids": [5, mask]}, SamplingParams(max_tokens=8),
                       use_tqdm=False)
    assert e.value.param == "prompt"
