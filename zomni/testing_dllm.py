"""Random-weight masked-diffusion LMs (LLaDA, Dream) in their HF folder layouts, for tests.

`build_llada_model(path)` and `build_dream_model(path)` start from `testing.build_model` (a
random Llama / Qwen2 with the same tokenizer and generation_config.json as the AR fixtures),
then rewrite config.json and the tensor names the way the hub checkpoints have them:

    LLaDA   config.json with model_type "llada", architectures ["LLaDAModelLM"], d_model,
            n_heads, ...; tensors model.transformer.{wte, blocks.N.{attn_norm, q_proj, ...,
            ff_proj, up_proj, ff_out}, ln_f, ff_out}
    Dream   config.json with model_type "Dream", architectures ["DreamModel"] (Qwen2's
            fields); tensors keep Qwen2's names

The mask token's LM-head row is zero and the other rows are widened, so its logit (0) sits far
below the best token's (probability below 1e-5): a reference loop practically never draws the
mask token, which our decoding never draws (see `workers/dllm_decoding.py`), so token-for-token
comparisons hold at temperature > 0 too.
"""

from __future__ import annotations

import json
from pathlib import Path

from zomni.testing import SHAPES, build_model

# Llama tensor name fragment -> LLaDA's (inside model.layers.N. / model.)
_LLADA_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out",
    "post_attention_layernorm": "ff_norm", "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
}
_LLADA_TOP_NAMES = {"model.embed_tokens.weight": "model.transformer.wte.weight",
                    "model.norm.weight": "model.transformer.ln_f.weight",
                    "lm_head.weight": "model.transformer.ff_out.weight"}
# LM-head widening: logits std ~1.5 -> ~4.5, the mask token's probability below 1e-5
_HEAD_SCALE = 3.0


def llada_name(llama_name: str) -> str:
    """The LLaDA checkpoint name of a Llama tensor name."""
    if llama_name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[llama_name]
    _, _, layer, rest = llama_name.split(".", 3)  # model.layers.N.<part>.<param>
    part, _, param = rest.rpartition(".")
    return f"model.transformer.blocks.{layer}.{_LLADA_LAYER_NAMES[part]}.{param}"


def _rewrite(path: Path, config: dict, rename, mask_token_id: int) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    if "lm_head.weight" in tensors:
        head = tensors["lm_head.weight"]
        head.mul_(_HEAD_SCALE)
        head[mask_token_id] = 0
    renamed = {rename(name): t.contiguous() for name, t in tensors.items()}
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _base(path: str | Path, arch: str, shape: str, seed: int, dtype: str,
          rope_theta: float) -> tuple[Path, tuple]:
    dims = SHAPES[shape]
    hidden, _, heads, _, head_dim, _, _ = dims
    if head_dim * heads != hidden:
        raise ValueError(f"shape {shape!r}: both layouts need head_dim * heads == hidden")
    return build_model(path, arch, shape=shape, seed=seed, dtype=dtype,
                       rope_theta=rope_theta), dims


def build_llada_model(path: str | Path, shape: str = "tiny", seed: int = 0,
                      dtype: str = "float32", rope_theta: float = 500000.0) -> Path:
    """A random LLaDA (LLaDAModelLM) folder at `path`; the mask token is the last id."""
    path, (hidden, layers, heads, kv_heads, _, inter, vocab) = _base(
        path, "llama", shape, seed, dtype, rope_theta)
    mask = vocab - 1
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "activation_type": "silu",
        "alibi": False, "attention_layer_norm": False, "block_type": "llama",
        "d_model": hidden, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
        "mlp_hidden_size": inter, "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab,
        "include_bias": False, "include_qkv_bias": False, "layer_norm_type": "rms",
        "rms_norm_eps": 1e-6, "rope": True, "rope_full_precision": True,
        "rope_theta": rope_theta, "max_sequence_length": 4096, "mask_token_id": mask,
        "eos_token_id": 2, "pad_token_id": 0, "scale_logits": False, "weight_tying": False,
        "input_emb_norm": False, "flash_attention": False, "use_cache": False,
    }
    _rewrite(path, config, llada_name, mask)
    return path


def build_dream_model(path: str | Path, shape: str = "tiny", seed: int = 0,
                      dtype: str = "float32", rope_theta: float = 1000000.0) -> Path:
    """A random Dream (DreamModel) folder at `path`; the mask token is the last id."""
    path, (hidden, layers, heads, kv_heads, _, inter, vocab) = _base(
        path, "qwen2", shape, seed, dtype, rope_theta)
    mask = vocab - 1
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": rope_theta,
        "rope_scaling": None, "sliding_window": None, "use_sliding_window": False,
        "tie_word_embeddings": False, "mask_token_id": mask, "bos_token_id": None,
        "eos_token_id": 2, "pad_token_id": 0, "attention_dropout": 0.0,
    }
    _rewrite(path, config, lambda name: name, mask)
    return path
