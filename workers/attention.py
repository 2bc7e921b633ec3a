"""Paged attention over the step's flat batch, with torch's scaled_dot_product_attention.

KV cache of one layer (allocated once by the runner, never per step):

    k_cache, v_cache: [num_blocks, num_kv_heads_per_rank, block_size, head_dim]
    slot s = block_id * block_size + offset  <->  k_cache[block_id, :, offset]

Head-major blocks make a request's K of one head a run of block_size * head_dim contiguous
values, so the gather copies whole (block, head) runs straight into the [B, Hkv, L, D] layout
that SDPA and bmm read without a further transpose copy.

Each step first writes the new tokens' K/V at their slots, then every query reads all KV of its
request (earlier steps, prefix-cache blocks shared with other requests, and this step's tokens)
through the block tables in the step's `AttentionMetadata` (see context.py for the layout).

On the CPU in fp32 a native kernel (csrc/paged_attention.c) takes every token of the step in
one call, reading K and V through its request's block table once, causally (no masked work),
with no gather and no padding. Decode, at batch 64, context ~190 (workload W): ~1.9 ms a layer
against ~4.6 ms for gather + matmuls, which move the KV three times. Prefill chunks, against
the gather + SDPA path: 8 x 128 tokens 1.7 vs 4.1 ms a layer (`small` shape), 1 x 2048 tokens
34 vs 63 ms; head_dim 128 (Qwen3-0.6B): 1.3-1.4x, except 128 queries on a 1024-token prefix
(11 vs 9 ms). Without a C compiler the gather path runs instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zomni.workers import native
from zomni.workers.context import AttentionGroup, get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Set by the runner to views of its one KV cache tensor; plain attributes, not buffers,
        # so they are never part of the state dict.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] for the flat batch -> [T, H, D]."""
        rows = self.cache_rows()
        self.k_cache.view(-1, self.head_dim).index_copy_(0, rows, k.reshape(-1, self.head_dim))
        self.v_cache.view(-1, self.head_dim).index_copy_(0, rows, v.reshape(-1, self.head_dim))
        return self.attend(q)

    def cache_rows(self) -> torch.Tensor:
        """[T * Hkv] rows of the cache viewed as [-1, head_dim] that this step's K/V go to."""
        return get_context().write_rows(self.num_kv_heads)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] against the cache, which already holds this step's K/V -> [T, H, D]."""
        ctx = get_context()
        if self._native(q):  # every token at once, prefill chunks and decodes alike
            return native.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables,
                                          ctx.token_kv_lens, self.scale, self.sliding_window,
                                          ctx.token_request)
        if len(ctx.groups) == 1 and ctx.groups[0].query_rows is None:
            return self._attend(q, ctx.groups[0])
        out = torch.empty_like(q)
        for group in ctx.groups:  # at most two: decodes, then prefill chunks
            out[group.query_rows] = self._attend(q[group.query_rows], group)
        return out

    def _native(self, q: torch.Tensor) -> bool:
        return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
                and self.k_cache.dtype == q.dtype
                and native.has_paged_attention(self.num_heads, self.num_kv_heads, self.head_dim))

    def _attend(self, q: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """q [n, H, D], the group's query rows -> [n, H, D]."""
        if g.max_q == 1 and q.device.type == "cpu":
            return self._attend_decode_matmul(q, g)
        if g.pad_index is not None:
            padded = q.new_zeros(g.batch_size * g.max_q, self.num_heads, self.head_dim)
            padded[g.pad_index] = q
            q = padded
        q = q.reshape(g.batch_size, g.max_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self._gather(self.k_cache, g)
        v = self._gather(self.v_cache, g)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask(self.sliding_window),
                                           scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        o = o.transpose(1, 2).reshape(g.batch_size * g.max_q, self.num_heads, self.head_dim)
        return o if g.pad_index is None else o[g.pad_index]

    def _attend_decode_matmul(self, q: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """Decode group on the CPU: two batched matmuls, softmax in fp32.

        torch's CPU flash kernel is slow for one query row: at B=64, ctx 160 these matmuls
        take ~0.8x its time in fp32 and ~0.2x in bf16 (native bf16 on AVX512-BF16). The query
        heads sharing a KV head form the rows of one matmul: q [B, Hkv, group, D] @ k^T.
        """
        group = self.num_heads // self.num_kv_heads
        qg = q.reshape(g.batch_size, self.num_kv_heads, group, self.head_dim)
        k = self._gather(self.k_cache, g)
        v = self._gather(self.v_cache, g)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(self.scale)  # k: no copy
        scores.masked_fill_(~g.mask(self.sliding_window), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).view(g.batch_size, self.num_heads, self.head_dim)

    def _gather(self, cache: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """[B, Hkv, max_blocks * block_size, D], contiguous: each request's KV in order."""
        # whole (block, head) runs with index_select; advanced indexing is ~3x slower
        runs = cache.view(-1, cache.shape[2] * self.head_dim)  # [num_blocks * Hkv, bs * D]
        out = runs.index_select(0, g.gather_rows(self.num_kv_heads))
        return out.view(g.batch_size, self.num_kv_heads, -1, self.head_dim)
