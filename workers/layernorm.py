"""RMSNorm, computed in float32 and cast back before the weight, exactly as HF Llama does.

fp32 on the CPU takes one native pass (csrc/layer_ops.c) instead of six torch ops."""

from __future__ import annotations

import torch
from torch import nn

from zomni.workers import native


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if native.has_layer_ops(x):
            return native.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
