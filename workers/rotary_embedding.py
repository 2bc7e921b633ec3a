"""Rotary position embedding (rotate-half convention of HF Llama / Qwen).

The inverse frequencies come from transformers' `ROPE_INIT_FUNCTIONS` applied to the HF config,
so every scaling it knows (linear, llama3, yarn, longrope) matches the reference; `dynamic`
rescales with the sequence length, which a paged batch of mixed lengths cannot follow, so it is
refused. cos/sin are computed once for every position the model takes (as vLLM's cos_sin_cache)
and a step's rows are picked out of them, shared by all layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if not params:  # transformers < 5 keeps these as separate attributes
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2], attention scaling) for the HF `config`."""
    params = _rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE scaling is not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        inv_freq, self.scaling = rope_inv_freq(config, head_dim)
        if inv_freq.numel() * 2 != head_dim:
            raise ValueError("partial rotary embeddings are not supported")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = getattr(config, "max_position_embeddings", None) or 2048
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [num_tokens, head_dim] for `positions` [num_tokens]."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and signed sin [num_tokens, 1, head_dim] for `apply_rotary`: rows of tables for
        positions 0 .. max_position_embeddings - 1, computed on first use in one call, as HF
        computes a whole sequence's (a decode step's seven small ops become two indexings)."""
        cached = self._tables
        if cached is None or cached[0].dtype != dtype or cached[0].device != positions.device:
            every = torch.arange(self.max_positions, device=positions.device)
            cos, sin = self(every, dtype)
            half = sin.shape[-1] // 2
            cached = self._tables = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))
        return cached[0][positions][:, None, :], cached[1][positions][:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, heads, head_dim]; tables from `RotaryEmbedding.tables`.

    HF's x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]: the sign moves into
    the sin table, so the rotation is one roll ([x2, x1]) and the result one addcmul.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
