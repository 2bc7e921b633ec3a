"""The Python API end to end: real engine and worker processes, checked against transformers."""

from __future__ import annotations

import random

import msgspec
import pytest
from reference import assert_greedy_match

from zomni import LLM, SamplingParams
from zomni.proto import ContextLengthExceeded, InvalidRequest
from zomni.testing import ARCHS

GREEDY_32 = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def random_prompts(n: int, lengths: list[int], vocab: int = 500, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_llm(request, model_dirs):
    with LLM(model=str(model_dirs[request.param]), num_kv_blocks=512) as llm:
        yield request.param, llm


def test_greedy_matches_transformers(arch_llm, model_dirs):
    arch, llm = arch_llm
    single = random_prompts(1, [13], seed=1)
    batch = random_prompts(8, [5, 17, 33, 2, 48, 9, 26, 71], seed=2)
    for prompts in (single, batch):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY_32,
                            use_tqdm=False)
        for prompt, out in zip(prompts, outs):
            assert out.prompt_token_ids == prompt
            assert len(out.outputs[0].token_ids) == 32
            assert out.outputs[0].finish_reason == "length"
            assert_greedy_match(model_dirs[arch], prompt, out.outputs[0].token_ids)


@pytest.fixture(scope="module")
def llama_llm(llama_dir):
    with LLM(model=str(llama_dir), num_kv_blocks=512) as llm:
        yield llm


@pytest.fixture(scope="module", params=[True, False], ids=["async", "sync"])
def cramped_llm(llama_dir, request):
    """Few KV blocks and a small step budget: forces preemption and chunked prefill; with
    async scheduling (the default) and without."""
    with LLM(model=str(llama_dir), num_kv_blocks=24, block_size=16, max_num_batched_tokens=32,
             async_scheduling=request.param) as llm:
        yield llm


def test_preemption_keeps_tokens(cramped_llm, llama_dir):
    prompts = random_prompts(8, [20, 30, 25, 18], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = cramped_llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
    assert cramped_llm.get_stats().scheduler.num_preemptions > 0  # 8 × 60 tokens > 24 blocks × 16
    for prompt, out in zip(prompts, outs):
        assert len(out.outputs[0].token_ids) == 40
        assert_greedy_match(llama_dir, prompt, out.outputs[0].token_ids)


def test_chunked_prefill_matches(cramped_llm, llama_dir):
    prompt = random_prompts(1, [150], seed=4)[0]  # 150 tokens through a 32-token budget
    out = cramped_llm.generate({"prompt_token_ids": prompt}, GREEDY_32, use_tqdm=False)[0]
    assert_greedy_match(llama_dir, prompt, out.outputs[0].token_ids)


def test_prefix_cache_reuse(llama_llm, llama_dir):
    shared = random_prompts(1, [80], seed=5)[0]
    first = llama_llm.generate({"prompt_token_ids": shared + [7, 8, 9]}, GREEDY_32,
                               use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    second_prompt = shared + [10, 11]
    second = llama_llm.generate({"prompt_token_ids": second_prompt}, GREEDY_32,
                                use_tqdm=False)[0]
    assert second.num_cached_tokens >= 64  # `shared` fills one 64-token block (CPU default)
    assert_greedy_match(llama_dir, second_prompt, second.outputs[0].token_ids)


def test_seeded_sampling(llama_llm):
    prompt = {"prompt_token_ids": random_prompts(1, [12], seed=6)[0]}

    def sample(**kw):
        params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=1.0, **kw)
        return llama_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    assert sample(seed=123) == sample(seed=123)
    assert sample(seed=123) != sample(seed=124)
    greedy = llama_llm.generate(prompt, GREEDY_32, use_tqdm=False)[0].outputs[0].token_ids
    assert sample(seed=5, top_k=1) == greedy[:24]


def test_n_logprobs_and_text(llama_llm):
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=1, logprobs=2,
                            ignore_eos=True)
    out = llama_llm.generate("def fibonacci(n):", params, use_tqdm=False)[0]
    assert out.prompt == "def fibonacci(n):" and len(out.outputs) == 3
    assert [o.index for o in out.outputs] == [0, 1, 2]
    for o in out.outputs:
        assert len(o.logprobs) == 8
        for token_id, entry in zip(o.token_ids, o.logprobs):
            assert token_id in entry and len(entry) <= 3
            assert all(lp.logprob <= 0 for lp in entry.values())
        assert o.text == llama_llm.get_tokenizer().decode(o.token_ids, skip_special_tokens=True)


def test_stop_string_ends_request(llama_llm):
    prompt = {"prompt_token_ids": random_prompts(1, [10], seed=7)[0]}
    full = llama_llm.generate(prompt, GREEDY_32, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2:][:2]
    assert stop.strip(), "the reference text is too short to pick a stop string"
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, stop=[stop])
    out = llama_llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]


def test_chat(llama_llm):
    out = llama_llm.chat([{"role": "user", "content": "hi"}],
                         SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                         use_tqdm=False)[0]
    expected = llama_llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    expected = getattr(expected, "input_ids", expected)
    assert out.prompt_token_ids == list(expected)
    assert len(out.outputs[0].token_ids) == 5


@pytest.mark.parametrize("kw, param", [
    (dict(temperature=1e39), "temperature"),  # finite in float64, inf in the sampler's float32
    (dict(top_p=float("nan")), "top_p"),
    (dict(n=129), "n"),
    (dict(stop=["x"] * 257), "stop"),
    (dict(stop_token_ids=[1] * 257), "stop_token_ids"),
    (dict(seed=2**63), "seed"),
])
def test_sampling_params_bounds_hold_at_every_door(kw, param):
    """The same checks run for Python callers and for bytes off ZMQ (msgspec runs
    `__post_init__` on decode)."""
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == param
    fields = msgspec.structs.asdict(SamplingParams()) | kw  # the wire form is an array
    raw = msgspec.msgpack.encode(list(fields.values()))
    with pytest.raises(msgspec.ValidationError, match=f"^{param} "):
        msgspec.msgpack.decode(raw, type=SamplingParams)


def test_bad_requests_raise_typed_errors(llama_llm):
    with pytest.raises(InvalidRequest, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequest, match="temperature"):
        SamplingParams(temperature=-0.5)
    good = {"prompt_token_ids": [5, 6, 7]}
    too_long = {"prompt_token_ids": [5] * 5000}  # max_position_embeddings is 4096
    with pytest.raises(ContextLengthExceeded):
        llama_llm.generate([good, too_long, good], GREEDY_32, use_tqdm=False)
    with pytest.raises(InvalidRequest, match="token ids"):
        llama_llm.generate({"prompt_token_ids": [10**6]}, GREEDY_32, use_tqdm=False)
    # the engine is still up and serving
    out = llama_llm.generate(good, GREEDY_32, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 32
