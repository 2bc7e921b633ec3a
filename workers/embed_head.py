"""Vocabulary-parallel embedding and LM head.

The vocabulary is split in contiguous ranges of `ceil(vocab / tp)` rows; the last rank's range
is padded with zero rows that no checkpoint row maps to:

    rank 0: rows [0, per)   rank 1: rows [per, 2 per)   ...   (per = ceil(vocab / tp))

Embedding: each rank looks up the ids in its range (others give zeros), then all-reduce.
LM head: each rank computes logits for its range, then all-gather and cut the padding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zomni.workers import cpu_gemm
from zomni.workers.parallel_state import (
    all_gather,
    all_reduce,
    full_shape,
    get_tp_rank,
    get_tp_size,
    shard,
)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__()
        self.tp_rank = get_tp_rank() if tp_rank is None else tp_rank
        self.tp_size = get_tp_size() if tp_size is None else tp_size
        self.num_embeddings = num_embeddings
        self.per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.per_rank
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)
        # zeros, not empty: the padding rows are never loaded and must not produce NaN logits
        self.weight = nn.Parameter(torch.zeros(self.per_rank, embedding_dim),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        if full_shape(loaded)[0] != self.num_embeddings:
            raise ValueError(f"checkpoint has {full_shape(loaded)[0]} vocabulary rows, "
                             f"the config says {self.num_embeddings}")
        n = self.vocab_end - self.vocab_start
        part = shard(loaded, 0, self.vocab_start, n)
        if tuple(part.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"embedding width {tuple(part.shape)} != {tuple(param.shape)}")
        param.data[:n].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the full vocabulary; callers pass only the rows that sample."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        self.packed: cpu_gemm.Packed | None = None

    def pack(self, batch_hint: int) -> None:
        """Add a packed copy of the weight (CPU only; see cpu_gemm). The dense weight
        stays: it may be the embedding's too."""
        if cpu_gemm.can_pack(self.weight):
            self.packed = cpu_gemm.pack(self.weight, batch_hint)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = cpu_gemm.linear(hidden_states, self.weight, None, self.packed)
        if self.tp_size > 1:
            logits = all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
