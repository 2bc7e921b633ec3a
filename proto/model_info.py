"""What every process needs to know about a model directory, read from its JSON files only.

A folder says its kind: an HF `config.json` with a causal-LM architecture is an LLM (AR); one
with a masked-diffusion LM architecture (LLaDA, Dream: their `architectures`, or their
`model_type` when that list is missing) is a DLLM; a diffusers pipeline folder
(`model_index.json`, with `transformer/`, `vae/`, `scheduler/` and, for text-conditioned
pipelines, `text_encoder*/` and `tokenizer*/`) is an image model.
`ARCHITECTURES` is the one table of what zomni serves: the workers import the model class it
names, everyone else reads the kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from .errors import InvalidRequest
from .messages import (
    DiffusionLMModelInfo,
    ImageModelInfo,
    ModelInfo,
    ModelKind,
    TokenModelInfo,
)


class Architecture(NamedTuple):
    kind: ModelKind
    module: str  # where the workers find the model (imported by name: no torch here)
    cls: str
    # image pipelines: __call__'s defaults in diffusers (steps, guidance scale)
    default_num_steps: int = 0
    default_guidance_scale: float = 0.0
    # masked-diffusion LMs: DiffusionParams' defaults (remasking, block_length)
    default_remasking: str = ""
    default_block_length: int = 0


_DECODER = "zomni.workers.models.decoder"
_DLLM = "zomni.workers.models.dllm"
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(ModelKind.AR, _DECODER, "LlamaForCausalLM"),
    "MistralForCausalLM": Architecture(ModelKind.AR, _DECODER, "MistralForCausalLM"),
    "Qwen2ForCausalLM": Architecture(ModelKind.AR, _DECODER, "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": Architecture(ModelKind.AR, _DECODER, "Qwen3ForCausalLM"),
    # image models: the key is the pipeline class of model_index.json
    "StableDiffusion3Pipeline": Architecture(ModelKind.IMAGE, "zomni.workers.models.mmdit",
                                             "SD3Transformer2DModel", 28, 7.0),
    "DiTPipeline": Architecture(ModelKind.IMAGE, "zomni.workers.models.dit",
                                "DiTTransformer2DModel", 50, 4.0),
    # masked-diffusion LMs: the key is config.json's `architectures[0]`. Defaults: LLaDA's
    # generate.py (low_confidence, blocks of 32); Dream's README decodes with alg="entropy",
    # in blocks of 32 as Fast-dLLM runs it (block-wise, so blocks stream and caches apply;
    # block_length = max_tokens is Dream's own single-block loop).
    "LLaDAModelLM": Architecture(ModelKind.DLLM, _DLLM, "LLaDAModelLM",
                                 default_remasking="low_confidence", default_block_length=32),
    "DreamModel": Architecture(ModelKind.DLLM, _DLLM, "DreamModel",
                               default_remasking="entropy", default_block_length=32),
}
# config.json `model_type` -> architecture, for DLLM folders whose config lists none
_DLLM_MODEL_TYPES = {"llada": "LLaDAModelLM", "Dream": "DreamModel"}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read {path}: {e}", param="model") from None


def _config_architecture(cfg: dict[str, Any]) -> str:
    names = cfg.get("architectures") or [_DLLM_MODEL_TYPES.get(cfg.get("model_type"), "?")]
    return str(names[0])


def model_kind(model_dir: str | Path) -> ModelKind:
    """The kind of model in `model_dir`, from which JSON file it has (and, for config.json,
    whether its architecture is a masked-diffusion LM)."""
    path = Path(model_dir)
    if (path / "model_index.json").is_file():
        return ModelKind.IMAGE
    if (path / "config.json").is_file():
        arch = ARCHITECTURES.get(_config_architecture(_json(path / "config.json")))
        return ModelKind.DLLM if arch is not None and arch.kind == ModelKind.DLLM \
            else ModelKind.AR
    raise InvalidRequest(f"{str(model_dir)!r} is neither an HF model directory (config.json) "
                         "nor a diffusers pipeline folder (model_index.json)", param="model")


def architecture_of(model_dir: str | Path) -> tuple[str, Architecture]:
    """(architecture name, its table entry); `InvalidRequest` for one zomni does not serve."""
    path = Path(model_dir)
    if model_kind(path) == ModelKind.IMAGE:
        name = _json(path / "model_index.json").get("_class_name", "?")
    else:
        name = _config_architecture(_json(path / "config.json"))
    if name not in ARCHITECTURES:
        raise InvalidRequest(f"unsupported architecture {name}; zomni serves "
                             f"{', '.join(ARCHITECTURES)}", param="model")
    return name, ARCHITECTURES[name]


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _check_tp(tp: int, heads: int, kv_heads: int, mlp: int) -> None:
    """`InvalidRequest` unless `tp` ranks can split the heads and MLP evenly: attention heads
    divide evenly; KV heads either divide evenly or are replicated (then `tp` must be a
    multiple of their number), as in `QKVParallelLinear`."""
    if tp == 1:
        return
    if tp > heads or heads % tp:
        reason = f"must divide the model's {heads} attention heads"
    elif kv_heads % tp and tp % kv_heads:
        reason = f"must divide the model's {kv_heads} KV heads or be a multiple of them"
    elif mlp % tp:
        reason = f"must divide the model's MLP width {mlp}"
    else:
        return
    raise InvalidRequest(f"tensor_parallel_size={tp} {reason}", param="tensor_parallel_size")


def _generation_config(path: Path) -> dict[str, Any]:
    gen_path = path / "generation_config.json"
    return _json(gen_path) if gen_path.is_file() else {}


def _eos_ids(path: Path, cfg: dict[str, Any]) -> list[int]:
    """EOS from generation_config.json when present (chat models list several there), else
    from config.json."""
    return _ids(_generation_config(path).get("eos_token_id")) or _ids(cfg.get("eos_token_id"))


def _context_length(limit: int, max_model_len: int | None, field: str) -> int:
    if max_model_len is None:
        return limit
    if not 2 <= max_model_len <= limit:
        raise InvalidRequest(f"max_model_len must be in [2, {limit}] (the model's {field}), "
                             f"got {max_model_len}", param="max_model_len")
    return max_model_len


def _token_info(path: Path, max_model_len: int | None, tp: int) -> TokenModelInfo:
    """Context length and EOS ids."""
    cfg = _json(path / "config.json")
    heads = int(cfg["num_attention_heads"])
    _check_tp(tp, heads, int(cfg.get("num_key_value_heads") or heads),
              int(cfg.get("intermediate_size", 0)))
    limit = _context_length(int(cfg.get("max_position_embeddings", 2048)), max_model_len,
                            "max_position_embeddings")
    return TokenModelInfo(max_model_len=limit, vocab_size=int(cfg["vocab_size"]),
                          eos_token_ids=_eos_ids(path, cfg))


def _diffusion_lm_info(path: Path, name: str, max_model_len: int | None,
                       tp: int) -> DiffusionLMModelInfo:
    """LLaDA's config.json has its own names (`n_heads`, `mlp_hidden_size`,
    `max_sequence_length`, ...), Dream's are Qwen2's; both carry `mask_token_id` (Dream's may
    be in generation_config.json instead)."""
    cfg = _json(path / "config.json")
    if name == "LLaDAModelLM":
        heads = int(cfg["n_heads"])
        kv_heads = 1 if cfg.get("multi_query_attention") else int(cfg.get("n_kv_heads") or heads)
        mlp = int(cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"])
        length_field = "max_sequence_length"
    else:
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        mlp = int(cfg["intermediate_size"])
        length_field = "max_position_embeddings"
    _check_tp(tp, heads, kv_heads, mlp)
    mask = cfg.get("mask_token_id")
    if mask is None:
        mask = _generation_config(path).get("mask_token_id")
    if mask is None:
        raise InvalidRequest(f"{path}/config.json names no mask_token_id, which a "
                             f"masked-diffusion LM ({name}) needs", param="model")
    limit = _context_length(int(cfg.get(length_field, 2048)), max_model_len, length_field)
    arch = ARCHITECTURES[name]
    return DiffusionLMModelInfo(max_model_len=limit, vocab_size=int(cfg["vocab_size"]),
                                eos_token_ids=_eos_ids(path, cfg), mask_token_id=int(mask),
                                remasking=arch.default_remasking,
                                block_length=arch.default_block_length)


def _image_info(path: Path, arch: Architecture, tp: int) -> ImageModelInfo:
    """Sizes, defaults and conditioning of a diffusers pipeline folder, as its pipeline class
    computes them: default size = the denoiser's `sample_size` x the VAE scale factor
    (`2 ** (len(block_out_channels) - 1)`); sizes must be multiples of that factor x the patch
    size; the largest is bounded by the positional table (`pos_embed_max_size` patches)."""
    transformer = _json(path / "transformer" / "config.json")
    vae = _json(path / "vae" / "config.json")
    heads = int(transformer["num_attention_heads"])
    _check_tp(tp, heads, heads, 4 * heads * int(transformer["attention_head_dim"]))
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    patch = int(transformer.get("patch_size") or 1)
    default = int(transformer["sample_size"]) * vae_factor
    max_patches = transformer.get("pos_embed_max_size")
    class_conditional = "num_embeds_ada_norm" in transformer
    fixed = class_conditional or not max_patches
    largest = default if fixed else int(max_patches) * patch * vae_factor
    return ImageModelInfo(
        conditioning="class" if class_conditional else "text", default_height=default,
        default_width=default, size_multiple=vae_factor * patch, max_height=largest,
        max_width=largest, default_num_steps=arch.default_num_steps,
        default_guidance_scale=arch.default_guidance_scale,
        num_classes=int(transformer.get("num_embeds_ada_norm") or 0), fixed_size=fixed)


def read_model_info(model_dir: str, max_model_len: int | None = None, dtype: str = "",
                    tensor_parallel_size: int = 1) -> ModelInfo:
    """Architecture, kind and the kind's details of the model in `model_dir`; raises
    `InvalidRequest` for a model zomni does not serve or a TP size it cannot split."""
    path = Path(model_dir)
    name, arch = architecture_of(path)
    if arch.kind == ModelKind.IMAGE:
        if max_model_len is not None:
            raise InvalidRequest("max_model_len applies to LLMs, not to image models",
                                 param="max_model_len")
        details = _image_info(path, arch, tensor_parallel_size)
    elif arch.kind == ModelKind.DLLM:
        details = _diffusion_lm_info(path, name, max_model_len, tensor_parallel_size)
    else:
        details = _token_info(path, max_model_len, tensor_parallel_size)
    return ModelInfo(model=str(model_dir), architecture=name, dtype=dtype,
                     tensor_parallel_size=tensor_parallel_size, details=details)
