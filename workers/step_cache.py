"""Step cache: at denoising steps where the denoiser's input barely changed, reuse the block
stack's last residual instead of running the blocks (TeaCache, First-Block-Cache), inside the
one batched forward of continuous batching.

Decision unit: a *branch*, one classifier-free-guidance half of one request (its n image rows,
deciding together). A guided request has two, cond and uncond, each with its own state and
decisions; the same request gives the same decisions alone or batched with others, since no
state is shared. diffusers' cache hooks and ParaAttention decide once per batch (both CFG
halves, every prompt); our metric is the same mean, over the branch's rows instead, so an
unguided request alone decides as they do.

One forward over B rows (every branch of every scheduled request), split by decision:

    x = embed(latents)                                       all rows
    TeaCache branches: m = block 0's modulated input of x    decide (before any block runs)
    h = block 0 (x)                                          rows but TeaCache skips
    FBCache branches: r = h - x                              decide
    y = blocks 1 .. L-1 (h)                                  rows that compute
    out = y                                                  rows that compute
        = h + R_fb     R_fb  = last computed (y - h)         FBCache skips
        = x + R_tea    R_tea = last computed (y - x)         TeaCache skips
    final norm and projection (the model's own)              all rows

Policies, at step s of a branch's num_steps (rel_l1(a, ref) = mean|a - ref| / mean|ref|):
  - TeaCache (ali-vilab/TeaCache): acc += rescale(rel_l1(m, m_prev)); skip while acc <
    threshold; acc = 0 whenever it computes; m_prev = m at every step. `rescale` is the
    model's polynomial (`teacache_rescale` on the model class).
  - FBCache (ParaAttention's FBCache, diffusers' FirstBlockCache): skip when
    rel_l1(r, r_ref) < threshold; r_ref = r on computed steps only.
  - Both: the first and the last step compute (TeaCache's published rule; for FBCache the
    first has no reference, the last is our choice, so the final denoise is never stale);
    at most `max_consecutive_skips` skips in a row; threshold 0 never skips.

Tensor parallelism: after each block's all-reduce every rank holds the same image stream, so
all compute the same metrics; they are all-reduced anyway (one [G, 2] all-reduce per cache
type per step), and a decision is a function of those sums and of state built from them, so
every rank takes the same branch even where kernels differ per rank; a rank that took the
other branch would deadlock the next block's all-reduce. Reading the sums back is one device
sync per step and cache type.

Memory: per branch two tensors of its rows' image stream [n, N, D] (reference and residual).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from zomni.proto.sampling import StepCacheParams
from zomni.workers.parallel_state import all_reduce

FBCACHE, TEACACHE = "fbcache", "teacache"
IDENTITY_RESCALE = (1.0, 0.0)  # x, as a polynomial: for models with no published fit

Hidden = tuple[torch.Tensor | None, ...]  # a block's carried streams, the image stream first


class CachedDenoiser(Protocol):
    """What a denoiser offers the step cache (SD3Transformer2DModel, DiTTransformer2DModel)."""

    transformer_blocks: nn.ModuleList
    teacache_rescale: tuple[float, ...]  # highest power first, as numpy.poly1d

    def block_step(self, block: nn.Module, hidden: Hidden, cond: Hidden) -> Hidden:
        """One block over rows: streams `hidden` (x first), per-row conditioning `cond`."""

    def teacache_input(self, x: torch.Tensor, cond: Hidden) -> torch.Tensor:
        """Block 0's modulated image input (TeaCache's signal) for rows `x`."""


@dataclass(eq=False)
class BranchCache:
    """One branch's state across its steps; `decide` is called exactly once per step."""

    kind: str  # FBCACHE | TEACACHE
    threshold: float
    max_consecutive_skips: int | None
    num_steps: int
    rescale: tuple[float, ...]
    previous: torch.Tensor | None = None  # TeaCache: m_prev; FBCache: r_ref
    residual: torch.Tensor | None = None  # R_tea or R_fb (module docstring)
    accumulated: float = 0.0
    consecutive_skips: int = 0
    computed: list[bool] = field(default_factory=list)  # per step done: did the blocks run

    @classmethod
    def create(cls, params: StepCacheParams, num_steps: int,
               rescale: Sequence[float]) -> BranchCache:
        return cls(params.type, params.threshold, params.max_consecutive_skips, num_steps,
                   tuple(rescale))

    @property
    def num_computed_steps(self) -> int:
        return sum(self.computed)

    def decide(self, metric: float | None) -> bool:
        """Whether this step runs the blocks; `metric` is rel_l1 against `previous` (None:
        no reference yet). Records the decision and updates the counters."""
        step = len(self.computed)
        if self.kind == TEACACHE and metric is not None:
            self.accumulated += _polyval(self.rescale, metric)
        value = self.accumulated if self.kind == TEACACHE else metric
        skip = (0 < step < self.num_steps - 1 and metric is not None
                and self.residual is not None and self.threshold > 0
                and value < self.threshold
                and (self.max_consecutive_skips is None
                     or self.consecutive_skips < self.max_consecutive_skips))
        if skip:
            self.consecutive_skips += 1
        else:
            self.consecutive_skips, self.accumulated = 0, 0.0
        self.computed.append(not skip)
        return not skip


def _polyval(coefficients: tuple[float, ...], x: float) -> float:
    out = 0.0
    for c in coefficients:  # Horner, highest power first
        out = out * x + c
    return out


@dataclass(eq=False)
class CacheGroup:
    """Rows [start, stop) of the forward's batch: one branch (None: uncached, computes)."""

    start: int
    stop: int
    branch: BranchCache | None
    compute: bool = True  # this step's decision, set by StepCache.run

    @property
    def kind(self) -> str | None:
        return None if self.branch is None else self.branch.kind


def relative_l1(pairs: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[float | None]:
    """rel_l1(a, ref) for each pair (None where ref is None), agreed by every TP rank: the
    per-pair sums are all-reduced together, so every rank reads the same numbers."""
    if not pairs:
        return []
    a0 = pairs[0][0]
    zero = torch.zeros((), dtype=torch.float32, device=a0.device)
    stats = torch.stack([torch.stack([(a.float() - ref.float()).abs().mean(),
                                      ref.float().abs().mean()]) if ref is not None
                         else torch.stack([zero, zero]) for a, ref in pairs])
    sums = all_reduce(stats).tolist()  # the one device sync of a decision
    return [None if ref is None else (num / den if den > 0 else float("inf"))
            for (_, ref), (num, den) in zip(pairs, sums)]


class StepCache:
    """The step cache's plan of one forward: `groups` cover the batch rows in order."""

    def __init__(self, groups: list[CacheGroup]):
        self.groups = sorted(groups, key=lambda g: g.start)
        self.num_rows = self.groups[-1].stop if self.groups else 0

    def run(self, model: CachedDenoiser, hidden: Hidden, cond: Hidden) -> torch.Tensor:
        """The image stream after the last block, for every row (see the module docstring)."""
        blocks, x = model.transformer_blocks, hidden[0]
        for g in self.groups:
            g.compute = True
        tea = [g for g in self.groups if g.kind == TEACACHE]
        if tea:
            rows = _Rows(tea, self.num_rows, x.device)
            m = model.teacache_input(_take((x,), rows.index)[0], _take(cond, rows.index))
            parts = [m[rows.slice(g)] for g in tea]
            metrics = relative_l1([(p, g.branch.previous) for p, g in zip(parts, tea)])
            for g, p, metric in zip(tea, parts, metrics):
                g.compute = g.branch.decide(metric)
                g.branch.previous = p

        # Every rank has made the same decisions, so a stage with no rows is skipped on all.
        head = _Rows([g for g in self.groups if g.compute], self.num_rows, x.device)
        h, h_cond = hidden, cond
        if head.groups:
            h_in, h_cond = _take(hidden, head.index), _take(cond, head.index)
            h = model.block_step(blocks[0], h_in, h_cond)
            fb = [g for g in head.groups if g.kind == FBCACHE]
            r = [h[0][head.slice(g)] - h_in[0][head.slice(g)] for g in fb]
            metrics = relative_l1([(r0, g.branch.previous) for g, r0 in zip(fb, r)])
            for g, r0, metric in zip(fb, r, metrics):
                g.compute = g.branch.decide(metric)
                if g.compute:
                    g.branch.previous = r0

        tail = _Rows([g for g in head.groups if g.compute], head.num_rows, x.device, head)
        y = h
        if tail.groups:
            y, y_cond = _take(h, tail.index), _take(h_cond, tail.index)
            for block in blocks[1:]:
                y = model.block_step(block, y, y_cond)
        return self._assemble(x, h[0], y[0], head, tail)

    def _assemble(self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, head: _Rows,
                  tail: _Rows) -> torch.Tensor:
        """Every row's output; the computing branches' residuals are stored on the way."""
        for g in tail.groups:
            if g.branch is not None:
                base = h[head.slice(g)] if g.kind == FBCACHE else x[g.start:g.stop]
                g.branch.residual = y[tail.slice(g)] - base
        if len(tail.groups) == len(self.groups):
            return y  # every row computed: no copy
        out = torch.empty_like(x)
        for g in self.groups:
            if g.compute:
                out[g.start:g.stop] = y[tail.slice(g)]
            elif g.kind == FBCACHE:
                torch.add(h[head.slice(g)], g.branch.residual, out=out[g.start:g.stop])
            else:
                torch.add(x[g.start:g.stop], g.branch.residual, out=out[g.start:g.stop])
        return out


class _Rows:
    """A subset of groups as rows of a tensor that holds `num_rows` rows (the whole batch, or
    the rows of `within`): `index` selects them (None: all, in order, nothing to copy) and
    `slice(g)` is group g's rows in the selection."""

    def __init__(self, groups: list[CacheGroup], num_rows: int, device: torch.device,
                 within: _Rows | None = None):
        self.groups = groups
        self._slices: dict[int, slice] = {}
        offset, spans = 0, []
        for g in groups:
            n = g.stop - g.start
            start = within.slice(g).start if within is not None else g.start
            spans.append((start, start + n))
            self._slices[id(g)] = slice(offset, offset + n)
            offset += n
        self.num_rows = offset
        self.index = None
        if offset != num_rows:  # a strict subset (groups are in row order, never repeated)
            self.index = torch.tensor([i for a, b in spans for i in range(a, b)],
                                      dtype=torch.long, device=device)

    def slice(self, g: CacheGroup) -> slice:
        return self._slices[id(g)]


def _take(tensors: Hidden, index: torch.Tensor | None) -> Hidden:
    """Rows `index` of every tensor (None entries stay None: a stream that ended)."""
    if index is None:
        return tensors
    return tuple(None if t is None else t.index_select(0, index) for t in tensors)
