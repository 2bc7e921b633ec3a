"""MMDiT, the Stable Diffusion 3 / 3.5 denoiser: diffusers' SD3Transformer2DModel, our modules.

Two token streams, image x [B, N, D] and text c [B, S, D], each with its own weights, meet in
one joint attention per block:

    x ─ adaLN ─ to_qkv ───────┐                       ┌─ to_out ───── gate + x ─ adaLN ─ ff
                              ├─ attention over N + S ┤
    c ─ adaLN ─ to_added_qkv ─┘                       └─ to_add_out ─ gate + c ─ adaLN ─ ff_context

  - SD3.5-medium's `dual_attention_layers` add attn2, a self-attention of the image stream on
    a second modulation of the same normalised x; it reads the block's input, not attn's output,
    so its partial sum joins the same all-reduce as attn's.
  - qk_norm "rms_norm" (SD3.5): per-head RMSNorm of q and k, separate weights per stream.
  - The last block is `context_pre_only`: the text stream only supplies keys and values (no
    to_add_out, no ff_context); its text queries are left out of the attention.

Tensor parallelism (see diffusion_layers.py): heads and MLP widths split over ranks; per block
exactly two all-reduces, one after the attention half (to_out, to_add_out and attn2's to_out
together) and one after the MLP half (ff and ff_context together).

Parameter names are the checkpoint's except the fused projections (`packed_modules_mapping`):

    attn.to_{q,k,v}                -> attn.to_qkv          shards "q" / "k" / "v"
    attn.add_{q,k,v}_proj          -> attn.to_added_qkv    shards "q" / "k" / "v"
    attn2.to_{q,k,v}               -> attn2.to_qkv
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from zomni.workers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from zomni.workers.models.diffusion_layers import (
    AdaLNModulation,
    FeedForward,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedding,
    all_reduce_tokens,
    attention,
    check_tensor_parallel,
    config_from_dict,
    layer_norm,
    make_qk_norms,
    modulate,
    split_qkv,
    timestep_embedding,
    unpatchify,
)

if TYPE_CHECKING:
    from zomni.workers.step_cache import Hidden, StepCache


@dataclass(frozen=True)
class SD3Config:
    """diffusers' SD3Transformer2DModel config (config.json), same names and defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16  # None: in_channels
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                             f"num_attention_heads * attention_head_dim ({self.inner_dim})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> SD3Config:
        return config_from_dict(cls, raw)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb [B, D] = MLP(sinusoidal(t), 256 channels, [cos | sin]) + MLP(pooled text)."""

    def __init__(self, dim: int, pooled_projection_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.text_embedder = TimestepEmbedding(pooled_projection_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
        return self.timestep_embedder(t.to(pooled.dtype)) + self.text_embedder(pooled)


class JointAttention(nn.Module):
    """Attention over the image and text tokens together; each stream its own fused QKV,
    q / k norms and output projection. Returns this rank's partial sums."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None,
                 context_pre_only: bool):
        super().__init__()
        self.head_dim = head_dim
        self.context_pre_only = context_pre_only
        self.to_qkv = QKVParallelLinear(dim, head_dim, num_heads, num_heads, bias=True)
        self.to_added_qkv = QKVParallelLinear(dim, head_dim, num_heads, num_heads, bias=True)
        self.norm_q, self.norm_k = make_qk_norms(qk_norm, head_dim)
        self.norm_added_q, self.norm_added_k = make_qk_norms(qk_norm, head_dim)
        inner = num_heads * head_dim
        self.to_out = nn.ModuleList([RowParallelLinear(inner, dim, bias=True,
                                                       reduce_results=False)])
        self.to_add_out = None if context_pre_only else RowParallelLinear(
            inner, dim, bias=True, reduce_results=False)

    def forward(self, x: torch.Tensor,
                c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, D], c [B, S, D] (both modulated) -> partial outputs [B, N, D] and [B, S, D]
        (None when context_pre_only)."""
        (b, n, d), s = x.shape, c.shape[1]
        q, k, v = split_qkv(self.to_qkv(x.reshape(b * n, d)), b, self.head_dim,
                            self.norm_q, self.norm_k)
        # The last block (context_pre_only) drops the text tokens' outputs, so only the image
        # queries attend; its fused text QKV still computes q (one GEMM third, one block).
        cq, ck, cv = split_qkv(self.to_added_qkv(c.reshape(b * s, d)), b, self.head_dim,
                               self.norm_added_q, self.norm_added_k)
        keys, values = torch.cat([k, ck], dim=1), torch.cat([v, cv], dim=1)
        if self.context_pre_only:
            out = attention(q, keys, values)
            return self.to_out[0](out.view(b * n, -1)).view(b, n, d), None
        out = attention(torch.cat([q, cq], dim=1), keys, values)  # [B, N + S, H * Dh]
        x_out = self.to_out[0](out[:, :n].reshape(b * n, -1)).view(b, n, d)
        c_out = self.to_add_out(out[:, n:].reshape(b * s, -1)).view(b, s, d)
        return x_out, c_out


class JointTransformerBlock(nn.Module):
    """One MMDiT block; see the module docstring for the data flow."""

    def __init__(self, config: SD3Config, layer_idx: int):
        super().__init__()
        dim, heads, head_dim = config.inner_dim, config.num_attention_heads, \
            config.attention_head_dim
        self.context_pre_only = layer_idx == config.num_layers - 1
        self.use_dual_attention = layer_idx in config.dual_attention_layers
        # adaLN chunks: 6 (shift, scale, gate for attention and MLP), 9 with attn2's three;
        # the last block's text stream only has (scale, shift) for its attention input.
        self.norm1 = AdaLNModulation(dim, 9 if self.use_dual_attention else 6)
        self.norm1_context = AdaLNModulation(dim, 2 if self.context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, config.qk_norm, self.context_pre_only)
        self.attn2 = SelfAttention(dim, heads, head_dim, bias=True, qk_norm=config.qk_norm) \
            if self.use_dual_attention else None
        self.ff = FeedForward(dim)
        self.ff_context = None if self.context_pre_only else FeedForward(dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, D], c [B, S, D], temb [B, D] -> new x, new c (None after the last block)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *dual = self.norm1(temb)
        normed = layer_norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)
            c_attn_in = modulate(layer_norm(c), c_shift, c_scale)
        else:
            (c_shift_msa, c_scale_msa, c_gate_msa,
             c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(temb)
            c_attn_in = modulate(layer_norm(c), c_shift_msa, c_scale_msa)

        # Attention half: every partial sum in one all-reduce.
        x_attn, c_attn = self.attn(modulate(normed, shift_msa, scale_msa), c_attn_in)
        parts = [x_attn] if c_attn is None else [x_attn, c_attn]
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = dual
            parts.append(self.attn2(modulate(normed, shift_msa2, scale_msa2)))
        attn_out = all_reduce_tokens(parts)
        x = torch.addcmul(x, gate_msa, attn_out[0])
        if self.attn2 is not None:
            x = torch.addcmul(x, gate_msa2, attn_out[-1])

        # MLP half: ff and ff_context in one all-reduce.
        x_ff_in = modulate(layer_norm(x), shift_mlp, scale_mlp)
        if self.context_pre_only:
            (x_ff,) = all_reduce_tokens([self.ff(x_ff_in)])
            return torch.addcmul(x, gate_mlp, x_ff), None
        c = torch.addcmul(c, c_gate_msa, attn_out[1])
        c_ff_in = modulate(layer_norm(c), c_shift_mlp, c_scale_mlp)
        x_ff, c_ff = all_reduce_tokens([self.ff(x_ff_in), self.ff_context(c_ff_in)])
        return torch.addcmul(x, gate_mlp, x_ff), torch.addcmul(c, c_gate_mlp, c_ff)


class SD3Transformer2DModel(nn.Module):
    """The SD3 / SD3.5 denoiser. `forward` is one batched step; rows may be at different
    timesteps (a classifier-free-guidance pair is two rows). With a `StepCache` the blocks
    run through it (workers/step_cache.py): block 0 on the rows that need it, the rest on the
    rows that compute; streams (x, c), per-row conditioning (temb,)."""

    # TeaCache's rescale polynomial: TeaCache fitted none to SD3; this is its FLUX fit, which
    # PaddleMIX's TeaCache port for SD3 uses (and vLLM-omni for its FLUX-like models).
    teacache_rescale = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00,
                        2.64230861e-01)

    packed_modules_mapping = {
        "to_q": ("to_qkv", "q"),
        "to_k": ("to_qkv", "k"),
        "to_v": ("to_qkv", "v"),
        "add_q_proj": ("to_added_qkv", "q"),
        "add_k_proj": ("to_added_qkv", "k"),
        "add_v_proj": ("to_added_qkv", "v"),
    }

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        dim = config.inner_dim
        check_tensor_parallel(config.num_attention_heads, 4 * dim)
        self.pos_embed = PatchEmbed(config.sample_size, config.patch_size, config.in_channels,
                                    dim, config.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim,
                                                                  config.pooled_projection_dim)
        self.context_embedder = ReplicatedLinear(config.joint_attention_dim,
                                                 config.caption_projection_dim, bias=True)
        self.transformer_blocks = nn.ModuleList(JointTransformerBlock(config, i)
                                                for i in range(config.num_layers))
        self.norm_out = AdaLNModulation(dim, 2)  # (scale, shift)
        self.proj_out = ReplicatedLinear(dim, config.patch_size ** 2 * config.out_channels,
                                         bias=True)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor,
                cache: StepCache | None = None) -> torch.Tensor:
        """Latents [B, C, H, W], timesteps [B] (float, SD3 scale: sigma * 1000), text
        embeddings [B, S, joint_attention_dim], pooled [B, pooled_projection_dim]
        -> the model output [B, out_channels, H, W]."""
        b, _, height, width = hidden_states.shape
        p, s = self.config.patch_size, encoder_hidden_states.shape[1]
        x = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        c = self.context_embedder(encoder_hidden_states.reshape(b * s, -1)).view(b, s, -1)
        if cache is None:
            for block in self.transformer_blocks:
                x, c = block(x, c, temb)
        else:
            x = cache.run(self, (x, c), (temb,))
        scale, shift = self.norm_out(temb)
        x = modulate(layer_norm(x), shift, scale)
        x = self.proj_out(x.reshape(b * x.shape[1], -1)).view(b, x.shape[1], -1)
        return unpatchify(x, height // p, width // p, p, self.config.out_channels)

    def block_step(self, block: JointTransformerBlock, hidden: Hidden, cond: Hidden) -> Hidden:
        (x, c), (temb,) = hidden, cond
        return block(x, c, temb)

    def teacache_input(self, x: torch.Tensor, cond: Hidden) -> torch.Tensor:
        """Block 0's modulated image input, norm1's (as TeaCache reads it from diffusers'
        `transformer_blocks[0].norm1(x, emb=temb)[0]`)."""
        (temb,) = cond
        shift_msa, scale_msa, *_ = self.transformer_blocks[0].norm1(temb)
        return modulate(layer_norm(x), shift_msa, scale_msa)
