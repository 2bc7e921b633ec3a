"""Sampler: one token per sampling row, vectorised over the batch, with vLLM's semantics.

Order of operations on the logits [S, V] of the rows that sample:

    raw logits ──► logprobs (log_softmax of the raw logits, vLLM's default), if any row asks
        │
        ├─ logit_bias: added to the listed tokens' logits (before penalties, as in vLLM)
        ├─ repetition penalty (prompt + output tokens), frequency / presence (output tokens)
        ├─ min_tokens: stop ids (and EOS unless ignore_eos) get -inf below min_tokens outputs
        ├─ greedy rows (temperature < 1e-5 or top_k == 1): argmax
        └─ other rows: / temperature ─► min_p ─► top_k ─► top_p ─► softmax
                       ─► argmax(probs / Exp(1) noise)   (= a categorical draw)

Each seeded request has its own `torch.Generator`, advanced only by its own draws, so its output
does not depend on its batch mates; unseeded rows share the worker's generator. Work nobody asked
for (bias, penalties, sorting for top-k/top-p, logprobs) is skipped.

Logprobs, of sampled tokens and of prompt tokens (`prompt_logprobs`) alike, are those of the raw
logits: vLLM's default `logprobs_mode="raw_logprobs"`, so a bias or a temperature changes which
token is drawn, not the reported logprob of a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zomni.proto import SamplingParams, TokenLogprobs
from zomni.workers import native

_NEG_INF = float("-inf")


@dataclass
class SamplingMetadata:
    """Row i of the logits belongs to a request with these parameters and tokens."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    token_ids: list[Sequence[int]]  # prompt + output so far
    num_prompt_tokens: list[int]
    eos_token_ids: list[int]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [S] int64
    logprobs: list[TokenLogprobs | None] | None  # None when no row asked for logprobs


class Sampler:
    def __init__(self, seed: int = 0, device: torch.device | str = "cpu"):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """Sample a token per row of `logits` [S, V]: the step's own tensor, which the sampler
        may change in place (logit_bias); a caller that reuses it passes a copy."""
        logits = logits.float()
        want_logprobs = [i for i, p in enumerate(meta.params) if p.logprobs is not None]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = apply_logit_bias(logits, meta)
        logits = apply_penalties(logits, meta)
        logits = apply_min_tokens(logits, meta)
        sampled = self._sample(logits, meta)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, meta.params, want_logprobs)
        return SamplerOutput(sampled, logprobs)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        sampled = native.argmax(logits)
        rows = [i for i, p in enumerate(meta.params) if not p.greedy]
        if not rows:
            return sampled
        params = [meta.params[i] for i in rows]
        x = logits[rows] / _column([p.temperature for p in params], logits)
        x = apply_min_p(x, [p.min_p for p in params])
        x = apply_top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(x, dim=-1)
        noise = torch.empty_like(probs)
        shared = [j for j, i in enumerate(rows) if meta.generators[i] is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device,
                                        dtype=probs.dtype).exponential_(generator=self.generator)
        for j, i in enumerate(rows):
            if meta.generators[i] is not None:
                noise[j].exponential_(generator=meta.generators[i])
        sampled[rows] = (probs / noise).argmax(dim=-1)
        return sampled


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _token_counts(token_lists: list[Sequence[int]], vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token id per list."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    cols = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.int64,
                        device=device)
    counts = torch.zeros(len(token_lists), vocab, device=device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=counts.dtype), accumulate=True)
    return counts


def apply_logit_bias(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Add each row's `logit_bias` to its tokens' logits, IN PLACE (OpenAI: +-100 forces or
    bans a token, smaller values nudge it). In place because a copy of [S, vocab] would cost
    every batch mate of one biased request; the sampler owns the step's logits. The engine
    core checked the ids against the vocabulary; one outside it here is skipped, not fatal."""
    rows = [i for i, p in enumerate(meta.params) if p.logit_bias]
    if not rows:
        return logits
    ids: list[int] = []
    values: list[float] = []
    for i in rows:  # C-level extends: no Python loop over the bias entries
        ids.extend(meta.params[i].logit_bias)
        values.extend(meta.params[i].logit_bias.values())
    device = logits.device
    counts = torch.tensor([len(meta.params[i].logit_bias) for i in rows], device=device)
    row_ids = torch.repeat_interleave(torch.tensor(rows, device=device), counts)
    cols = torch.tensor(ids, dtype=torch.int64, device=device)
    keep = cols < logits.shape[1]  # ids are non-negative (SamplingParams checks)
    logits.index_put_((row_ids[keep], cols[keep]),
                      torch.tensor(values, dtype=logits.dtype, device=device)[keep],
                      accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Repetition (vLLM: prompt + output; divide positive logits, multiply negative ones),
    then frequency and presence (OpenAI: output tokens only, subtracted)."""
    vocab = logits.shape[1]
    rep = [i for i, p in enumerate(meta.params) if p.repetition_penalty != 1.0]
    if rep:
        seen = _token_counts([meta.token_ids[i] for i in rep], vocab, logits.device) > 0
        penalty = _column([meta.params[i].repetition_penalty for i in rep], logits)
        x = logits[rep]
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
        logits = logits.clone()
        logits[rep] = x
    freq = [i for i, p in enumerate(meta.params)
            if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if freq:
        outputs = [meta.token_ids[i][meta.num_prompt_tokens[i]:] for i in freq]
        counts = _token_counts(outputs, vocab, logits.device)
        f = _column([meta.params[i].frequency_penalty for i in freq], logits)
        p = _column([meta.params[i].presence_penalty for i in freq], logits)
        logits = logits.clone() if not rep else logits
        logits[freq] -= f * counts + p * (counts > 0).to(logits.dtype)
    return logits


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Below `min_tokens` outputs, stop token ids (and EOS unless ignore_eos) cannot be drawn."""
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(meta.params):
        if len(meta.token_ids[i]) - meta.num_prompt_tokens[i] >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            banned.update(meta.eos_token_ids)
        banned = {t for t in banned if 0 <= t < logits.shape[1]}
        rows += [i] * len(banned)
        cols += sorted(banned)
    if not rows:
        return logits
    logits = logits.clone()
    logits[rows, cols] = _NEG_INF
    return logits


def apply_min_p(x: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability."""
    if not any(m > 0.0 for m in min_p):
        return x
    probs = torch.softmax(x, dim=-1)
    threshold = _column(min_p, x) * probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keep the top_k most likely tokens (k <= 0: all), then the smallest set whose probability
    reaches top_p (the most likely token always stays)."""
    vocab = x.shape[1]
    use_k = any(0 < k < vocab for k in top_k)
    use_p = any(p < 1.0 for p in top_p)
    if not (use_k or use_p):
        return x
    sorted_x, order = x.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_x, dtype=torch.bool)
    if use_k:
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=x.device)
        drop |= torch.arange(vocab, device=x.device)[None, :] >= k[:, None]
        sorted_x = sorted_x.masked_fill(drop, _NEG_INF)
    if use_p:
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= _column(top_p, x)
    drop[:, 0] = False
    return x.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), _NEG_INF)


def gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor,
                    params: list[SamplingParams], rows: list[int]) -> list[TokenLogprobs | None]:
    """TokenLogprobs for each row in `rows`: the sampled token, then the top-N, with ranks."""
    found = token_logprobs(raw_logprobs[rows], sampled[rows], [params[i].logprobs for i in rows])
    out: list[TokenLogprobs | None] = [None] * len(params)
    for i, lp in zip(rows, found):
        out[i] = lp
    return out


def prompt_logprobs(logits: torch.Tensor, target_ids: torch.Tensor,
                    num: int) -> list[TokenLogprobs]:
    """vLLM's prompt logprobs: row i of `logits` [R, V] is the model's output at a prompt
    position, `target_ids[i]` the prompt token that follows it; the raw log_softmax of the
    row, for that token first, then the top-`num`."""
    return token_logprobs(torch.log_softmax(logits.float(), dim=-1), target_ids,
                          [num] * len(target_ids))


def token_logprobs(lp: torch.Tensor, token_ids: torch.Tensor,
                   num: list[int]) -> list[TokenLogprobs]:
    """Per row of the logprobs `lp` [R, V]: `token_ids[i]` first, then the top-`num[i]`,
    with its rank (1 + the number of tokens with a greater logprob)."""
    tok_lp = lp.gather(1, token_ids[:, None])
    tok_rank = (lp > tok_lp).sum(dim=-1) + 1
    top_lp, top_ids = lp.topk(max(num), dim=-1)
    tok, tok_lp, tok_rank = token_ids.tolist(), tok_lp[:, 0].tolist(), tok_rank.tolist()
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    return [TokenLogprobs(token_ids=[tok[j]] + top_ids[j][:n],
                          logprobs=[tok_lp[j]] + top_lp[j][:n],
                          ranks=[tok_rank[j]] + list(range(1, n + 1)))
            for j, n in enumerate(num)]
