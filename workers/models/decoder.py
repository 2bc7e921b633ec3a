"""One decoder-only transformer for Llama, Mistral, Qwen2 and Qwen3.

The four differ only in switches, set per architecture by `ArchSpec`:

    arch      q/k/v bias          o bias            MLP bias     q_norm/k_norm  sliding window
    Llama     attention_bias      attention_bias    mlp_bias     -              -
    Mistral   -                   -                 -            -              sliding_window
    Qwen2     always              -                 -            -              per layer_types
    Qwen3     attention_bias      attention_bias    -            per head       per layer_types

Module and parameter names follow the HF checkpoints, except the fused `qkv_proj` (q/k/v) and
`gate_up_proj` (gate/up), which `packed_modules_mapping` tells the loader about.
All linear layers see the flat batch [num_tokens, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zomni.workers import native
from zomni.workers.attention import Attention
from zomni.workers.embed_head import ParallelLMHead, VocabParallelEmbedding
from zomni.workers.layernorm import RMSNorm
from zomni.workers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from zomni.workers.models.native_layers import NativeLayers
from zomni.workers.rotary_embedding import RotaryEmbedding, apply_rotary

# HF checkpoint module -> (our fused module, shard), for the loader
QKV_PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
}
PACKED_MODULES = {**QKV_PACKED_MODULES, "gate_proj": ("gate_up_proj", 0),
                  "up_proj": ("gate_up_proj", 1)}


@dataclass(frozen=True)
class ArchSpec:
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:  # Qwen2/3: only layers marked sliding use the window
        sliding = layer_types[layer_idx] == "sliding_attention"
        return config.sliding_window if sliding else None
    return getattr(config, "sliding_window", None)  # Mistral: every layer


class DecoderAttention(nn.Module):
    def __init__(self, config, spec: ArchSpec, layer_idx: int):
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim,
                                          config.num_attention_heads,
                                          config.num_key_value_heads, bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim,
                                        config.hidden_size, bias=spec.o_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        if spec.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.attn = Attention(self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5,
                              sliding_window_of(config, layer_idx))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                residual: torch.Tensor) -> torch.Tensor:
        """residual + attention(x)"""
        qkv = self.qkv_proj(x)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if native.has_layer_ops(qkv, dim):  # one pass: q/k norm, RoPE, K/V into the cache
            attn = self.attn
            norms = (self.q_norm.weight, self.k_norm.weight, self.k_norm.eps) \
                if self.qk_norm else ()
            q = native.qkv_rope_cache(qkv, heads, kv_heads, cos, sin, attn.cache_rows(),
                                      attn.k_cache, attn.v_cache, *norms)
            return self.o_proj(attn.attend(q).flatten(1), residual)
        qk = qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
        if self.qk_norm:  # Qwen3 normalises each head before RoPE
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k heads in one pass
        o = self.attn(qk[:, :heads], qk[:, heads:], v)
        return self.o_proj(o.flatten(1), residual)


class DecoderMLP(nn.Module):
    def __init__(self, config, spec: ArchSpec):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter],
                                                       bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=spec.mlp_bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MLP(x)"""
        return self.down_proj(self.gate_up_proj.silu_and_mul(x), residual)


class DecoderLayer(nn.Module):
    def __init__(self, config, spec: ArchSpec, layer_idx: int):
        super().__init__()
        self.self_attn = DecoderAttention(config, spec, layer_idx)
        self.mlp = DecoderMLP(config, spec)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), cos, sin, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class DecoderModel(nn.Module):
    def __init__(self, config, spec: ArchSpec):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config))
        self._native: NativeLayers | None = None
        self._native_key: tuple | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.tables(positions, x.dtype)
        native_layers = self._native_layers(x)
        if native_layers is not None:
            return self.norm(native_layers(x, cos, sin))
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def _native_layers(self, x: torch.Tensor) -> NativeLayers | None:
        """The one-call-per-layer path, rebuilt when what it points into changes (packing, the
        KV cache, the activations' dtype)."""
        first = self.layers[0].self_attn
        key = (x.dtype, x.device, first.attn.k_cache.data_ptr(), id(first.qkv_proj.packed))
        if key != self._native_key:
            self._native_key, self._native = key, NativeLayers.build(self.layers, x)
        return self._native


class DecoderForCausalLM(nn.Module):
    """`forward` gives hidden states of every token; `compute_logits` only for rows asked."""

    packed_modules_mapping = PACKED_MODULES

    @classmethod
    def arch_spec(cls, config) -> ArchSpec:
        raise NotImplementedError

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, self.arch_spec(config))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def arch_spec(cls, config) -> ArchSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return ArchSpec(qkv_bias=bias, o_bias=bias,
                        mlp_bias=bool(getattr(config, "mlp_bias", False)))


class MistralForCausalLM(DecoderForCausalLM):
    @classmethod
    def arch_spec(cls, config) -> ArchSpec:
        return ArchSpec()


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def arch_spec(cls, config) -> ArchSpec:
        return ArchSpec(qkv_bias=True)


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def arch_spec(cls, config) -> ArchSpec:
        bias = bool(getattr(config, "attention_bias", False))
        return ArchSpec(qkv_bias=bias, o_bias=bias, qk_norm=True)
