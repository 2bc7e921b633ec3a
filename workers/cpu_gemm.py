"""Linears on the CPU, with weights repacked once at load.

torch's default CPU `F.linear` calls MKL's sgemm, which is slow on the AMD EPYC (AVX-512)
machines we measure on. Faster kernels take a weight repacked once:

- fp32 with AVX-512: our own (csrc/gemm.c, `Panels`). Weight panels of 16 output columns, each
  streamed front to back while a tile of outputs stays in registers. Against oneDNN's
  prepacked kernel, all linears of a forward pass with the weights cold (`small` shape):
  1.1-1.3x at 1-16 rows, 1.0-1.07x from 64 to 1024 rows; Qwen3-0.6B: 1.1-1.2x at 16 rows,
  1.13x at 1024. Offline W is unchanged; online W at concurrency 16 gained ~17%.
- bf16 with AVX512-BF16: the same plan in bf16 (csrc/gemm_bf16.c), pairs of k per vdpbf16ps.
  Qwen3-0.6B's linears at 16 rows, cold: 54-61 ms against oneDNN's 60-67; equal at 64 and
  1024 rows.
- otherwise (fp16, no AVX-512): oneDNN's JIT kernels on its own blocked layout (~2.5x MKL in
  fp32 at decode shapes, ~1.2-2x in bf16), the swap torch.compile's CPU freezing pass makes.

Both apply an epilogue while the output tile is still in cache: SiLU on the gate projection,
the SiLU(gate) product on the up projection and the residual add on the output projections,
instead of one more pass over a [tokens, width] tensor each.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from zomni.workers import native


class Panels(NamedTuple):
    """A weight [out_features, K] packed for `native.gemm`."""

    data: torch.Tensor
    out_features: int


Packed = torch.Tensor | Panels


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    return native.has_gemm(weight) or (
        weight.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor, batch_hint: int) -> Packed:
    """`weight` [out, in] repacked for this CPU: our panels, or an opaque oneDNN tensor
    reordered for ~`batch_hint` rows."""
    if native.has_gemm(weight):
        return Panels(native.pack_panels(weight), weight.shape[0])
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: Packed | None, epilogue: str = "none",
           other: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, then `epilogue`: "none", "silu", or "mul" / "add" with `other`."""
    if isinstance(packed, Panels):
        return native.gemm(x, packed.data, packed.out_features, bias, epilogue, other)
    if packed is None:
        y = F.linear(x, weight, bias)
        if epilogue == "silu":
            return F.silu(y)
        if epilogue == "mul":
            return y.mul_(other)
        return y.add_(other) if epilogue == "add" else y
    if other is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, epilogue)
    attr = "swish" if epilogue == "silu" else "none"  # oneDNN's name for SiLU
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], "")
