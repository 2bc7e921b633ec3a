"""DiT, the class-conditional latent diffusion transformer: diffusers' DiTTransformer2DModel
(BasicTransformerBlock with norm_type "ada_norm_zero"), our modules.

    x ─ LN ─ modulate(shift, scale) ─ attn1 ─ gate ─ + x ─ norm3 ─ modulate ─ ff ─ gate ─ + x

Every block embeds (timestep, class label) itself (`norm1.emb`, its own weights) and turns that
into its six adaLN vectors; the output layer reuses block 0's embedder. With learned sigma
(out_channels = 2 * in_channels) the output holds the noise prediction then the variance.

Tensor parallelism as in diffusion_layers.py: heads and MLP width split, one all-reduce per
block half; the per-block embedders (a 1001-row class table each) stay replicated.

Parameter names are the checkpoint's except attn1.to_{q,k,v} -> attn1.to_qkv (shards q, k, v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from zomni.workers.linear import ReplicatedLinear
from zomni.workers.models.diffusion_layers import (
    AdaLNModulation,
    FeedForward,
    PatchEmbed,
    SelfAttention,
    TimestepEmbedding,
    all_reduce_tokens,
    check_tensor_parallel,
    config_from_dict,
    layer_norm,
    modulate,
    modulation_chunks,
    timestep_embedding,
    unpatchify,
)

if TYPE_CHECKING:
    from zomni.workers.step_cache import Hidden, StepCache

_GELU_APPROXIMATE = {"gelu-approximate": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class DiTConfig:
    """diffusers' DiTTransformer2DModel config (config.json), same names and defaults.
    `dropout`, `norm_num_groups` and `upcast_attention` do not change inference."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.norm_type != "ada_norm_zero" or self.num_embeds_ada_norm is None:
            raise ValueError(f"DiT needs norm_type 'ada_norm_zero' and num_embeds_ada_norm, got "
                             f"{self.norm_type!r} and {self.num_embeds_ada_norm!r}")
        if self.activation_fn not in _GELU_APPROXIMATE:
            raise ValueError(f"activation_fn {self.activation_fn!r} is not supported "
                             f"({', '.join(_GELU_APPROXIMATE)})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, raw: dict) -> DiTConfig:
        return config_from_dict(cls, raw)


class LabelEmbedding(nn.Module):
    """Class label -> vector; row `num_classes` is the "no class" label classifier-free
    guidance uses (diffusers adds it whenever class dropout was trained, as DiT's was)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """[B, D] = MLP(sinusoidal(t), 256 channels, [cos | sin], shift 1) + class embedding."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
        return self.timestep_embedder(t.to(dtype)) + self.class_embedder(class_labels)


class LabelAdaLNModulation(AdaLNModulation):
    """diffusers' AdaLayerNormZero with its own embedder: (t, label) -> six adaLN vectors."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, 6)
        self.emb = CombinedTimestepLabelEmbeddings(num_classes, dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return super().forward(self.emb(timestep, class_labels, dtype))


class DiTBlock(nn.Module):
    """diffusers' BasicTransformerBlock, norm_type "ada_norm_zero", self-attention only."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.inner_dim
        self.norm1 = LabelAdaLNModulation(dim, config.num_embeds_ada_norm)
        self.attn1 = SelfAttention(dim, config.num_attention_heads, config.attention_head_dim,
                                   bias=config.attention_bias)
        self.norm3 = nn.LayerNorm(dim, eps=config.norm_eps,
                                  elementwise_affine=config.norm_elementwise_affine)
        self.ff = FeedForward(dim, approximate=_GELU_APPROXIMATE[config.activation_fn])

    def forward(self, x: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; one all-reduce per half."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            timestep, class_labels, x.dtype)
        (attn,) = all_reduce_tokens([self.attn1(modulate(layer_norm(x), shift_msa, scale_msa))])
        x = torch.addcmul(x, gate_msa, attn)
        (ff,) = all_reduce_tokens([self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))])
        return torch.addcmul(x, gate_mlp, ff)


class DiTTransformer2DModel(nn.Module):
    """The DiT denoiser. `forward` is one batched step; rows may be at different timesteps.
    With a `StepCache` the blocks run through it (workers/step_cache.py): streams (x,),
    per-row conditioning (timestep, class_labels)."""

    # TeaCache publishes no rescale polynomial for DiT: the identity, so the threshold bounds
    # the accumulated raw relative L1 change of block 0's modulated input.
    teacache_rescale = (1.0, 0.0)

    packed_modules_mapping = {
        "to_q": ("to_qkv", "q"),
        "to_k": ("to_qkv", "k"),
        "to_v": ("to_qkv", "v"),
    }

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, p = config.inner_dim, config.patch_size
        check_tensor_parallel(config.num_attention_heads, 4 * dim)
        self.pos_embed = PatchEmbed(config.sample_size, p, config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DiTBlock(config)
                                                for _ in range(config.num_layers))
        self.proj_out_1 = ReplicatedLinear(dim, 2 * dim, bias=True)  # (shift, scale)
        self.proj_out_2 = ReplicatedLinear(dim, p * p * config.out_channels, bias=True)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor, cache: StepCache | None = None) -> torch.Tensor:
        """Latents [B, C, H, W], timesteps [B], class labels [B] int64 (num_embeds_ada_norm:
        no class) -> [B, out_channels, H, W]."""
        b, _, height, width = hidden_states.shape
        p = self.config.patch_size
        x = self.pos_embed(hidden_states)
        if cache is None:
            for block in self.transformer_blocks:
                x = block(x, timestep, class_labels)
        else:
            x = cache.run(self, (x,), (timestep, class_labels))
        cond = self.transformer_blocks[0].norm1.emb(timestep, class_labels, x.dtype)
        shift, scale = modulation_chunks(self.proj_out_1, cond, 2)
        x = modulate(layer_norm(x), shift, scale)
        x = self.proj_out_2(x.reshape(b * x.shape[1], -1)).view(b, x.shape[1], -1)
        return unpatchify(x, height // p, width // p, p, self.config.out_channels)

    def block_step(self, block: DiTBlock, hidden: Hidden, cond: Hidden) -> Hidden:
        (x,), (timestep, class_labels) = hidden, cond
        return (block(x, timestep, class_labels),)

    def teacache_input(self, x: torch.Tensor, cond: Hidden) -> torch.Tensor:
        """Block 0's modulated image input (diffusers' `transformer_blocks[0].norm1(x, t,
        labels)[0]`)."""
        timestep, class_labels = cond
        shift_msa, scale_msa, *_ = self.transformer_blocks[0].norm1(timestep, class_labels,
                                                                    x.dtype)
        return modulate(layer_norm(x), shift_msa, scale_msa)
