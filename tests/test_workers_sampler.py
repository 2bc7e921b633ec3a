"""Sampler unit tests on hand-made logits (no model)."""

from __future__ import annotations

import pytest
import torch

from zomni.proto import SamplingParams
from zomni.workers import native
from zomni.workers.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
)

VOCAB = 50
EOS = [2]


def meta(params: list[SamplingParams], token_ids=None, num_prompt=None,
         seeded: bool = True) -> SamplingMetadata:
    token_ids = token_ids or [[] for _ in params]
    gens = []
    for p in params:
        g = None
        if seeded and p.seed is not None:
            g = torch.Generator()
            g.manual_seed(p.seed)
        gens.append(g)
    return SamplingMetadata(params=params, generators=gens, token_ids=token_ids,
                            num_prompt_tokens=num_prompt or [len(t) for t in token_ids],
                            eos_token_ids=EOS)


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_and_top_k_1_are_argmax():
    logits = logits_for(3)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1),
              SamplingParams(temperature=1e-6)]
    out = Sampler()(logits, meta(params))
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_seeded_sampling_ignores_batch_mates():
    logits = logits_for(4, seed=1)
    p = SamplingParams(temperature=1.0, seed=1234)

    def draw(rows: list[int], other_seed: int) -> list[int]:
        """Five draws of request 0 (always row 0), with different batch mates."""
        params = [p] + [SamplingParams(temperature=0.7, seed=other_seed)] * (len(rows) - 1)
        m = meta(params)
        sampler = Sampler(seed=other_seed)
        return [sampler(logits[rows], m).sampled_token_ids[0].item() for _ in range(5)]

    alone = draw([0], 0)
    assert draw([0, 1, 2], 99) == alone
    assert draw([0, 3], 5) == alone


def _draws(params: SamplingParams, n: int = 20, engine_seed: int = 0) -> list[int]:
    flat, m, sampler = torch.zeros(1, VOCAB), meta([params]), Sampler(seed=engine_seed)
    return [sampler(flat, m).sampled_token_ids.item() for _ in range(n)]


def test_different_seeds_differ_and_unseeded_follow_the_engine_seed():
    assert _draws(SamplingParams(seed=1)) == _draws(SamplingParams(seed=1))
    assert _draws(SamplingParams(seed=1)) != _draws(SamplingParams(seed=2))
    assert _draws(SamplingParams(), engine_seed=3) == _draws(SamplingParams(), engine_seed=3)
    assert _draws(SamplingParams(), engine_seed=3) != _draws(SamplingParams(), engine_seed=4)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0] + [-1e9] * (VOCAB - 3)])
    m = meta([SamplingParams(temperature=1.0, seed=0)])
    sampler = Sampler()
    counts = torch.bincount(torch.tensor(
        [sampler(logits, m).sampled_token_ids.item() for _ in range(3000)]), minlength=3)
    expected = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0) * 3000
    assert torch.allclose(counts[:3].float(), expected, rtol=0.1)


def test_top_k_top_p_min_p_masks():
    x = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda y: (~torch.isinf(y[0])).nonzero().flatten().tolist()  # noqa: E731
    assert kept(apply_top_k_top_p(x, [2], [1.0])) == [0, 1]
    assert kept(apply_top_k_top_p(x, [0], [0.7])) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(apply_top_k_top_p(x, [-1], [0.71])) == [0, 1, 2]
    assert kept(apply_top_k_top_p(x, [0], [0.1])) == [0]  # the top token always stays
    assert kept(apply_top_k_top_p(x, [4], [0.8])) == [0, 1, 2]  # top-p over the top-k renormed
    assert kept(apply_min_p(x, [0.3])) == [0, 1, 2]  # p >= 0.3 * 0.5
    # per row: unaffected rows pass through
    x2 = x.repeat(2, 1)
    y = apply_top_k_top_p(x2, [2, 0], [1.0, 1.0])
    assert torch.equal(y[1], x2[1]) and kept(y[:1]) == [0, 1]
    # a permuted row is masked the same way
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.equal(apply_top_k_top_p(x[:, perm], [2], [1.0]).isinf(),
                       apply_top_k_top_p(x, [2], [1.0]).isinf()[:, perm])


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    prompt, output = [0, 1], [2, 2, 3]
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    m = SamplingMetadata([p], [None], [prompt + output], [len(prompt)], EOS)
    got = apply_penalties(logits, m)
    # repetition over prompt + output: tokens 0..3 (positive / 2, negative * 2)
    rep = [1.0, -4.0, 0.5, -2.0, 0.5]
    # frequency and presence over output only: token 2 twice, token 3 once
    expected = [rep[0], rep[1], rep[2] - 2 * 0.5 - 0.25, rep[3] - 0.5 - 0.25, rep[4]]
    assert got[0].tolist() == pytest.approx(expected)
    assert logits[0].tolist() == [2.0, -2.0, 1.0, -1.0, 0.5]  # input untouched
    plain = SamplingMetadata([SamplingParams()], [None], [prompt + output], [2], EOS)
    assert apply_penalties(logits, plain) is logits  # no work when nobody asked


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(3, VOCAB)
    params = [SamplingParams(min_tokens=2, stop_token_ids=[7]),
              SamplingParams(min_tokens=2, stop_token_ids=[7], ignore_eos=True),
              SamplingParams(min_tokens=1, stop_token_ids=[7])]
    # outputs so far: 1, 1, 1 -> rows 0 and 1 are below min_tokens, row 2 is not
    m = SamplingMetadata(params, [None] * 3, [[5, 9], [5, 9], [5, 9]], [1, 1, 1], EOS)
    out = apply_min_tokens(logits, m)
    banned = [sorted(torch.isinf(row).nonzero().flatten().tolist()) for row in out]
    assert banned == [[2, 7], [7], []]
    # greedy through the sampler never picks EOS while masked
    eos_first = torch.zeros(1, VOCAB)
    eos_first[0, 2] = 10.0
    m = SamplingMetadata([SamplingParams(temperature=0.0, min_tokens=1)], [None], [[4]], [1],
                         EOS)
    assert Sampler()(eos_first, m).sampled_token_ids.item() != 2


def test_logprobs_from_raw_logits_with_ranks():
    logits = logits_for(3, seed=5)
    params = [SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=3, logprobs=0)]
    out = Sampler()(logits, meta(params, token_ids=[[1, 2, 3]] * 3))
    raw = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    lp0 = out.logprobs[0]
    top = raw[0].topk(3)
    assert lp0.token_ids[1:] == top.indices.tolist()
    assert lp0.logprobs[1:] == pytest.approx(top.values.tolist())
    assert lp0.ranks[1:] == [1, 2, 3]
    for i, lp in [(0, lp0), (2, out.logprobs[2])]:
        tok = out.sampled_token_ids[i].item()
        assert lp.token_ids[0] == tok
        assert lp.logprobs[0] == pytest.approx(raw[i, tok].item())
        assert lp.ranks[0] == int((raw[i] > raw[i, tok]).sum()) + 1
    assert len(out.logprobs[2].token_ids) == 1


@pytest.mark.parametrize("cols", [1, 15, 16, 17, 1000, 151936])
def test_native_argmax_is_torchs(cols):
    """First index of the maximum (ties, all -inf), or of the first NaN; any row stride."""
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(6, cols + 3, generator=gen)[:, 2:cols + 2]  # rows strided, not contiguous
    x[1] = float("-inf")
    x[2, cols // 3] = x[2, cols - 1] = 1e9  # a tie: the first wins
    x[3, cols - 1] = float("nan")
    x[4, cols // 2] = float("inf")
    x[5, 0] = float("nan")
    assert torch.equal(native.argmax(x), x.argmax(dim=-1))
