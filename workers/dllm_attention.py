"""Bidirectional attention of masked-diffusion LMs over a flat batch of segments, with
per-sequence KV caches (dense, or in blocks of the paged KV cache).

A forward's rows are the concatenated windows of its segments, one per sequence (a request,
or its unconditional CFG branch):

    rows     [ seg 0: positions [s0, e0) | seg 1: positions [s1, e1) | ... ]
    with a cache        the window's K/V is stored at [start, end) of the segment's cache
                        first, then its keys are the stored ones of [0 | start, end | length):
                        cached [0, start) (read_prefix) + its own window + cached [end, length)
                        (read_suffix), one gather in position order
    without             its keys are its window's own

Every query attends to every key of its segment, none of another's: there is no mask.
Segments alike (as many rows, the same keys' range length) share one SDPA call, batched; in a
step of many requests at the same phase (all refreshing, all on a block's later steps) that is
one call a layer. A window's positions are recomputed at every step that reads the cache, so
storing their fresh K/V never overwrites a value a later step reads (`forward_window`: a
block's later steps write only the positions they recompute, and each block's first step
rewrites all). A sequence's K/V (K after RoPE) lives in one of two stores with the same two
methods (`write` a window, read back the `stored` K/V of a range of positions):

    DenseKV   its own tensors, head-major as SDPA reads them:
              k, v: [num_layers, kv_heads_per_rank, length, head_dim]
    PagedKV   blocks of the worker's paged KV cache (the serving path), position p of layer l
              at cache[0 (K) / 1 (V), l, :, block_ids[p // block_size], p % block_size]:
              cache: [2, num_layers, kv_heads_per_rank, num_blocks, block_size, head_dim]
              (heads before blocks, so a sequence's blocks gather into [heads, positions, dim]
              with one copy)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zomni.workers.rotary_embedding import apply_rotary


@dataclass
class DenseKV:
    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [Hkv, n, D] at positions [start, start + n)."""
        self.k[layer][:, start: start + k.shape[1]] = k
        self.v[layer][:, start: start + v.shape[1]] = v

    def stored(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K/V [Hkv, end - start, D] of positions [start, end) (views)."""
        return self.k[layer][:, start:end], self.v[layer][:, start:end]


@dataclass
class PagedKV:
    """One sequence's K/V in blocks of the worker's paged KV cache (layout in the module
    docstring): `block_ids` [ceil(length / block_size)] on the cache's device."""

    cache: torch.Tensor
    block_ids: torch.Tensor
    length: int

    @property
    def block_size(self) -> int:
        return self.cache.shape[4]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [Hkv, n, D] at positions [start, start + n)."""
        positions = torch.arange(start, start + k.shape[1], device=self.block_ids.device)
        blocks, slots = self.block_ids[positions // self.block_size], positions % self.block_size
        self.cache[0, layer][:, blocks, slots] = k
        self.cache[1, layer][:, blocks, slots] = v

    def stored(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K/V [Hkv, end - start, D] of positions [start, end): the blocks that
        hold them gathered (one copy), the range cut out of them."""
        size = self.block_size
        first, last = start // size, -(-end // size)
        ids = self.block_ids[first:last]
        cut = slice(start - first * size, end - first * size)
        k, v = self.cache[0, layer][:, ids], self.cache[1, layer][:, ids]  # [Hkv, m, bs, D]
        return k.flatten(1, 2)[:, cut], v.flatten(1, 2)[:, cut]


@dataclass
class Segment:
    """One sequence's rows of a forward: positions [start, end), and which keys they see. With
    a `kv`, the window's K/V is stored there (see the module docstring)."""

    start: int
    end: int
    kv: DenseKV | PagedKV | None = None
    read_prefix: bool = False  # attend to the cached K/V of [0, start) too
    read_suffix: bool = False  # and of [end, kv.length)

    @property
    def num_rows(self) -> int:
        return self.end - self.start

    def key_range(self) -> tuple[int, int]:
        """The positions whose K/V its queries attend to."""
        return (0 if self.read_prefix else self.start,
                self.kv.length if self.read_suffix else self.end)


def segment_positions(segments: list[Segment], device: torch.device | str) -> torch.Tensor:
    """[T] position of every row of the flat batch."""
    return torch.cat([torch.arange(s.start, s.end, device=device) for s in segments])


def _stored_keys(segments: list[Segment], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored K/V [B, Hkv, m, D] of the key ranges (all of one length m) of `segments`:
    one gather for sequences in blocks of one paged cache, read from 0."""
    ranges = [s.key_range() for s in segments]
    first = segments[0].kv
    if (isinstance(first, PagedKV) and all(a == 0 for a, _ in ranges)
            and all(isinstance(s.kv, PagedKV) and s.kv.cache is first.cache
                    for s in segments)):
        m = ranges[0][1]
        ids = torch.stack([s.kv.block_ids[: -(-m // first.block_size)] for s in segments])
        k, v = first.cache[0, layer][:, ids], first.cache[1, layer][:, ids]  # [Hkv, B, n, bs, D]
        return (k.flatten(2, 3)[:, :, :m].transpose(0, 1),
                v.flatten(2, 3)[:, :, :m].transpose(0, 1))
    stored = [s.kv.stored(layer, a, b) for s, (a, b) in zip(segments, ranges)]
    return torch.stack([k for k, _ in stored]), torch.stack([v for _, v in stored])


class BidirectionalAttention(nn.Module):
    """One layer's attention. The linear layers around it run on every row at once; attention
    runs once per group of alike segments (see the module docstring)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx

    def forward(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        """qkv [T, (H + 2 Hkv) D] of this rank's heads -> [T, H D]."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qk = apply_rotary(qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim),
                          cos, sin)  # q and k heads in one pass
        q, k = qk[:, :heads], qk[:, heads:]
        v = qkv[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
        out = qkv.new_empty(qkv.shape[0], heads, dim)
        groups: dict[tuple, list[tuple[Segment, slice]]] = defaultdict(list)
        row = 0
        for seg in segments:
            rows = slice(row, row + seg.num_rows)
            row += seg.num_rows
            reads = seg.kv is not None and (seg.read_prefix or seg.read_suffix)
            if seg.kv is not None:
                seg.kv.write(self.layer_idx, seg.start, k[rows].transpose(0, 1),
                             v[rows].transpose(0, 1))
            a, b = seg.key_range() if reads else (seg.start, seg.end)
            groups[(seg.num_rows, reads, b - a)].append((seg, rows))
        for (_, reads, _), members in groups.items():
            qs = torch.stack([q[rows] for _, rows in members]).transpose(1, 2)  # [B, H, n, D]
            if reads:
                ks, vs = _stored_keys([seg for seg, _ in members], self.layer_idx)
            else:
                ks = torch.stack([k[rows] for _, rows in members]).transpose(1, 2)
                vs = torch.stack([v[rows] for _, rows in members]).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.head_dim**-0.5,
                                               enable_gqa=heads != kv_heads).transpose(1, 2)
            for j, (_, rows) in enumerate(members):
                out[rows] = o[j]
        return out.flatten(1)
