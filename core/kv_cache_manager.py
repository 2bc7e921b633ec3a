"""Paged KV cache bookkeeping: block tables, ref counts, the free queue and the prefix cache.

The engine core owns no KV memory; it decides which block ids each request's tokens go to and
the workers hold the tensors. Token `i` of a request lives in block `table[i // block_size]` at
slot `i % block_size`:

    all_token_ids (block_size = 4):  | t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 |
    block table:                     [     17      ,      3      ,  42   ]
                                       full: hashed  full: hashed  partial: never hashed

Prefix caching: the hash of a FULL block is sha256(parent block hash ‖ msgpack(its token ids)),
so it names the whole prefix up to and including that block, and is the same in every run.
`cached_block_hash_to_block` maps such hashes to blocks whose KV holds exactly those tokens.
A cached block stays reusable after its request frees it, until the block is evicted.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from .request import Request

_encode = msgspec.msgpack.Encoder().encode


def hash_block_tokens(parent_block_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Stable hash of a full block given the hash of the block before it (None for the first)."""
    return hashlib.sha256((parent_block_hash or b"") + _encode(token_ids)).digest()


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0  # requests whose table holds this block
    block_hash: bytes | None = None  # set while the block is in the prefix cache


class KVCacheManager:
    """Allocates fixed-size KV blocks to requests, sharing full blocks through the prefix cache.

    Invariants:
    - A block is in `free_block_queue` iff `ref_cnt == 0`. Free blocks may still be cached
      (hashed): they are reused on a prefix hit (taken out of the queue) until evicted.
    - Eviction order: the queue is popped from its head, so the least recently freed block is
      reused first. `free()` appends a request's blocks in REVERSE order, so its tail blocks are
      evicted before its head blocks; a hit needs the whole chain from block 0, and the head of a
      prefix is the part most likely to be shared.

          head (evicted first)                                     tail (evicted last)
          [ older frees ... | req A: a3 a2 a1 a0 | req B: b1 b0 ]

    - Evicting a block removes its hash from `cached_block_hash_to_block`, so the map only ever
      points to blocks whose KV still holds the hashed tokens.
    - Only the first block seen with a given hash is registered; a duplicate (two requests that
      computed the same prefix at once) stays unhashed and is simply freed.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # OrderedDict as the free queue: O(1) pop from the head, append at the tail and removal
        # from the middle (a prefix hit on a free block).
        self.free_block_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks)
        self.cached_block_hash_to_block: dict[bytes, KVCacheBlock] = {}
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_block_hashes: dict[str, list[bytes]] = {}  # hashes of its full blocks so far
        self.num_cached_block: dict[str, int] = {}  # leading blocks of the request already hashed
        self.num_queried_tokens = 0  # prefix-cache stats, over admissions (see allocate_slots)
        self.num_hit_tokens = 0

    # ---- queries --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests; cached-but-free blocks count as free."""
        return (self.num_blocks - len(self.free_block_queue)) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / tokens looked up, over all admissions."""
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest chain of cached full blocks that prefixes `request.all_token_ids`.

        Returns (block ids, number of tokens they hold). The chain never covers the last token:
        at least one token must be computed so that the model produces logits to sample from.
        Pure lookup: nothing changes until `allocate_slots` takes the blocks.
        """
        if not self.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit_ids: list[int] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block = self.cached_block_hash_to_block.get(block_hash)
            if block is None:
                break
            hit_ids.append(block.block_id)
        return hit_ids, len(hit_ids) * self.block_size

    # ---- allocation -----------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's block table so its next `num_new_tokens` tokens have slots.

        `computed_blocks` are prefix-cache hits from `get_computed_blocks` for a request being
        admitted (its table is empty and `num_computed_tokens == 0`); pass a list, even an empty
        one, on admission so the prefix-cache stats count it. Layout after the call:

            | < computed > | < hits (computed_blocks) > | < num_new_tokens > | free slots |
            |<----------- request.num_computed_tokens + len(hits) * block_size + new -------->|
            |<-- existing table -->|<------------- returned block ids --------------------->|

        Hits are taken out of the free queue (if free) and their ref counts bumped; new blocks
        come from the head of the free queue (evicting their cached hash). Returns the block ids
        appended to the table (hits first), or None when there are not enough free blocks, in
        which case nothing has changed.
        """
        hits = [self.blocks[i] for i in computed_blocks or ()]
        table = self.req_to_blocks.get(request.request_id, [])
        num_tokens = (request.num_computed_tokens + len(hits) * self.block_size
                      + num_new_tokens)
        num_needed = -(-num_tokens // self.block_size) - len(table) - len(hits)
        # Hits that are free would be counted twice: as a hit and as a block to hand out.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        if num_needed > self.num_free_blocks - num_free_hits:
            return None
        for block in hits:
            if block.ref_cnt == 0:
                del self.free_block_queue[block.block_id]
            block.ref_cnt += 1
        new_blocks = hits + [self._pop_free_block() for _ in range(max(num_needed, 0))]
        self.req_to_blocks[request.request_id] = table + new_blocks
        if computed_blocks is not None:
            if self.enable_prefix_caching:
                self.num_queried_tokens += request.num_tokens
                self.num_hit_tokens += len(hits) * self.block_size
            # Hit blocks are cached already; hashing resumes after them.
            self.num_cached_block[request.request_id] = len(table) + len(hits)
        return [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that became full once `num_computed_tokens` have KV.

        Call only after those tokens' KV is written (after the step ran), so a request that hits
        the cache never reads a block another request is still filling.
        """
        if not self.enable_prefix_caching:
            return
        table = self.req_to_blocks.get(request.request_id)
        if table is None:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self.num_cached_block.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for block, block_hash in zip(table[start:num_full], hashes[start:num_full]):
            if block.block_hash is None and block_hash not in self.cached_block_hash_to_block:
                block.block_hash = block_hash
                self.cached_block_hash_to_block[block_hash] = block
        self.num_cached_block[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's table; blocks nobody else holds go to the free queue's tail,
        last block first (see the eviction order in the class docstring)."""
        for block in reversed(self.req_to_blocks.pop(request.request_id, [])):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_block_queue[block.block_id] = block
        self.num_cached_block.pop(request.request_id, None)
        self.req_to_block_hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is held by a request,
        since a running request's blocks must keep matching its hashing progress."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached_block_hash_to_block.values():
            block.block_hash = None
        self.cached_block_hash_to_block.clear()
        return True

    # ---- internals ------------------------------------------------------------------------

    def _pop_free_block(self) -> KVCacheBlock:
        _, block = self.free_block_queue.popitem(last=False)
        if block.block_hash is not None:  # evict: its KV is about to be overwritten
            if self.cached_block_hash_to_block.get(block.block_hash) is block:
                del self.cached_block_hash_to_block[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _block_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """Hashes of the request's first `num_blocks` full blocks, extended incrementally
        (valid forever because a request's tokens are append-only)."""
        hashes = self.req_to_block_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_blocks:
            tokens = request.all_token_ids
            bs = self.block_size
            for i in range(len(hashes), num_blocks):
                parent = hashes[-1] if hashes else None
                hashes.append(hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]
