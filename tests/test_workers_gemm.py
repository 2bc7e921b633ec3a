"""The native GEMMs against F.linear: fp32 (csrc/gemm.c) and bf16 (csrc/gemm_bf16.c), every
row-tile and panel-group size, tail panels, odd K, bias, epilogues, and rows with a stride."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zomni.workers import native

pytestmark = pytest.mark.skipif(not native.has_gemm(torch.empty(1, 1)),
                                reason="no AVX-512 or no C compiler: the native GEMM is not built")

TOL = dict(rtol=1e-4, atol=1e-4)


# rows cover the 8/4/2/1-row tiles and their mixes; outputs cover 1, 2 and 3-panel groups,
# part-filled tail panels and fewer panels than threads
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 15, 16, 29, 300])
@pytest.mark.parametrize("out_features, in_features", [(1, 3), (16, 8), (40, 64), (97, 33),
                                                         (1024, 512)])
def test_gemm_matches_linear(rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features)
    w, x = torch.randn(out_features, in_features), torch.randn(rows, in_features)
    panels = native.pack_panels(w)
    assert panels.shape == (-(-out_features // 16), in_features, 16)
    torch.testing.assert_close(native.gemm(x, panels, out_features), F.linear(x, w), **TOL)


@pytest.mark.parametrize("epilogue", ["none", "silu", "mul", "add"])
def test_gemm_bias_and_epilogues(epilogue):
    torch.manual_seed(0)
    w, bias = torch.randn(70, 48), torch.randn(70)
    x, other = torch.randn(2, 11, 48), torch.randn(2, 11, 70)
    y = F.linear(x, w, bias)
    want = {"none": y, "silu": F.silu(y), "mul": y * other, "add": y + other}[epilogue]
    got = native.gemm(x, native.pack_panels(w), 70, bias, epilogue,
                      other if epilogue in ("mul", "add") else None)
    assert got.shape == (2, 11, 70)
    torch.testing.assert_close(got, want, **TOL)


def test_gemm_strided_rows():
    torch.manual_seed(0)
    w = torch.randn(33, 20)
    x = torch.randn(9, 50)[:, 5:25]  # a slice of wider rows
    other = torch.randn(9, 40)[:, :33]
    panels = native.pack_panels(w)
    torch.testing.assert_close(native.gemm(x, panels, 33, epilogue="add", other=other),
                               F.linear(x, w) + other, **TOL)
    assert native.gemm(x[:0], panels, 33).shape == (0, 33)


BF16 = torch.bfloat16
needs_bf16 = pytest.mark.skipif(not native.has_gemm(torch.empty(1, 1, dtype=BF16)),
                                reason="no AVX512-BF16: the bf16 GEMM is not built")


def _close_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 results: sums in fp32, rounded once to 8 mantissa bits."""
    assert got.dtype == BF16
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 15, 16, 29, 300])
@pytest.mark.parametrize("out_features, in_features", [(1, 3), (40, 64), (97, 33), (1024, 512)])
def test_bf16_gemm_matches_fp32_of_bf16_inputs(rows, out_features, in_features):
    torch.manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features).to(BF16)
    x = torch.randn(rows, in_features).to(BF16)
    panels = native.pack_panels(w)
    assert panels.shape == (-(-out_features // 16), -(-in_features // 2), 16, 2)
    _close_bf16(native.gemm(x, panels, out_features), F.linear(x.float(), w.float()))


@needs_bf16
@pytest.mark.parametrize("epilogue", ["none", "silu", "mul", "add"])
def test_bf16_gemm_bias_epilogues_strided_rows(epilogue):
    torch.manual_seed(0)
    w, bias = torch.randn(70, 47).to(BF16), torch.randn(70).to(BF16)
    x = torch.randn(11, 60).to(BF16)[:, 3:50]  # odd K, rows of a wider tensor
    other = torch.randn(11, 80).to(BF16)[:, :70]
    y = F.linear(x.float(), w.float(), bias.float())
    want = {"none": y, "silu": F.silu(y), "mul": y * other.float(),
            "add": y + other.float()}[epilogue]
    got = native.gemm(x, native.pack_panels(w), 70, bias, epilogue,
                      other if epilogue in ("mul", "add") else None)
    _close_bf16(got, want)
