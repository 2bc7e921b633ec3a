"""Native per-layer ops (csrc/layer_ops.c) against the torch ops they replace: RMSNorm, and
q/k norm + RoPE + the K/V cache write from the fused qkv projection; plus the native decode
kernel at the head shapes it specialises for."""

from __future__ import annotations

import pytest
import torch

from zomni.workers import native
from zomni.workers.attention import Attention
from zomni.workers.context import build_attention_metadata, set_context
from zomni.workers.layernorm import RMSNorm
from zomni.workers.rotary_embedding import apply_rotary

pytestmark = pytest.mark.skipif(not native.has_layer_ops(torch.empty(0)),
                                reason="no C compiler: the native kernels are not built")


# bf16: the kernels round where HF's modules do, but sum in another order, and RoPE rounds
# each product where torch's addcmul rounds once: a unit in the last place (2^-8) apart at most
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=2e-2)}


def _torch_rms_norm(norm: RMSNorm, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(native, "has_layer_ops", lambda *args: False)
        return norm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, dim", [(1, 8), (5, 64), (300, 512)])  # 300 x 512: threaded
def test_rms_norm_matches_torch(rows, dim, dtype, monkeypatch):
    torch.manual_seed(0)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    norm.weight.data.normal_()
    x = (torch.randn(rows, dim) * 3).to(dtype)
    strided = torch.randn(rows, 2 * dim).to(dtype)[:, :dim]  # a slice of a wider row
    heads = torch.randn(rows, 3, dim).to(dtype)  # per-head norm over the last dim
    for inputs in (x, strided, heads):
        out = norm(inputs)
        assert out.dtype == dtype
        torch.testing.assert_close(out, _torch_rms_norm(norm, inputs, monkeypatch),
                                   **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tokens, heads, kv_heads, dim", [(3, 4, 2, 8), (70, 8, 4, 64)])
def test_qkv_rope_cache_matches_torch(qk_norm, tokens, heads, kv_heads, dim, dtype,
                                      monkeypatch):
    torch.manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    angles = torch.rand(tokens, dim // 2) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)[:, None].to(dtype)
    signed_sin = torch.cat((-angles.sin(), angles.sin()), -1)[:, None].to(dtype)
    q_norm, k_norm = RMSNorm(dim, 1e-6).to(dtype), RMSNorm(dim, 1e-6).to(dtype)
    q_norm.weight.data.normal_()
    k_norm.weight.data.normal_()
    cache_rows = 4 * tokens * kv_heads
    rows = torch.randperm(cache_rows)[: tokens * kv_heads]

    k_cache = torch.zeros(cache_rows, dim, dtype=dtype)
    v_cache = torch.zeros(cache_rows, dim, dtype=dtype)
    norms = (q_norm.weight, k_norm.weight, k_norm.eps) if qk_norm else ()
    q = native.qkv_rope_cache(qkv, heads, kv_heads, cos, signed_sin, rows, k_cache, v_cache,
                              *norms)

    q_ref, k_ref, v_ref = qkv.view(tokens, heads + 2 * kv_heads, dim).split(
        [heads, kv_heads, kv_heads], dim=1)
    if qk_norm:
        q_ref = _torch_rms_norm(q_norm, q_ref, monkeypatch)
        k_ref = _torch_rms_norm(k_norm, k_ref, monkeypatch)
    assert q.dtype == dtype
    torch.testing.assert_close(q, apply_rotary(q_ref, cos, signed_sin), **TOLERANCE[dtype])
    torch.testing.assert_close(k_cache[rows].view(tokens, kv_heads, dim),
                               apply_rotary(k_ref, cos, signed_sin), **TOLERANCE[dtype])
    assert torch.equal(v_cache[rows].view(tokens, kv_heads, dim), v_ref)
    untouched = torch.ones(cache_rows, dtype=torch.bool)
    untouched[rows] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("requests", [[0, 1, 2], [0, 2]], ids=["rows", "heads"])
@pytest.mark.parametrize("heads, kv_heads, dim",
                         [(8, 4, 64), (8, 8, 128), (16, 4, 128), (12, 4, 64), (16, 1, 64)])
def test_paged_attention_specialised_shapes_match_gather_path(heads, kv_heads, dim, requests,
                                                              block_size, dtype, monkeypatch):
    """The kernel has unrolled code for head_dim 64/128 x GQA group 1/2/4, and a vector path
    for 16 scores at a time (16 / group rows x the group's heads when the group divides 16,
    else 16 rows a head), over fp32 or bf16 caches; the torch gather path in fp32 is the
    reference. Decodes and a prefill chunk (tasks of whole rows), or two decodes (a task per KV
    head), contexts ending mid-block and on a block boundary."""
    torch.manual_seed(2)
    blocks = 40
    cache = torch.randn(2, blocks, kv_heads, block_size, dim).to(dtype)
    tables, starts, lens = [[3, 7, 8], [9, 30], [5, 1, 2, 11, 12, 13, 20]], [40, 0, 111], [1, 20, 1]
    tables, starts, lens = ([x[i] for i in requests] for x in (tables, starts, lens))
    q = torch.randn(sum(lens), heads, dim).to(dtype)
    outs = []
    set_context(build_attention_metadata(lens, starts, tables, block_size=block_size))
    try:
        with torch.inference_mode():
            for cache_of_run, q_of_run in ((cache, q), (cache.float(), q.float())):
                attn = Attention(heads, kv_heads, dim, dim**-0.5)
                attn.k_cache, attn.v_cache = cache_of_run[0], cache_of_run[1]
                outs.append(attn.attend(q_of_run))
                monkeypatch.setattr(native, "has_paged_attention", lambda *shape: False)
    finally:
        set_context(None)
    out, reference = outs
    assert out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # bf16 output: 8 mantissa bits
    torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)
