"""Parallel layers: each weight_loader takes exactly its rank's shard (a fake rank 1 of 2 and of 4,
from tensors and from lazy safetensors slices); RoPE and attention metadata against hand values."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zomni.workers import cpu_gemm, native
from zomni.workers.context import build_attention_metadata
from zomni.workers.embed_head import ParallelLMHead, VocabParallelEmbedding
from zomni.workers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from zomni.workers.rotary_embedding import RotaryEmbedding, apply_rotary


def _full(*shape: int) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(*shape)


def test_column_and_row_parallel_take_their_slice():
    w = _full(8, 6)
    col = ColumnParallelLinear(6, 8, bias=True, tp_rank=1, tp_size=2)
    col.weight.weight_loader(col.weight, w)
    col.bias.weight_loader(col.bias, torch.arange(8.0))
    assert torch.equal(col.weight, w[4:]) and torch.equal(col.bias, torch.arange(4.0, 8.0))

    row = RowParallelLinear(8, 6, bias=True, tp_rank=1, tp_size=2)
    row.weight.weight_loader(row.weight, w.T.contiguous())
    row.bias.weight_loader(row.bias, torch.arange(6.0))
    assert torch.equal(row.weight, w.T[:, 4:])
    assert torch.equal(row.bias, torch.arange(6.0))  # replicated; only rank 0 adds it
    x = torch.randn(3, 4)
    assert torch.equal(row(x), x @ row.weight.T)  # rank 1: no bias (world size 1: no reduce)


def test_merged_column_parallel_shards_each_part():
    gate, up = _full(8, 3), _full(8, 3) + 100
    layer = MergedColumnParallelLinear(3, [8, 8], tp_rank=1, tp_size=2)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    assert torch.equal(layer.weight, torch.cat([gate[4:], up[4:]]))


@pytest.mark.parametrize("tp_size, kv_rows", [(2, slice(2, 4)), (4, slice(0, 2))])
def test_qkv_parallel_shards_heads_and_replicates_kv(tp_size, kv_rows):
    """4 query heads, 2 KV heads, head size 2: tp 2 splits KV heads, tp 4 replicates them
    (rank 1 of 4 shares KV head 0 with rank 0)."""
    q, k, v = _full(8, 3), _full(4, 3) + 100, _full(4, 3) + 200
    layer = QKVParallelLinear(3, 2, 4, 2, bias=True, tp_rank=1, tp_size=tp_size)
    for shard_id, t in (("q", q), ("k", k), ("v", v)):
        layer.weight.weight_loader(layer.weight, t, shard_id)
        layer.bias.weight_loader(layer.bias, t[:, 0], shard_id)
    q_rows = slice(8 // tp_size, 2 * 8 // tp_size)
    expected = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])
    assert torch.equal(layer.weight, expected)
    assert torch.equal(layer.bias, expected[:, 0])


def test_vocab_parallel_embedding_pads_last_rank():
    emb = _full(5, 2)  # vocab 5 over 2 ranks: rank 0 rows 0..2, rank 1 rows 3..4 + 1 pad row
    layer = VocabParallelEmbedding(5, 2, tp_rank=1, tp_size=2)
    layer.weight.weight_loader(layer.weight, emb)
    assert torch.equal(layer.weight, torch.cat([emb[3:], torch.zeros(1, 2)]))
    ids = torch.tensor([0, 3, 4])
    assert torch.equal(layer(ids), torch.stack([torch.zeros(2), emb[3], emb[4]]))
    head = ParallelLMHead(5, 2)
    head.weight.weight_loader(head.weight, emb)
    h = torch.randn(2, 2)
    torch.testing.assert_close(head(h), h @ emb.T)


def test_weight_loaders_read_lazy_safetensors_slices(tmp_path):
    w = _full(8, 6)
    save_file({"w": w}, tmp_path / "x.safetensors")
    col = ColumnParallelLinear(6, 8, tp_rank=1, tp_size=2)
    row = RowParallelLinear(6, 8, tp_rank=1, tp_size=2)
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        col.weight.weight_loader(col.weight, f.get_slice("w"))
        row.weight.weight_loader(row.weight, f.get_slice("w"))
    assert torch.equal(col.weight, w[4:]) and torch.equal(row.weight, w[:, 3:])


def test_shape_mismatch_is_an_error():
    layer = ColumnParallelLinear(6, 8, tp_rank=0, tp_size=2)
    with pytest.raises(ValueError, match="expected 8"):
        layer.weight.weight_loader(layer.weight, _full(10, 6))
    with pytest.raises(ValueError, match="not divisible"):
        QKVParallelLinear(8, 2, 4, 3, tp_size=2)


def test_rope_matches_transformers_llama3_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32,
                         rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16,
                                          "rope_theta": 500000.0})
    positions = torch.tensor([0, 1, 5, 100, 3000])
    cos, sin = RotaryEmbedding(config, 32)(positions, torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
    torch.testing.assert_close(cos, ref_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin[0], rtol=0, atol=1e-6)


@pytest.fixture(params=["native", "onednn"])
def kernel(request, monkeypatch):
    """Which packed kernel cpu_gemm picks: ours (csrc/gemm.c, gemm_bf16.c) or oneDNN's."""
    if request.param == "native" and not native.has_gemm(torch.empty(1, 1)):
        pytest.skip("no AVX-512 or no C compiler: the native GEMM is not built")
    if request.param == "onednn":
        if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            pytest.skip("no oneDNN in this torch")
        monkeypatch.setattr(native, "has_gemm", lambda weight: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_dense(dtype, kernel):
    if kernel == "native" and not native.has_gemm(torch.empty(1, 1, dtype=dtype)):
        pytest.skip("no AVX512-BF16: the native bf16 GEMM is not built")
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 96, bias=True, tp_rank=0, tp_size=1).to(dtype)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    head = ParallelLMHead(100, 64, tp_rank=0, tp_size=1).to(dtype)
    head.weight.data.normal_()
    x = torch.randn(37, 64, dtype=dtype)
    want = x.double() @ layer.weight.double().T + layer.bias.double()
    want_head = (x.double() @ head.weight.double().T)[:, :100]
    layer.pack(batch_hint=16)
    head.pack(batch_hint=16)
    assert layer.packed is not None and layer.weight.numel() == 0  # the packed copy replaces it
    assert isinstance(layer.packed, cpu_gemm.Panels) == (kernel == "native")
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
    torch.testing.assert_close(layer(x).double(), want, **tol)
    torch.testing.assert_close(head(x).double(), want_head, **tol)
    assert layer(x[:0]).shape == (0, 96)


def test_packed_epilogues_match_unfused(kernel):
    torch.manual_seed(0)
    gate_up = MergedColumnParallelLinear(32, [48, 48], bias=True, tp_rank=0, tp_size=1)
    down = RowParallelLinear(48, 32, bias=True, tp_rank=0, tp_size=1)
    for p in (gate_up.weight, gate_up.bias, down.weight, down.bias):
        p.data.normal_()
    x, residual = torch.randn(5, 32), torch.randn(5, 32)
    gate, up = torch.nn.functional.linear(x, gate_up.weight, gate_up.bias).chunk(2, dim=-1)
    hidden = torch.nn.functional.silu(gate) * up
    want = residual + torch.nn.functional.linear(hidden, down.weight, down.bias)
    torch.testing.assert_close(down(gate_up.silu_and_mul(x), residual), want)  # unpacked
    gate_up.pack(batch_hint=8)
    down.pack(batch_hint=8)
    torch.testing.assert_close(gate_up.silu_and_mul(x), hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(down(hidden, residual), want, rtol=1e-4, atol=1e-4)


def test_apply_rotary_matches_rotate_half():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16)
    rope = RotaryEmbedding(config, 16)
    positions = torch.tensor([0, 3, 17])
    x = torch.randn(3, 5, 16)
    cos, sin = rope(positions, torch.float32)
    rotated = torch.cat((-x[..., 8:], x[..., :8]), dim=-1)  # HF rotate_half
    want = x * cos[:, None] + rotated * sin[:, None]
    torch.testing.assert_close(apply_rotary(x, *rope.tables(positions, torch.float32)), want)


def test_attention_metadata_layout():
    """Request 0: decode at position 5 (blocks [7, 2]); request 1: chunk of 3 tokens at
    positions 2..4 (blocks [4, 9]); block size 4."""
    md = build_attention_metadata([1, 3], [5, 2], [[7, 2], [4, 9, 11]], block_size=4)
    assert md.positions.tolist() == [5, 2, 3, 4]
    assert md.slot_mapping.tolist() == [2 * 4 + 1, 4 * 4 + 2, 4 * 4 + 3, 9 * 4 + 0]
    decode, prefill = md.groups
    assert decode.query_rows.tolist() == [0] and decode.pad_index is None
    assert decode.block_tables.tolist() == [[7, 2]]
    assert decode.mask()[0, 0, 0].tolist() == [True] * 6 + [False] * 2
    assert prefill.query_rows.tolist() == [1, 2, 3] and prefill.max_q == 3
    assert prefill.block_tables.tolist() == [[4, 9]]
    assert prefill.mask()[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0, 0, 0],
                                                    [1, 1, 1, 1, 0, 0, 0, 0],
                                                    [1, 1, 1, 1, 1, 0, 0, 0]]
    assert prefill.mask(sliding_window=2)[0, 0, 2].int().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="needs 2 KV blocks"):
        build_attention_metadata([3], [2], [[1]], block_size=4)
