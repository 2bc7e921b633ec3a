"""Decoding of masked-diffusion LMs: which masked positions a denoising step commits, and to what.

A request's sequence is its prompt, then `gen_length` mask tokens decoded block by block:

    [ prompt | block 0 | block 1 | ... | block n-1 ]       block_length positions each
               └ the current block: its masked positions, in position order, are the step's
                 candidates; positions past it are never unmasked

Each step, the model's logits at the candidates go to `choose_commits`, a pure function of
them, the step's index within its block and the request's generator; it returns the
candidates to commit and their tokens. `DiffusionLMState` holds the rest (the tokens, the
block and step counters) and says which rows the step's forward computes (`window`), so one
forward can serve many requests, each at its own block and step (see `dllm_step.py`).

    remasking       token of a candidate                  confidence         commits per step
    low_confidence  argmax, or Gumbel-max at T > 0        p(token)           LLaDA schedule
    random          argmax, or Gumbel-max at T > 0        uniform draw       LLaDA schedule
    origin          Dream's sample_tokens                 -                  each w.p. 1 - s/t
    maskgit_plus    Dream's sample_tokens                 p(token)           Dream schedule
    topk_margin     Dream's sample_tokens                 p1 - p2            Dream schedule
    entropy         Dream's sample_tokens                 -entropy           Dream schedule

- LLaDA (ML-GSAI/LLaDA generate.py, `generate`): `steps` split evenly over the blocks; a
  block's positions spread evenly over its steps, the remainder to the first steps
  (`get_num_transfer_tokens`); the most confident candidates are committed. At T > 0 the token
  is argmax(exp(logits) / (-log u)^T), u uniform, in float64 (`add_gumbel_noise`); p(token)
  is the softmax of the raw logits, here in float64 as Fast-dLLM computes it. Optional
  classifier-free guidance (`cfg_scale`): the unconditional branch has its prompt masked and
  the logits are uncond + (cfg_scale + 1) (cond - uncond) (`guided_logits`).
- Dream (Dream-org/Dream generation_utils.py, `_sample` and `sample_tokens`): timesteps
  linspace(1, eps, steps + 1) (per block, as Fast-dLLM splits them); step i of n masked
  candidates commits int(n (1 - s/t)) by confidence, all of them at the last step ("origin"
  commits each candidate with probability 1 - s/t instead). Tokens: logits / T, top-p, top-k,
  softmax, then a categorical draw at T > 0, else argmax.
- threshold (NVlabs/Fast-dLLM generate.py, `get_transfer_index`): instead of a schedule, the
  most confident candidate and every candidate with confidence >= threshold; a block takes as
  many steps as it needs.

KV caches (Fast-dLLM `generate_with_prefix_cache` / `generate_with_dual_cache`): a block's
first step runs the whole sequence and stores its K/V; its later steps recompute only the block
and what follows it (prefix), or the block alone (dual), reading the stored K/V of the rest
(`forward_window`).

Two deliberate departures from the reference loops:
- Random numbers are drawn for the candidates only (one row each, in position order), with the
  request's own generator; the LLaDA and Fast-dLLM loops draw noise for every position of the
  sequence ([L, V] float64 per step), of which only the candidates' rows are ever used. What
  is decoded has the same distribution; the random stream differs.
- The mask token is never drawn as a token (argmax, Gumbel-max and the categorical draw skip
  it; confidences still come from the full distribution), so every committed position holds a
  real token and a block ends with its schedule. A reference loop that draws it leaves that
  position masked for a later step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zomni.proto import SamplingParams
from zomni.proto.diffusion import (
    DIFFUSION_CACHES,
    LLADA_REMASKING,
    REMASKING,
    THRESHOLD_REMASKING,
)


@dataclass(frozen=True)
class DecodingParams:
    """One request's decoding as the workers run it: its `proto.sampling.DiffusionParams`
    with every default resolved (`from_request`), plus the generated length and the sampling
    fields it reads. The names are DiffusionParams' and SamplingParams'."""

    gen_length: int = 128
    block_length: int = 32
    steps: int = 128  # over all blocks, split evenly (unused with a threshold)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    top_p: float | None = None  # Dream's algorithms only
    top_k: int | None = None  # Dream's algorithms only
    threshold: float | None = None  # Fast-dLLM parallel decoding instead of a schedule
    cfg_scale: float = 0.0  # classifier-free guidance (LLaDA), without a KV cache
    eps: float = 1e-3  # Dream's last timestep
    cache: str = "none"  # "prefix" / "dual": Fast-dLLM's KV caches, refreshed at each block

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.gen_length >= 1 and self.block_length >= 1
             and self.gen_length % self.block_length == 0,
             f"gen_length ({self.gen_length}) must be a positive multiple of block_length "
             f"({self.block_length})")
        need(self.steps >= 1 and self.steps % self.num_blocks == 0,
             f"steps ({self.steps}) must be a positive multiple of the number of blocks "
             f"({self.num_blocks})")
        need(self.remasking in REMASKING,
             f"unknown remasking {self.remasking!r}; one of {', '.join(REMASKING)}")
        need(math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0, got {self.temperature}")
        dream = self.remasking not in LLADA_REMASKING
        need(self.top_p is None or (dream and 0 < self.top_p <= 1),
             "top_p must be in (0, 1] and applies to Dream's remasking only")
        need(self.top_k is None or (dream and self.top_k >= 1),
             "top_k must be >= 1 and applies to Dream's remasking only")
        need(self.threshold is None or (self.remasking in THRESHOLD_REMASKING
                                        and 0 < self.threshold <= 1),
             f"threshold must be in (0, 1] and applies to {', '.join(THRESHOLD_REMASKING)}")
        need(math.isfinite(self.cfg_scale) and self.cfg_scale >= 0
             and (self.cfg_scale == 0 or self.cache == "none"),
             "cfg_scale must be >= 0, and guidance runs without a KV cache only")
        need(0 < self.eps < 1, f"eps must be in (0, 1), got {self.eps}")
        need(self.cache in DIFFUSION_CACHES,
             f"unknown cache {self.cache!r}; one of {', '.join(DIFFUSION_CACHES)}")

    @classmethod
    def from_request(cls, sampling: SamplingParams, gen_length: int) -> DecodingParams:
        """From a request the engine core resolved (`resolve_diffusion`): `sampling.diffusion`
        complete. top_p 1 and top_k 0 / -1 (SamplingParams' "off") are None here."""
        d = sampling.diffusion
        if d is None or d.block_length is None or d.remasking is None or d.cache is None:
            raise ValueError(f"unresolved diffusion parameters: {d}")
        return cls(gen_length=gen_length, block_length=d.block_length,
                   steps=d.steps or gen_length, remasking=d.remasking,
                   temperature=sampling.temperature,
                   top_p=sampling.top_p if sampling.top_p < 1 else None,
                   top_k=sampling.top_k if sampling.top_k > 0 else None,
                   threshold=d.threshold, cfg_scale=d.cfg_scale, cache=d.cache)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


# ---- the step's decision ----------------------------------------------------------------------


def llada_transfer_counts(num_masked: int, steps: int) -> list[int]:
    """Tokens committed at each of a block's `steps` (LLaDA's get_num_transfer_tokens)."""
    base, remainder = divmod(num_masked, steps)
    return [base + 1] * remainder + [base] * (steps - remainder)


def dream_timesteps(steps: int, eps: float) -> torch.Tensor:
    """[steps + 1] float32, from 1 down to eps (Dream's `timesteps`)."""
    return torch.linspace(1, eps, steps + 1)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """LLaDA's classifier-free guidance."""
    return uncond + (cfg_scale + 1) * (cond - uncond)


def choose_commits(params: DecodingParams, logits: torch.Tensor, step: int, mask_token_id: int,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens): which rows of `logits` [n, V] (the candidates, in position order) this
    step commits, and their tokens. `step` counts from 0 at the block's first step; draws come
    from `generator` (on the logits' device; None: torch's default generator)."""
    if params.remasking == "origin":
        return _origin(params, logits, step, mask_token_id, generator)
    if params.remasking in LLADA_REMASKING:
        tokens, confidence = _llada_proposals(params, logits, mask_token_id, generator)
    else:
        tokens, confidence = _dream_proposals(params, logits, mask_token_id, generator)
    if params.threshold is not None:
        chosen = confidence >= params.threshold
        chosen[torch.argmax(confidence)] = True  # always at least the most confident one
        rows = chosen.nonzero().flatten()
    else:
        rows = torch.topk(confidence, _scheduled_count(params, logits.shape[0], step)).indices
    return rows, tokens[rows]


def _scheduled_count(params: DecodingParams, num_masked: int, step: int) -> int:
    steps = params.steps_per_block
    if step >= steps - 1:
        return num_masked  # the last step commits whatever is left
    if params.remasking in LLADA_REMASKING:
        return min(llada_transfer_counts(params.block_length, steps)[step], num_masked)
    t, s = dream_timesteps(steps, params.eps)[step: step + 2]
    # Dream's float32 arithmetic: mask_index.sum() / batch * (1 - s / t), truncated
    return int(torch.tensor(num_masked, dtype=torch.float32) * (1 - s / t))


def _argmax_except(scores: torch.Tensor, token: int) -> torch.Tensor:
    """argmax over the last dim that is never `token` (a row it wins takes its runner-up)."""
    best = scores.argmax(-1)
    hit = best == token
    if hit.any():
        rows = scores[hit]  # a copy
        rows[:, token] = -math.inf
        best[hit] = rows.argmax(-1)
    return best


def _llada_proposals(params: DecodingParams, logits: torch.Tensor, mask_token_id: int,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits
    if params.temperature > 0:  # Gumbel-max in float64: low precision hurts quality (LLaDA)
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator,
                           device=logits.device)
        scores = logits.double().exp() / (-torch.log(noise)) ** params.temperature
    tokens = _argmax_except(scores, mask_token_id)
    if params.remasking == "random":
        confidence = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    else:
        probs = torch.softmax(logits.double(), dim=-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, confidence


def _top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Dream's nucleus filter: keep the smallest prefix of the sorted tokens whose mass
    exceeds top_p (the first token always), fill the rest with the dtype's minimum."""
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    remove = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1]))[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def _dream_proposals(params: DecodingParams, logits: torch.Tensor, mask_token_id: int,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's sample_tokens: (tokens, confidence as the algorithm defines it)."""
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_p is not None and params.top_p < 1:
        logits = _top_p_logits(logits, params.top_p)
    if params.top_k is not None:
        logits = _top_k_logits(logits, params.top_k)
    probs = torch.softmax(logits, dim=-1)
    if params.temperature > 0:  # torch.distributions.Categorical(probs).sample()
        draw = probs.clone()
        draw[:, mask_token_id] = 0
        tokens = torch.multinomial(draw / draw.sum(-1, keepdim=True), 1, replacement=True,
                                   generator=generator).squeeze(-1)
    else:
        tokens = _argmax_except(probs, mask_token_id)
    if params.remasking == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        confidence = top2[:, 0] - top2[:, 1]
    elif params.remasking == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    else:
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, confidence


def _origin(params: DecodingParams, logits: torch.Tensor, step: int, mask_token_id: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's "origin": each candidate is committed with probability 1 - s/t (1 at the last
    step), its token drawn as sample_tokens draws it."""
    steps = params.steps_per_block
    t, s = dream_timesteps(steps, params.eps)[step: step + 2] if step < steps - 1 else (1, 0)
    chosen = torch.rand(logits.shape[0], generator=generator, device=logits.device) < 1 - s / t
    rows = chosen.nonzero().flatten()
    if rows.numel() == 0:
        return rows, rows
    tokens, _ = _dream_proposals(params, logits[rows], mask_token_id, generator)
    return rows, tokens


# ---- one request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The positions [start, end) a step's forward computes for one request, and the cached
    keys it reads besides its own: [0, start) with `read_prefix`, [end, length) with
    `read_suffix`. With a cache, the window's K/V is stored (`dllm_attention`)."""

    start: int
    end: int
    read_prefix: bool = False
    read_suffix: bool = False


def forward_window(cache: str, length: int, block_start: int, block_end: int, step: int,
                   logits_shift: int) -> Window:
    """The window of a request's next step (Fast-dLLM's `generate`,
    `generate_with_prefix_cache`, `generate_with_dual_cache`):

        cache none              [0, length), every step
        prefix / dual, step 0   [0, length), K/V stored: the block's refresh
        prefix, later steps     [block_start - shift, length), reading the cached [0, start)
        dual, later steps       [block_start - shift, block_end), reading [0, start) and
                                [block_end, length)

    A shifted model (Dream) reads the logits of the block's first position at block_start - 1,
    so its window starts one row earlier, and that row is recomputed rather than cached.
    """
    if cache == "none" or step == 0:
        return Window(0, length)
    start = block_start - logits_shift
    if cache == "prefix":
        return Window(start, length, read_prefix=True)
    return Window(start, block_end, read_prefix=True, read_suffix=True)


class DiffusionLMState:
    """One request's sequence and where its decoding stands (tokens on the CPU).

    Per step: `window()` says which rows to compute, `logit_rows(window)` which of them give
    the candidates' logits (in `masked_positions()` order), `branch_tokens()` the sequences
    to run (two with guidance: conditional, then unconditional); `update(logits)` commits.
    """

    def __init__(self, prompt_token_ids: Sequence[int], params: DecodingParams,
                 mask_token_id: int, logits_shift: int = 0,
                 generator: torch.Generator | None = None):
        if len(prompt_token_ids) == 0:
            raise ValueError("a masked-diffusion LM needs a prompt of at least one token")
        self.params = params
        self.mask_token_id = mask_token_id
        self.logits_shift = logits_shift
        self.generator = generator
        self.num_prompt_tokens = len(prompt_token_ids)
        self.tokens = torch.full((self.num_prompt_tokens + params.gen_length,), mask_token_id,
                                 dtype=torch.long)
        self.tokens[: self.num_prompt_tokens] = torch.as_tensor(list(prompt_token_ids))
        # progress: num_committed_blocks catches up with params.num_blocks, one block at a time
        self.num_committed_blocks = 0  # also the current block's index
        self.step = 0  # steps done in the current block
        self.num_forwards = 0

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    @property
    def done(self) -> bool:
        return self.num_committed_blocks == self.params.num_blocks

    @property
    def block_start(self) -> int:
        return self.num_prompt_tokens + self.num_committed_blocks * self.params.block_length

    @property
    def block_end(self) -> int:
        return self.block_start + self.params.block_length

    def masked_positions(self) -> torch.Tensor:
        """The step's candidates: positions of the current block still masked, ascending."""
        block = self.tokens[self.block_start: self.block_end]
        return (block == self.mask_token_id).nonzero().flatten() + self.block_start

    def window(self) -> Window:
        return forward_window(self.params.cache, self.length, self.block_start, self.block_end,
                              self.step, self.logits_shift)

    def logit_rows(self, window: Window) -> torch.Tensor:
        """Rows of `window` whose logits are the candidates'."""
        return self.masked_positions() - self.logits_shift - window.start

    def branch_tokens(self) -> list[torch.Tensor]:
        if self.params.cfg_scale == 0:
            return [self.tokens]
        uncond = self.tokens.clone()
        uncond[: self.num_prompt_tokens] = self.mask_token_id
        return [self.tokens, uncond]

    def update(self, logits: torch.Tensor) -> bool:
        """Commit this step's choice from the candidates' logits [n, V] (guided already);
        True when that completes the current block."""
        positions = self.masked_positions()
        rows, tokens = choose_commits(self.params, logits, self.step, self.mask_token_id,
                                      self.generator)
        self.tokens[positions[rows.cpu()]] = tokens.cpu()
        self.step += 1
        self.num_forwards += 1
        if (self.tokens[self.block_start: self.block_end] == self.mask_token_id).any():
            return False
        self.num_committed_blocks += 1
        self.step = 0
        return True

    def block_token_ids(self, block: int) -> list[int]:
        start = self.num_prompt_tokens + block * self.params.block_length
        return self.tokens[start: start + self.params.block_length].tolist()

    def generated_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:].tolist()
