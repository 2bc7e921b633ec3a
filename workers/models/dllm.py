"""Masked-diffusion LMs: LLaDA and Dream, bidirectional transformers on the decoder's layers.

    arch    checkpoint layout                               besides having no causal mask
    LLaDA   model.transformer.{wte, blocks.N.*, ln_f, ff_out}   its own names (below)
    Dream   Qwen2's: model.layers.N.self_attn.q_proj, ...       logits shifted by one position

LLaDA block N, checkpoint name -> ours (LLaDALlamaBlock of its modeling_llada.py):

    attn_norm, ff_norm                 RMSNorm
    q_proj, k_proj, v_proj             qkv_proj (fused: shards "q" / "k" / "v")
    attn_out                           attn_out (output projection)
    ff_proj, up_proj                   gate_up_proj (fused: shards 0 / 1), ff_proj is the gate:
                                       ff_out(silu(ff_proj(x)) * up_proj(x))
    ff_out                             ff_out (down projection)

and `model.transformer.ff_out` is the LM head (absent with `weight_tying`), with
`embedding_size` rows (>= `vocab_size`). Dream was trained from an AR model and keeps its
alignment: the logits predicting position i come out of row i - 1 (`logits_shift = 1`); callers
pick the rows whose logits they need and pass only those to `compute_logits`.

One forward takes a flat batch of segments, one window of positions per sequence, each
attending to every key of its own sequence (no mask), cached or computed (`dllm_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from zomni.workers.dllm_attention import (
    BidirectionalAttention,
    DenseKV,
    Segment,
    segment_positions,
)
from zomni.workers.embed_head import ParallelLMHead, VocabParallelEmbedding
from zomni.workers.layernorm import RMSNorm
from zomni.workers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from zomni.workers.models.decoder import (
    PACKED_MODULES,
    QKV_PACKED_MODULES,
    ArchSpec,
    DecoderMLP,
)
from zomni.workers.rotary_embedding import RotaryEmbedding

# LLaDA config switches -> the values our modules implement (the first is the default)
_LLADA_SWITCHES: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",), "layer_norm_type": ("rms",), "activation_type": ("silu",),
    "rope": (True,), "alibi": (False,), "attention_layer_norm": (False,),
    "include_bias": (False,), "bias_for_layer_norm": (None, False), "scale_logits": (False,),
    "input_emb_norm": (False,),
}


@dataclass(frozen=True)
class DiffusionLMConfig:
    """The fields our modules read, from LLaDA's or Dream's config.json (neither config class
    is in transformers: both ship as remote code, so the JSON is read here)."""

    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    logits_size: int  # rows of the embedding and the LM head
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    mask_token_id: int
    qkv_bias: bool
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    rope_scaling: None = None  # read by RotaryEmbedding: only plain RoPE is supported

    @classmethod
    def from_llada(cls, raw: dict[str, Any]) -> DiffusionLMConfig:
        for key, allowed in _LLADA_SWITCHES.items():  # what our modules implement
            if raw.get(key, allowed[0]) not in allowed:
                raise ValueError(f"LLaDA config {key}={raw[key]!r} is not supported "
                                 f"(only {' or '.join(map(repr, allowed))})")
        heads, hidden = int(raw["n_heads"]), int(raw["d_model"])
        kv_heads = 1 if raw.get("multi_query_attention") else int(raw.get("n_kv_heads") or heads)
        return cls(
            architecture="LLaDAModelLM", hidden_size=hidden, num_hidden_layers=int(raw["n_layers"]),
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
            intermediate_size=int(raw.get("mlp_hidden_size") or raw.get("mlp_ratio", 4) * hidden),
            vocab_size=int(raw["vocab_size"]),
            logits_size=int(raw.get("embedding_size") or raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_sequence_length", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            mask_token_id=int(raw.get("mask_token_id", 126336)),
            qkv_bias=bool(raw.get("include_qkv_bias", False)),
            tie_word_embeddings=bool(raw.get("weight_tying", False)))

    @classmethod
    def from_dream(cls, raw: dict[str, Any]) -> DiffusionLMConfig:
        if raw.get("rope_scaling"):
            raise ValueError(f"Dream config rope_scaling={raw['rope_scaling']!r} is not supported")
        if raw.get("use_sliding_window"):
            raise ValueError("Dream config use_sliding_window=true is not supported")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        return cls(
            architecture="DreamModel", hidden_size=hidden,
            num_hidden_layers=int(raw["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=hidden // heads, intermediate_size=int(raw["intermediate_size"]),
            vocab_size=int(raw["vocab_size"]), logits_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            mask_token_id=int(raw.get("mask_token_id", 151666)), qkv_bias=True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            hidden_act=str(raw.get("hidden_act", "silu")))


def _qkv_proj(config: DiffusionLMConfig, bias: bool) -> QKVParallelLinear:
    return QKVParallelLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                             config.num_key_value_heads, bias=bias)


def _attention(qkv_proj: QKVParallelLinear, config: DiffusionLMConfig,
               layer_idx: int) -> BidirectionalAttention:
    return BidirectionalAttention(qkv_proj.num_heads, qkv_proj.num_kv_heads, config.head_dim,
                                  layer_idx)


class DiffusionLM(nn.Module):
    """What both models share: `forward` gives the hidden states of every row of the flat
    batch, `compute_logits` the logits of the rows asked for. Each model names its parts as
    its checkpoint does and hands them over in `parts()`."""

    logits_shift: ClassVar[int] = 0  # the logits of position i are those of row i - shift
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {}

    def __init__(self, config: DiffusionLMConfig):
        super().__init__()
        self.config = config
        self.rotary_emb = RotaryEmbedding(config, config.head_dim)

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any]) -> DiffusionLMConfig:
        raise NotImplementedError

    def parts(self) -> tuple[VocabParallelEmbedding, nn.ModuleList, RMSNorm, ParallelLMHead]:
        """(embedding, layers, final norm, LM head)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """input_ids [T]: the segments' windows, in order -> hidden states [T, hidden]."""
        embed, layers, norm, _ = self.parts()
        x = embed(input_ids)
        cos, sin = self.rotary_emb.tables(segment_positions(segments, x.device), x.dtype)
        for layer in layers:
            x = layer(x, cos, sin, segments)
        return norm(x)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.parts()[3](hidden_states)

    def new_kv_cache(self, length: int) -> DenseKV:
        """Room for one sequence of `length` positions on this rank, in the weights' dtype."""
        embed, layers, _, _ = self.parts()
        attn = layers[0].attention()
        shape = (len(layers), attn.num_kv_heads, length, attn.head_dim)
        return DenseKV(embed.weight.new_empty(shape), embed.weight.new_empty(shape))


# ---- LLaDA ------------------------------------------------------------------------------------


class LLaDABlock(nn.Module):
    def __init__(self, config: DiffusionLMConfig, layer_idx: int):
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        self.attn_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.qkv_proj = _qkv_proj(config, config.qkv_bias)
        self.attn = _attention(self.qkv_proj, config, layer_idx)
        self.attn_out = RowParallelLinear(config.num_attention_heads * config.head_dim, hidden)
        self.ff_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter])
        self.ff_out = RowParallelLinear(inter, hidden)

    def attention(self) -> BidirectionalAttention:
        return self.attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        o = self.attn(self.qkv_proj(self.attn_norm(x)), cos, sin, segments)
        x = self.attn_out(o, residual=x)
        return self.ff_out(self.gate_up_proj.silu_and_mul(self.ff_norm(x)), residual=x)


class LLaDATransformer(nn.Module):
    def __init__(self, config: DiffusionLMConfig):
        super().__init__()
        self.wte = VocabParallelEmbedding(config.logits_size, config.hidden_size)
        self.blocks = nn.ModuleList(LLaDABlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ff_out = ParallelLMHead(config.logits_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.ff_out.weight = self.wte.weight


class LLaDAModelLM(DiffusionLM):
    packed_modules_mapping = {**QKV_PACKED_MODULES, "ff_proj": ("gate_up_proj", 0),
                              "up_proj": ("gate_up_proj", 1)}

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any]) -> DiffusionLMConfig:
        return DiffusionLMConfig.from_llada(raw)

    def __init__(self, config: DiffusionLMConfig):
        super().__init__(config)
        self.model = nn.Module()  # checkpoint names start with model.transformer.
        self.model.transformer = LLaDATransformer(config)

    def parts(self) -> tuple[VocabParallelEmbedding, nn.ModuleList, RMSNorm, ParallelLMHead]:
        t = self.model.transformer
        return t.wte, t.blocks, t.ln_f, t.ff_out


# ---- Dream ------------------------------------------------------------------------------------


class DreamAttention(nn.Module):
    def __init__(self, config: DiffusionLMConfig, layer_idx: int):
        super().__init__()
        self.qkv_proj = _qkv_proj(config, bias=True)
        self.o_proj = RowParallelLinear(config.num_attention_heads * config.head_dim,
                                        config.hidden_size)
        self.attn = _attention(self.qkv_proj, config, layer_idx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment], residual: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.attn(self.qkv_proj(x), cos, sin, segments), residual)


class DreamLayer(nn.Module):
    def __init__(self, config: DiffusionLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DreamAttention(config, layer_idx)
        self.mlp = DecoderMLP(config, ArchSpec())
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention(self) -> BidirectionalAttention:
        return self.self_attn.attn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segments: list[Segment]) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), cos, sin, segments, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class DreamBaseModel(nn.Module):
    def __init__(self, config: DiffusionLMConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DreamLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DreamModel(DiffusionLM):
    logits_shift = 1
    packed_modules_mapping = PACKED_MODULES  # Qwen2's names

    @classmethod
    def config_from_dict(cls, raw: dict[str, Any]) -> DiffusionLMConfig:
        return DiffusionLMConfig.from_dream(raw)

    def __init__(self, config: DiffusionLMConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def parts(self) -> tuple[VocabParallelEmbedding, nn.ModuleList, RMSNorm, ParallelLMHead]:
        return self.model.embed_tokens, self.model.layers, self.model.norm, self.lm_head
