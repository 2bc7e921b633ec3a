"""KVCacheManager: ref counts, prefix hits, eviction order, failed allocations, usage."""

import copy

from zomni.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from zomni.core.request import Request
from zomni.proto import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, client_id=b"c", prompt_token_ids=list(tokens),
                   sampling=SamplingParams(), max_tokens=8)


def _admit(kv: KVCacheManager, req: Request) -> list[int]:
    """What the scheduler does for a new request whose whole prompt fits the budget."""
    hits, num_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - num_hit, hits) is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_tokens)
    return kv.get_block_ids(req.request_id)


def _free_order(kv: KVCacheManager) -> list[int]:
    return list(kv.free_block_queue)


def test_hash_is_stable_across_runs():
    h0 = hash_block_tokens(None, [1, 2, 3, 4])
    assert h0.hex() == "00afa70de0cae09d04afd72b87d452b72bb8d2fb6ab91e2dba1f934e0df6ac69"
    assert hash_block_tokens(h0, [5, 6, 7, 8]).hex() == (
        "b415440f25794e556c880d1b750056130a533efa93e9d2fc92e404faf15c08dc")
    assert hash_block_tokens(h0, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])


def test_allocate_grows_table_and_usage():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = _req("a", range(6))
    assert kv.allocate_slots(req, 6) == [0, 1]
    assert kv.usage == 0.2
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2) == []  # tokens 6, 7 fit in block 1
    req.num_computed_tokens = 8
    assert kv.allocate_slots(req, 1) == [2]
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert [kv.blocks[i].ref_cnt for i in range(4)] == [1, 1, 1, 0]
    kv.free(req)
    assert kv.usage == 0.0 and kv.get_block_ids("a") == []
    assert all(b.ref_cnt == 0 for b in kv.blocks)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = _req("a", range(8))
    _admit(kv, a)
    b = _req("b", list(range(8)) + list(range(50, 59)))  # hits a's 2 blocks, needs 3 more
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    before = (copy.deepcopy(kv.blocks), _free_order(kv), dict(kv.req_to_blocks),
              dict(kv.cached_block_hash_to_block), kv.num_queried_tokens)
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits) is None
    after = (kv.blocks, _free_order(kv), dict(kv.req_to_blocks),
             dict(kv.cached_block_hash_to_block), kv.num_queried_tokens)
    assert [(x.block_id, x.ref_cnt, x.block_hash) for x in before[0]] == [
        (x.block_id, x.ref_cnt, x.block_hash) for x in after[0]]
    assert before[1:4] == after[1:4] and before[4] == after[4]
    assert "b" not in kv.req_to_blocks


def test_prefix_hit_shares_full_blocks_only():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = _req("a", range(10))  # blocks: [0-3] [4-7] [8 9 . .]
    a_blocks = _admit(kv, a)
    assert len(kv.cached_block_hash_to_block) == 2  # the partial block is not cached
    b = _req("b", list(range(9)) + [77, 78])
    hits, num_hit = kv.get_computed_blocks(b)
    assert hits == a_blocks[:2] and num_hit == 8
    new = kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert new[:2] == a_blocks[:2] and new[2] not in a_blocks
    assert [kv.blocks[i].ref_cnt for i in a_blocks] == [2, 2, 1]
    kv.free(a)
    assert [kv.blocks[i].ref_cnt for i in a_blocks] == [1, 1, 0]
    assert kv.usage == 3 / 16  # b's blocks only; a's freed partial block is free
    assert kv.num_hit_tokens == 8 and kv.num_queried_tokens == 10 + 11
    assert kv.hit_rate == 8 / 21


def test_prefix_hit_never_covers_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    _admit(kv, _req("a", range(12)))
    assert kv.get_computed_blocks(_req("b", range(8)))[1] == 4
    assert kv.get_computed_blocks(_req("c", range(9)))[1] == 8
    assert kv.get_computed_blocks(_req("d", range(12)))[1] == 8
    assert kv.get_computed_blocks(_req("e", range(13)))[1] == 12
    assert kv.get_computed_blocks(_req("f", [1] + list(range(1, 12))))[1] == 0


def test_hit_on_freed_blocks_takes_them_out_of_free_queue():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", range(9))
    a_blocks = _admit(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 8
    b = _req("b", range(9))
    hits, num_hit = kv.get_computed_blocks(b)
    assert hits == a_blocks[:2] and num_hit == 8
    kv.allocate_slots(b, 1, hits)
    assert kv.num_free_blocks == 5
    assert not set(hits) & set(kv.free_block_queue)


def test_eviction_order_lru_tail_first_and_hash_removed():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a, b = _req("a", range(6)), _req("b", range(10, 14))
    a_blocks, b_blocks = _admit(kv, a), _admit(kv, b)  # a: 0 1 2, b: 3 4
    assert (a_blocks, b_blocks) == ([0, 1, 2], [3, 4])
    kv.free(a)
    kv.free(b)
    # Block 5 was never used; then a's blocks tail first, then b's.
    assert _free_order(kv) == [5, 2, 1, 0, 4, 3]
    assert len(kv.cached_block_hash_to_block) == 5
    c = _req("c", range(100, 104))
    assert kv.allocate_slots(c, 4) == [5, 2]  # evicts a's last block
    assert kv.blocks[2].block_hash is None and len(kv.cached_block_hash_to_block) == 4
    again = _req("a2", list(range(6)) + [9])
    assert kv.get_computed_blocks(again) == ([0, 1], 4)  # chain broken at the evicted block
    assert kv.get_computed_blocks(_req("b2", list(range(10, 14)) + [9])) == ([3, 4], 4)


def test_duplicate_prefix_is_not_registered_twice():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = _req("a", range(5)), _req("b", range(5))
    kv.allocate_slots(a, 5, [])
    kv.allocate_slots(b, 5, [])  # admitted in the same step: no hit yet
    kv.cache_blocks(a, 5)
    kv.cache_blocks(b, 5)
    (block,) = kv.cached_block_hash_to_block.values()
    assert block.block_id == kv.get_block_ids("a")[0]
    assert kv.blocks[kv.get_block_ids("b")[0]].block_hash is None


def test_cache_blocks_incrementally_during_decode():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", range(3))
    kv.allocate_slots(a, 3, [])
    kv.cache_blocks(a, 3)
    assert not kv.cached_block_hash_to_block
    for token in (3, 4):  # decode: the sampled token's KV is computed in the next step
        a.output_token_ids.append(token)
        a.num_computed_tokens = a.num_tokens - 1
        kv.allocate_slots(a, 1)
        kv.cache_blocks(a, a.num_tokens)
    assert len(kv.cached_block_hash_to_block) == 1
    assert kv.get_computed_blocks(_req("x", range(6))) == (kv.get_block_ids("a")[:1], 4)


def test_reset_prefix_cache_and_disabled_caching():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = _req("a", range(9))
    _admit(kv, a)
    assert not kv.reset_prefix_cache()  # a still holds blocks
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert not kv.cached_block_hash_to_block and all(b.block_hash is None for b in kv.blocks)
    assert kv.get_computed_blocks(_req("b", range(9))) == ([], 0)

    off = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    _admit(off, _req("a", range(9)))
    assert off.get_computed_blocks(_req("b", range(9))) == ([], 0)
    assert not off.cached_block_hash_to_block and off.hit_rate == 0.0
