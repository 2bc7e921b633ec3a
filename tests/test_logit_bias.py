"""`logit_bias` (OpenAI): the sampler adds each listed token's bias to its logit, before the
penalties, temperature, min-p, top-k and top-p (vLLM's order), at every sampled position,
greedy included; reported logprobs stay those of the raw logits (vLLM's default
`logprobs_mode="raw_logprobs"`). The bias is added in place (the sampler owns the step's
logits), so tests that reuse logits pass copies.

Checked on hand-made logits, then end to end through `LLM.generate` against transformers'
greedy tokens and logits: +100 forces a token, -100 bans one, and a small bias on a token
greedy never picks changes nothing.
"""

from __future__ import annotations

import math

import msgspec
import pytest
import torch
from reference import NEAR_TIE, assert_greedy_match, hf_greedy

from zomni import LLM
from zomni.core.token_scheduler import TokenScheduler
from zomni.proto import (
    EngineConfig,
    EngineOutput,
    EngineOutputs,
    EngineRequest,
    InvalidRequest,
    ModelRunnerOutput,
    MsgType,
    SamplingParams,
    TokenLogprobs,
    TokenModelInfo,
    TokenRunnerInfo,
    decode,
    encode,
)
from zomni.workers.sampler import Sampler, SamplingMetadata, apply_logit_bias

VOCAB = 50
EOS = [2]


def meta(params: list[SamplingParams], token_ids=None) -> SamplingMetadata:
    token_ids = token_ids or [[1] for _ in params]
    gens = []
    for p in params:
        gens.append(None if p.seed is None else torch.Generator().manual_seed(p.seed))
    return SamplingMetadata(params, gens, token_ids, [len(t) for t in token_ids], EOS)


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


# ---- the sampler ----------------------------------------------------------------------------


def test_plus_100_forces_and_minus_100_bans_greedy_and_random():
    logits = logits_for(4)
    top, low = logits[0].argmax().item(), logits[0].argmin().item()
    params = [SamplingParams(temperature=0.0, logit_bias={low: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={top: -100.0}),
              SamplingParams(temperature=1.0, seed=3, logit_bias={low: 100.0}),
              SamplingParams(temperature=0.0)]
    out = Sampler()(logits[[0, 0, 0, 0]], meta(params)).sampled_token_ids.tolist()
    second = logits[0].topk(2).indices[1].item()
    assert out == [low, second, low, top]


def test_small_bias_on_an_unpicked_token_changes_nothing_and_logprobs_stay_raw():
    logits = logits_for(3, seed=1)
    low = logits.argmin(dim=-1).tolist()
    plain = [SamplingParams(temperature=0.0, logprobs=2) for _ in range(3)]
    biased = [SamplingParams(temperature=0.0, logprobs=2, logit_bias={t: 1.0}) for t in low]
    a, b = Sampler()(logits.clone(), meta(plain)), Sampler()(logits.clone(), meta(biased))
    assert a.sampled_token_ids.tolist() == b.sampled_token_ids.tolist()
    assert a.logprobs == b.logprobs
    forced = Sampler()(logits[:1].clone(), meta([SamplingParams(temperature=0.0, logprobs=0,
                                                                logit_bias={low[0]: 100.0})]))
    (lp,) = forced.logprobs
    raw = torch.log_softmax(logits[0], dim=-1)
    assert lp.token_ids == [low[0]] and lp.ranks == [VOCAB]  # the least likely raw token
    assert lp.logprobs[0] == pytest.approx(raw[low[0]].item(), abs=1e-6)


def test_seeded_draws_are_those_of_the_biased_logits():
    """A bias is exactly a shift of the logits: seeded draws equal unbiased draws from
    logits + bias, with top-k / top-p / min-p computed on the biased values."""
    logits = logits_for(1, seed=2)
    bias = {3: 2.5, 7: -1.0, 11: 4.0, 49: 0.5}
    shifted = logits.clone()
    for t, v in bias.items():
        shifted[0, t] += v
    for extra in [{}, {"top_k": 5}, {"top_p": 0.6}, {"min_p": 0.1, "temperature": 0.7}]:
        p = {"temperature": 1.0, "seed": 11, **extra}
        s1, s2 = Sampler(), Sampler()
        m1, m2 = meta([SamplingParams(logit_bias=bias, **p)]), meta([SamplingParams(**p)])
        got = [s1(logits.clone(), m1).sampled_token_ids.item() for _ in range(30)]
        want = [s2(shifted, m2).sampled_token_ids.item() for _ in range(30)]
        assert got == want, extra


def test_bias_comes_before_the_repetition_penalty():
    """vLLM: logit processors (bias), then penalties. Token 3 (seen, logit 1) biased +3 is
    (1 + 3) / 2 = 2 under a repetition penalty of 2, below token 4's 2.5; the other order
    would give 1 / 2 + 3 = 3.5 and pick token 3."""
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 1.0, 2.5
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={3: 3.0})
    assert Sampler()(logits, meta([p], [[3]])).sampled_token_ids.item() == 4


def test_apply_logit_bias_skips_what_nobody_asked_for():
    logits = logits_for(2)
    m = meta([SamplingParams(), SamplingParams(logit_bias={})])
    assert apply_logit_bias(logits, m) is logits
    m = meta([SamplingParams(), SamplingParams(logit_bias={5: -3.0, 0: 2.0, VOCAB + 7: 9.0})])
    expected = logits.clone()
    expected[1, 5] -= 3.0
    expected[1, 0] += 2.0  # an id outside the vocab is skipped
    assert apply_logit_bias(logits, m) is logits and torch.equal(logits, expected)


# ---- validation and the wire ----------------------------------------------------------------


@pytest.mark.parametrize("bias", [{1: 100.5}, {1: -101}, {1: math.nan}, {1: math.inf},
                                  {1: 1e39}, {-1: 1.0}, {"5": 1.0}, {1: True}, {1: "2"},
                                  {i: 1.0 for i in range(301)}, [1, 2]])
def test_bad_logit_bias_is_refused(bias):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"


@pytest.mark.parametrize("value", [-1, 21])
def test_bad_prompt_logprobs_is_refused(value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(prompt_logprobs=value)
    assert e.value.param == "prompt_logprobs"


def test_new_fields_round_trip_and_bad_wire_values_are_refused():
    req = EngineRequest("r", [1, 2], SamplingParams(logit_bias={5: -100, 300: 2.5},
                                                    prompt_logprobs=0, max_tokens=3))
    _, got, _ = decode(encode(MsgType.REQUEST, req))
    assert got.sampling.logit_bias == {5: -100.0, 300: 2.5} and got.sampling.prompt_logprobs == 0
    lp = TokenLogprobs([4], [-1.5], [3])
    outs = EngineOutputs([EngineOutput("r", [9], prompt_logprobs=[None, lp])])
    assert decode(encode(MsgType.OUTPUTS, outs))[1].outputs[0].prompt_logprobs == [None, lp]
    res = ModelRunnerOutput(1, ["r"], [9], None, {"r": [lp]})
    assert decode(encode(MsgType.STEP_RESULT, res))[1].prompt_logprobs == {"r": [lp]}
    # fields an older peer does not send decode to their defaults (appended, with defaults)
    old = msgspec.msgpack.encode([0, 1, ["r"], [9]])  # tag AR, then the three first fields
    assert msgspec.msgpack.decode(old, type=ModelRunnerOutput).prompt_logprobs is None
    # a custom client's bytes get the same checks as Python callers
    req.sampling.logit_bias = {5: 1000.0}  # set past validation
    with pytest.raises(InvalidRequest, match="logit_bias"):
        decode(encode(MsgType.REQUEST, req))


def test_scheduler_refuses_ids_outside_the_vocabulary(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 100}')
    sched = TokenScheduler(EngineConfig(model=str(tmp_path)), TokenModelInfo(64, 100, [2]),
                           TokenRunnerInfo(16, 4, 64))
    sched.add_request(EngineRequest("ok", [1, 2], SamplingParams(logit_bias={99: 1.0})))
    with pytest.raises(InvalidRequest, match=r"\[0, 100\)") as e:
        sched.add_request(EngineRequest("no", [1, 2], SamplingParams(logit_bias={100: 1.0})))
    assert e.value.param == "logit_bias"


# ---- end to end, against transformers -------------------------------------------------------


@pytest.fixture(scope="module")
def llm(llama_dir):
    with LLM(model=str(llama_dir), num_kv_blocks=256) as llm:
        yield llm


PROMPT = [17, 230, 41, 5, 88, 301, 12, 9, 77, 150, 3]


def _greedy(llm, **sampling) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, **sampling)
    (out,) = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    return out.outputs[0].token_ids


def test_llm_generate_logit_bias_against_transformers(llm, llama_dir):
    ref, ref_logits = hf_greedy(llama_dir, PROMPT, 8)
    assert assert_greedy_match(llama_dir, PROMPT, _greedy(llm)) == 8
    # +100 on a token greedy never picks: it is picked at every step
    forced = next(t for t in range(3, 500) if t not in ref)
    assert _greedy(llm, logit_bias={forced: 100.0}) == [forced] * 8
    # -100 on greedy's first token: the first token is the runner-up in transformers' logits
    first = _greedy(llm, logit_bias={ref[0]: -100.0})
    row = ref_logits[0].clone()
    row[ref[0]] = -math.inf
    runner_up = row.topk(2)
    assert runner_up.values[0] - runner_up.values[1] > NEAR_TIE
    assert first[0] == runner_up.indices[0].item() and ref[0] not in first
    # +1 on a token far below the top at every step: nothing changes
    gaps = torch.stack([lg.max() - lg for lg in ref_logits]).min(dim=0).values
    nudged = int(gaps.argmax())
    assert gaps[nudged] > 1.0 + NEAR_TIE
    assert _greedy(llm, logit_bias={nudged: 1.0}) == ref
    # prompt logprobs cost the tokens nothing (they travel on the first engine output)
    assert _greedy(llm, prompt_logprobs=2) == ref
