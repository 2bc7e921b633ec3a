"""Layers the diffusion transformers (DiT in dit.py, MMDiT in mmdit.py) share.

Names and numerics follow diffusers (models/embeddings.py, attention.py, normalization.py), so
parameter names are the checkpoint's; the linears are ours (workers/linear.py): packed for the
CPU GEMMs and tensor-parallel like the decoder's.

Layout. Image tokens are x [B, N, D], N = h * w patches in row-major order over the patch grid
(h = H / p, w = W / p); text tokens (MMDiT) are c [B, S, D]. Every linear sees the flat rows
[B * N, D]. Each batch row may be at its own timestep: everything conditioned on the timestep
(adaLN shift / scale / gate) is a [B, 1, D] vector broadcast over that row's tokens.

Tensor parallelism (whole world = TP group, see parallel_state.py):

    attention   to_qkv (QKVParallelLinear)   heads split: rank r attends with heads r*H/tp ...
                to_out.0 (RowParallelLinear) partial sums, reduce_results=False
    MLP         net.0.proj (column-parallel) the 4D hidden width split
                net.2 (RowParallelLinear)    partial sums, reduce_results=False

The blocks own the all-reduce: one per block half, over every partial sum of that half at once
(`all_reduce_tokens`). The embedders and adaLN modulation linears are replicated
(`ReplicatedLinear`): they run on B rows only, so splitting them would save no time, but they
are a large share of the weights (adaLN is 12 D^2 per MMDiT block against 24 D^2 split, about a
third of SD3.5-large), which every rank then holds in full.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from zomni.workers.layernorm import RMSNorm
from zomni.workers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from zomni.workers.parallel_state import all_reduce, get_tp_size, materialize

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], raw: dict[str, Any]) -> ConfigT:
    """A config dataclass from a diffusers config.json dict. Keys starting with "_"
    (`_class_name`, `_diffusers_version`, ...) are metadata; any other key we do not know
    raises, since a switch we silently ignored would change the model's output."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unsupported config keys {unknown}")
    return cls(**{k: v for k, v in raw.items() if k in fields})


def check_tensor_parallel(num_heads: int, mlp_width: int, tp_size: int | None = None) -> None:
    """Heads and the MLP hidden width are split over ranks: both must divide evenly."""
    tp = get_tp_size() if tp_size is None else tp_size
    if num_heads % tp:
        raise ValueError(f"num_attention_heads ({num_heads}) is not divisible by the "
                         f"tensor-parallel size ({tp}); attention heads are split over ranks")
    if mlp_width % tp:
        raise ValueError(f"the MLP hidden width ({mlp_width}) is not divisible by the "
                         f"tensor-parallel size ({tp})")


# --- timestep and positional embeddings -----------------------------------------------------


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool,
                       downscale_freq_shift: float, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim] float32, as
    diffusers' `get_timestep_embedding`: [sin | cos] of t * max_period^(-i / (dim/2 - shift))
    ([cos | sin] when flipped)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                    device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (replicated). diffusers' TimestepEmbedding, and also its
    PixArtAlphaTextProjection with act_fn "silu" (same two linears, same names)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = ReplicatedLinear(in_features, dim, bias=True)
        self.linear_2 = ReplicatedLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int,
                        interpolation_scale: float = 1.0) -> torch.Tensor:
    """diffusers' `get_2d_sincos_pos_embed` for a height x width patch grid -> [h * w, dim]
    float32, token order row-major. The first half of each vector encodes the column, the
    second half the row (diffusers' `emb_h` is in fact computed from the column grid), each as
    [sin | cos] of pos * 10000^(-i / (dim/4)), computed in float64. Positions are scaled so that
    `base_size` patches span the same range whatever the grid size."""
    if dim % 4:
        raise ValueError(f"the positional embedding width ({dim}) must be divisible by 4")

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        out = torch.outer(pos.reshape(-1).double(), omega)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    rows = torch.arange(height, dtype=torch.float32) / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32) / (width / base_size) / interpolation_scale
    grid_row, grid_col = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    return torch.cat([one_axis(grid_col), one_axis(grid_row)], dim=1).float()


class PatchEmbed(nn.Module):
    """Latents [B, C, H, W] -> patch tokens [B, N, D] plus the 2-D sin-cos positional table.

    `proj` is diffusers' p x p stride-p Conv2d, run as one GEMM over the flattened patches (the
    kernel [D, C, p, p] is loaded as [D, C * p * p], input ordered (c, dy, dx) alike).

    Positional table:
      - pos_embed_max_size M set (SD3): `pos_embed` [1, M * M, D] is a checkpoint tensor, and an
        h x w grid takes its centre crop (diffusers' `cropped_pos_embed`);
      - otherwise (DiT): computed for the grid, `base_size` = sample_size / p.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int,
                 pos_embed_max_size: int | None = None):
        super().__init__()
        self.patch_size = patch_size
        self.dim = dim
        self.base_size = sample_size // patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = ReplicatedLinear(in_channels * patch_size * patch_size, dim, bias=True)
        self.proj.weight.weight_loader = self._load_conv_kernel
        if pos_embed_max_size:  # filled by the loader, which requires it in the checkpoint
            self.pos_embed = nn.Parameter(torch.empty(1, pos_embed_max_size ** 2, dim),
                                          requires_grad=False)
        else:
            self.register_buffer("pos_table", sincos_pos_embed_2d(
                dim, self.base_size, self.base_size, self.base_size), persistent=False)

    def _load_conv_kernel(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        kernel = materialize(loaded)
        if kernel.dim() != 4 or (kernel.shape[0], kernel[0].numel()) != tuple(param.shape):
            raise ValueError(f"patch kernel {tuple(kernel.shape)} does not fit the patch "
                             f"projection {tuple(param.shape)}")
        param.data.copy_(kernel.reshape(param.shape))

    def positions(self, h: int, w: int) -> torch.Tensor:
        """The positional table [h * w, D] of an h x w patch grid."""
        if not self.pos_embed_max_size:
            if (h, w) == (self.base_size, self.base_size):
                return self.pos_table
            return sincos_pos_embed_2d(self.dim, h, w, self.base_size).to(self.pos_table.device)
        size = self.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"latent grid {h} x {w} patches exceeds pos_embed_max_size {size}")
        top, left = (size - h) // 2, (size - w) // 2
        grid = self.pos_embed.view(size, size, self.dim)
        return grid[top:top + h, left:left + w].reshape(h * w, self.dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, height, width = latents.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height} x {width} is not a multiple of the patch "
                             f"size {p}")
        h, w = height // p, width // p
        patches = latents.view(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b * h * w, -1)
        x = self.proj(patches).view(b, h * w, self.dim)
        return (x + self.positions(h, w)).to(x.dtype)  # the table may be float32 (DiT)


def unpatchify(x: torch.Tensor, h: int, w: int, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, h * w, p * p * C] (each ordered (dy, dx, c)) -> image [B, C, h * p, w * p]."""
    b, p = x.shape[0], patch_size
    x = x.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
    return x.reshape(b, channels, h * p, w * p)


# --- adaLN ----------------------------------------------------------------------------------


def modulation_chunks(linear: nn.Module, emb: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """SiLU(emb [B, E]) through `linear` -> n vectors [B, 1, D], to broadcast over tokens."""
    return linear(F.silu(emb)).unsqueeze(1).chunk(n, dim=-1)


class AdaLNModulation(nn.Module):
    """The linear of diffusers' adaLN norms (AdaLayerNormZero: 6 chunks, SD35AdaLayerNormZeroX:
    9, AdaLayerNormContinuous: 2), in the order they chunk it. The block itself applies
    `modulate(layer_norm(x), shift, scale)` with them."""

    def __init__(self, dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = ReplicatedLinear(dim, num_chunks * dim, bias=True)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return modulation_chunks(self.linear, emb, self.num_chunks)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters (every adaLN norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, in one pass."""
    return torch.addcmul(shift, x, 1 + scale)


# --- attention and MLP ----------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal attention of every query to every key, scale 1 / sqrt(head_dim):
    q [B, Nq, H, Dh], k / v [B, Nk, H, Dh] -> [B, Nq, H * Dh]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def make_qk_norms(qk_norm: str | None, head_dim: int) -> tuple[nn.Module | None, ...]:
    """The per-head q and k norms for diffusers' `qk_norm` (None or "rms_norm", eps 1e-6)."""
    if qk_norm is None:
        return None, None
    if qk_norm != "rms_norm":
        raise ValueError(f"qk_norm {qk_norm!r} is not supported (only None or 'rms_norm')")
    return RMSNorm(head_dim, eps=1e-6), RMSNorm(head_dim, eps=1e-6)


def split_qkv(qkv: torch.Tensor, batch: int, head_dim: int, norm_q: nn.Module | None,
              norm_k: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection's rows [B * N, 3 * H * Dh] (per rank [q heads | k heads | v heads])
    -> q, k, v [B, N, H, Dh], q and k normalised per head when the model has qk norms."""
    q, k, v = qkv.view(batch, -1, 3, qkv.shape[-1] // (3 * head_dim), head_dim).unbind(2)
    if norm_q is not None:
        q, k = norm_q(q), norm_k(k)
    return q, k, v


class SelfAttention(nn.Module):
    """diffusers' Attention over one token stream (DiT's attn1, SD3.5's attn2), q / k / v fused
    into `to_qkv`; heads split over ranks. Returns this rank's partial sum of `to_out`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = True,
                 qk_norm: str | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, num_heads, bias=bias)
        self.norm_q, self.norm_k = make_qk_norms(qk_norm, head_dim)
        # A list, as diffusers' (to_out.1 is its Dropout): parameter names are the checkpoint's.
        self.to_out = nn.ModuleList([RowParallelLinear(num_heads * head_dim, dim, bias=True,
                                                       reduce_results=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> partial output [B, N, D] (all-reduced by the caller)."""
        b, n, d = x.shape
        q, k, v = split_qkv(self.to_qkv(x.reshape(b * n, d)), b, self.head_dim,
                            self.norm_q, self.norm_k)
        return self.to_out[0](attention(q, k, v).view(b * n, -1)).view(b, n, d)


class GELU(nn.Module):
    """diffusers' GELU: a column-parallel projection, then GELU ("tanh" or "none")."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh", bias: bool = True):
        super().__init__()
        self.approximate = approximate
        self.proj = ColumnParallelLinear(dim_in, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """diffusers' FeedForward with a GELU activation: net.0 widens to 4 * dim (split over
    ranks), net.2 projects back. Returns this rank's partial sum (all-reduced by the caller)."""

    def __init__(self, dim: int, approximate: str = "tanh"):
        super().__init__()
        # net.1 is diffusers' Dropout slot, a no-op at inference, kept so names match.
        self.net = nn.ModuleList([GELU(dim, 4 * dim, approximate), nn.Identity(),
                                  RowParallelLinear(4 * dim, dim, bias=True,
                                                    reduce_results=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> partial output [B, N, D]."""
        return self.net[2](self.net[0](x.reshape(-1, x.shape[-1]))).view(x.shape)


def all_reduce_tokens(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum each partial output [B, N_i, D] over ranks with ONE all-reduce: concatenated along
    the token dim, reduced, split back (views). A no-op at world size 1."""
    if get_tp_size() == 1:
        return parts
    if len(parts) == 1:
        return [all_reduce(parts[0].contiguous())]
    flat = all_reduce(torch.cat(parts, dim=1))
    return list(flat.split([p.shape[1] for p in parts], dim=1))
