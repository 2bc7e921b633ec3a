"""Paged attention: the head-major KV cache layout, the CPU paths (native kernel, and gather +
matmuls or SDPA) against SDPA per request, and the choice of dtype for `dtype="auto"`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zomni.workers import device, native
from zomni.workers.attention import Attention
from zomni.workers.context import build_attention_metadata, set_context

H, HKV, D, BS, BLOCKS = 4, 2, 8, 4, 16


def _attention_with_cache(dtype: torch.dtype, window: int | None = None) -> Attention:
    attn = Attention(H, HKV, D, D**-0.5, sliding_window=window)
    cache = torch.randn(2, BLOCKS, HKV, BS, D, dtype=dtype)
    attn.k_cache, attn.v_cache = cache[0], cache[1]
    return attn


def _reference(attn: Attention, q, tables, kv_lens):
    """Per request, K/V read by hand from the head-major blocks, then plain SDPA."""
    out = []
    for i, (blocks, n) in enumerate(zip(tables, kv_lens)):
        first = max(0, n - attn.sliding_window) if attn.sliding_window else 0
        k = torch.cat([attn.k_cache[b] for b in blocks], dim=1)[:, first:n]  # [Hkv, n, D]
        v = torch.cat([attn.v_cache[b] for b in blocks], dim=1)[:, first:n]
        o = F.scaled_dot_product_attention(q[i, :, None].float(), k.float(), v.float(),
                                           scale=attn.scale, enable_gqa=True)
        out.append(o[:, 0])
    return torch.stack(out)


@pytest.fixture(params=["native", "gather"])
def decode_path(request, monkeypatch):
    """Runs a test with the native kernel, then with the torch gather path."""
    if request.param == "native" and not native.has_paged_attention():
        pytest.skip("no C compiler: the native kernel is not built")
    if request.param == "gather":
        monkeypatch.setattr(native, "has_paged_attention", lambda *shape: False)
    return request.param


def test_decode_writes_head_major_slots_and_matches_reference(decode_path):
    torch.manual_seed(0)
    attn = _attention_with_cache(torch.float32)
    tables, starts = [[3, 7], [9], [5, 1, 2]], [5, 2, 9]
    md = build_attention_metadata([1, 1, 1], starts, tables, block_size=BS)
    q, k, v = torch.randn(3, H, D), torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    set_context(md)
    try:
        with torch.inference_mode():
            out = attn(q, k, v)
            padded_q = q.view(3, 1, H, D).transpose(1, 2)
            sdpa_out = F.scaled_dot_product_attention(
                padded_q, attn._gather(attn.k_cache, md.groups[0]),
                attn._gather(attn.v_cache, md.groups[0]), attn_mask=md.groups[0].mask(),
                scale=attn.scale, enable_gqa=True)[:, :, 0]
    finally:
        set_context(None)
    # token 0 at position 5 -> block tables[0][1] = 7, offset 1, every head
    torch.testing.assert_close(attn.k_cache[7, :, 1], k[0])
    torch.testing.assert_close(attn.v_cache[2, :, 1], v[2])
    ref = _reference(attn, q, tables, [s + 1 for s in starts])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_out, ref, rtol=1e-5, atol=1e-5)  # the gather


def test_sliding_window_decode_matches_reference(decode_path):
    torch.manual_seed(2)
    attn = _attention_with_cache(torch.float32, window=3)
    tables, starts = [[3, 7], [9, 4, 2], [6]], [6, 10, 1]
    md = build_attention_metadata([1, 1, 1], starts, tables, block_size=BS)
    q, k, v = torch.randn(3, H, D), torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    set_context(md)
    try:
        with torch.inference_mode():
            out = attn(q, k, v)
    finally:
        set_context(None)
    ref = _reference(attn, q, tables, [s + 1 for s in starts])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_mixed_step_matches_reference(decode_path, window):
    """Prefill chunks (one after a cached prefix) and decodes in one step: every token attends
    causally to its own request's KV, through the native kernel or the grouped gather path."""
    torch.manual_seed(3)
    attn = _attention_with_cache(torch.float32, window=window)
    tables, starts, lens = [[3, 7, 11], [9], [5, 1, 2], [0, 6]], [0, 2, 4, 5], [6, 1, 5, 1]
    md = build_attention_metadata(lens, starts, tables, block_size=BS)
    total = sum(lens)
    q, k, v = torch.randn(total, H, D), torch.randn(total, HKV, D), torch.randn(total, HKV, D)
    set_context(md)
    try:
        with torch.inference_mode():
            out = attn(q, k, v)
    finally:
        set_context(None)
    rows = [(req, start + i) for req, (start, n) in enumerate(zip(starts, lens)) for i in range(n)]
    ref = _reference(attn, q, [tables[req] for req, _ in rows], [pos + 1 for _, pos in rows])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bf16_decode_close_to_fp32(decode_path):
    """bf16 caches: the native kernel (computing in fp32), or the gather + matmul path."""
    torch.manual_seed(1)
    attn = _attention_with_cache(torch.bfloat16)
    tables, starts = [[3, 7], [9, 4]], [6, 4]
    md = build_attention_metadata([1, 1], starts, tables, block_size=BS)
    q = torch.randn(2, H, D, dtype=torch.bfloat16)
    k = torch.randn(2, HKV, D, dtype=torch.bfloat16)
    v = torch.randn(2, HKV, D, dtype=torch.bfloat16)
    set_context(md)
    try:
        with torch.inference_mode():
            out = attn(q, k, v)
    finally:
        set_context(None)
    ref = _reference(attn, q, tables, [s + 1 for s in starts])
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_auto_dtype(tmp_path, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu, str(tmp_path))[0] == "float32"
    assert device.resolve_dtype("auto", cuda, str(tmp_path))[0] == "bfloat16"
    assert device.resolve_dtype("float16", cpu, str(tmp_path)) == ("float16", "asked for")
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert device.resolve_dtype("auto", cpu, str(tmp_path))[0] == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    dtype, why = device.resolve_dtype("auto", cpu, str(tmp_path))
    assert dtype == "float32" and "no native bf16" in why
