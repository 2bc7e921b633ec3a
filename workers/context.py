"""Per-step attention metadata, built once per step by the runner and read by every layer.

The model runs one forward over the flattened batch: the scheduled tokens of all requests, in
plan order, prefill chunks and decodes mixed. Request i contributes `query_lens[i]` tokens at
positions [num_computed[i], num_computed[i] + query_lens[i]) and attends to all of its KV
positions [0, kv_len[i]) with kv_len = num_computed + query_len, read through its block table.

For attention, requests are split into at most two groups, each run as one padded batch:

    decode group   (query_len == 1): q [B, H, 1, D]      vs K/V [B, Hkv, max_blocks * bs, D]
    prefill group  (query_len >  1): q [B, H, max_q, D]  vs K/V [B, Hkv, max_blocks * bs, D]

K/V of a group are gathered from the paged cache [num_blocks, Hkv, bs, D] by (block, head):
one index_select gives [B, Hkv, max_blocks, bs, D] = [B, Hkv, max_kv, D], contiguous, which is
the request's positions 0 .. max_blocks * bs - 1 in order (see `AttentionGroup.gather_rows`).
Padding (short block tables point at block 0, short queries repeat their last position) is
removed by the mask `kv_position <= q_position`, which is also the causal mask. Padded query
rows attend like the request's last token, so they stay finite; their outputs are dropped.

The native CPU kernel needs no groups: token t reads its request's row of `block_tables`
(`token_request[t]`) up to `token_kv_lens[t]`, for all tokens of the step in one call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AttentionGroup:
    """Requests attended together as one padded batch of shape [B, heads, max_q, max_kv]."""

    query_rows: torch.Tensor | None  # [n] rows of the flat batch; None: all rows, in order
    pad_index: torch.Tensor | None  # [n] slot of each row in the padded [B * max_q]; None: same
    batch_size: int
    max_q: int
    block_tables: torch.Tensor  # [B, max_blocks], padded with block 0
    q_positions: torch.Tensor  # [B, max_q], padding repeats the request's last position
    kv_positions: torch.Tensor  # [max_blocks * block_size]
    kv_lens: torch.Tensor  # [B] KV length of each request, this step's tokens included
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _gather_rows: dict[int, torch.Tensor] = field(default_factory=dict)

    def gather_rows(self, num_kv_heads: int) -> torch.Tensor:
        """[B * Hkv * max_blocks] rows of the cache viewed as [num_blocks * Hkv, bs * D]:
        (block_tables[b, j], head h) for b, h, j in order, so one index_select gives K of the
        group as [B, Hkv, max_blocks * bs, D], contiguous. Shared by all layers of a step."""
        if num_kv_heads not in self._gather_rows:
            heads = torch.arange(num_kv_heads, device=self.block_tables.device)
            rows = self.block_tables[:, None, :] * num_kv_heads + heads[None, :, None]
            self._gather_rows[num_kv_heads] = rows.flatten()
        return self._gather_rows[num_kv_heads]

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean [B, 1, max_q, max_kv]: True where a query may attend to a key."""
        if sliding_window not in self._masks:
            q = self.q_positions[:, None, :, None]
            k = self.kv_positions[None, None, None, :]
            allowed = k <= q
            if sliding_window is not None:  # HF: keys in (q - window, q]
                allowed &= k > q - sliding_window
            self._masks[sliding_window] = allowed
        return self._masks[sliding_window]


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each token of the flat batch
    slot_mapping: torch.Tensor  # [T] cache slot written by each token
    block_size: int
    block_tables: torch.Tensor  # [R, max_blocks] every request's, padded with block 0
    token_request: torch.Tensor  # [T] request (row of block_tables) of each token
    build_groups: Callable[[], list[AttentionGroup]]
    _groups: list[AttentionGroup] | None = None
    _write_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    _kv_lens: torch.Tensor | None = None
    _host_slots: np.ndarray | None = None  # slot_mapping's numpy source

    @property
    def groups(self) -> list[AttentionGroup]:
        """Decodes, then prefill chunks (each present only when the step has some): built on
        first use, since the native CPU kernel needs none."""
        if self._groups is None:
            self._groups = self.build_groups()
        return self._groups

    @property
    def token_kv_lens(self) -> torch.Tensor:
        """[T] KV length each token attends to: its position + 1 (causal)."""
        if self._kv_lens is None:
            self._kv_lens = self.positions + 1
        return self._kv_lens

    def write_rows(self, num_kv_heads: int) -> torch.Tensor:
        """[T * Hkv] rows of the cache viewed as [num_blocks * Hkv * bs, D] that token t,
        head h writes: ((block * Hkv + h) * bs + offset). Shared by all layers of a step."""
        if num_kv_heads not in self._write_rows:
            # on the host in numpy, as the rest of the metadata: torch's small ops cost ~10 us
            # each, and this runs every step
            bs, slots = self.block_size, self._host_slots
            rows = ((slots[:, None] // bs * num_kv_heads + np.arange(num_kv_heads)) * bs
                    + slots[:, None] % bs)
            self._write_rows[num_kv_heads] = torch.from_numpy(rows.ravel()).to(
                self.slot_mapping.device)
        return self._write_rows[num_kv_heads]


def _ceil_div(a: np.ndarray | int, b: int):
    return -(-a // b)


def build_attention_metadata(query_lens: list[int], num_computed: list[int],
                             block_tables: list[list[int]], block_size: int,
                             device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for one step; list i describes request i of the flat batch (plan order)."""
    q_lens = np.asarray(query_lens, dtype=np.int64)
    starts = np.asarray(num_computed, dtype=np.int64)
    kv_lens = starts + q_lens
    cu = np.zeros(len(q_lens) + 1, dtype=np.int64)
    np.cumsum(q_lens, out=cu[1:])
    req_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
    positions = np.arange(cu[-1]) - cu[:-1][req_of_token] + starts[req_of_token]

    table = np.zeros((len(q_lens), int(_ceil_div(kv_lens.max(), block_size))), dtype=np.int64)
    for i, blocks in enumerate(block_tables):
        needed = int(_ceil_div(kv_lens[i], block_size))
        if len(blocks) < needed:
            raise ValueError(f"request {i} needs {needed} KV blocks for {kv_lens[i]} tokens, "
                             f"its block table has {len(blocks)}")
        table[i, :needed] = blocks[:needed]
    slots = table[req_of_token, positions // block_size] * block_size + positions % block_size

    def build_groups() -> list[AttentionGroup]:
        is_decode = q_lens == 1
        return [_build_group(np.nonzero(sel)[0], q_lens, starts, cu, table, block_size, device)
                for sel in (is_decode, ~is_decode) if sel.any()]

    return AttentionMetadata(positions=torch.from_numpy(positions).to(device),
                             slot_mapping=torch.from_numpy(slots).to(device),
                             block_size=block_size,
                             block_tables=torch.from_numpy(table).to(device),
                             token_request=torch.from_numpy(req_of_token).to(device),
                             build_groups=build_groups, _host_slots=slots)


def _build_group(idx: np.ndarray, q_lens: np.ndarray, starts: np.ndarray, cu: np.ndarray,
                 table: np.ndarray, block_size: int, device) -> AttentionGroup:
    ql = q_lens[idx]
    batch, max_q, n = len(idx), int(ql.max()), int(ql.sum())
    num_blocks = int(_ceil_div((starts[idx] + ql).max(), block_size))
    local_cu = np.zeros(batch + 1, dtype=np.int64)
    np.cumsum(ql, out=local_cu[1:])
    offset_in_req = np.arange(n) - np.repeat(local_cu[:-1], ql)
    rows = np.repeat(cu[idx], ql) + offset_in_req
    pad_index = np.repeat(np.arange(batch) * max_q, ql) + offset_in_req
    q_pos = starts[idx, None] + np.minimum(np.arange(max_q)[None, :], ql[:, None] - 1)

    covers_all = batch == len(q_lens) and n == cu[-1]
    unpadded = n == batch * max_q

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return AttentionGroup(
        query_rows=None if covers_all and unpadded else tensor(rows),
        pad_index=None if unpadded else tensor(pad_index),
        batch_size=batch, max_q=max_q,
        block_tables=tensor(table[idx, :num_blocks]),
        q_positions=tensor(q_pos),
        kv_positions=torch.arange(num_blocks * block_size, device=device),
        kv_lens=tensor(starts[idx] + ql),
    )


_CONTEXT: AttentionMetadata | None = None


def set_context(metadata: AttentionMetadata | None) -> None:
    global _CONTEXT
    _CONTEXT = metadata


def get_context() -> AttentionMetadata:
    if _CONTEXT is None:
        raise RuntimeError("attention metadata is not set; the model runner sets it per step")
    return _CONTEXT
