"""Paged attention over the step's flat batch, with torch's scaled_dot_product_attention.

KV cache of one layer (allocated once by the runner, never per step):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads_per_rank, head_dim]
    slot s = block_id * block_size + offset  <->  k_cache.view(-1, Hkv, D)[s]

Each step first writes the new tokens' K/V at their slots, then every query reads all KV of its
request (earlier steps, prefix-cache blocks shared with other requests, and this step's tokens)
through the block tables in the step's `AttentionMetadata` (see context.py for the layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        ctx = get_context()
        self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, ctx.slot_mapping, k)
        self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, ctx.slot_mapping, v)
        if len(ctx.groups) == 1 and ctx.groups[0].query_rows is None:
            return self._attend(q, ctx.groups[0])
        out = torch.empty_like(q)
        for group in ctx.groups:  # at most two: decodes, then prefill chunks
            out[group.query_rows] = self._attend(q[group.query_rows], group)
        return out

    def _attend(self, q: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """q [n, H, D], the group's query rows -> [n, H, D]."""
        if g.pad_index is not None:
            padded = q.new_zeros(g.batch_size * g.max_q, self.num_heads, self.head_dim)
            padded[g.pad_index] = q
            q = padded
        q = q.view(g.batch_size, g.max_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = self._gather(self.k_cache, g)
        v = self._gather(self.v_cache, g)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask(self.sliding_window),
                                           scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        o = o.transpose(1, 2).reshape(g.batch_size * g.max_q, self.num_heads, self.head_dim)
        return o if g.pad_index is None else o[g.pad_index]

    def _gather(self, cache: torch.Tensor, g: AttentionGroup) -> torch.Tensor:
        """[B, Hkv, max_blocks * block_size, D]: each request's KV positions in order."""
        # index_select copies whole blocks; advanced indexing (cache[tables]) is ~3x slower
        blocks = cache.index_select(0, g.block_tables.flatten())  # [B * max_blocks, bs, Hkv, D]
        return blocks.view(g.batch_size, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
