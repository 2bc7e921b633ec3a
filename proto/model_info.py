"""What every process needs to know about a model directory, read from its JSON files only.

A folder says its kind: an HF `config.json` with a causal-LM architecture is an LLM (AR); a
diffusers pipeline folder (`model_index.json`, with `transformer/`, `vae/`, `scheduler/` and,
for text-conditioned pipelines, `text_encoder*/` and `tokenizer*/`) is an image model.
`ARCHITECTURES` is the one table of what zomni serves: the workers import the model class it
names, everyone else reads the kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from .errors import InvalidRequest
from .messages import ImageModelInfo, ModelInfo, ModelKind, TokenModelInfo


class Architecture(NamedTuple):
    kind: ModelKind
    module: str  # where the workers find the model (imported by name: no torch here)
    cls: str
    # image pipelines: __call__'s defaults in diffusers (steps, guidance scale)
    default_num_steps: int = 0
    default_guidance_scale: float = 0.0


_DECODER = "zomni.workers.models.decoder"
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
}


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read {path}: {e}", param="model") from None


def model_kind(model_dir: str | Path) -> ModelKind:
    """The kind of model in `model_dir`, from which JSON file it has."""
    path = Path(model_dir)
    if (path / "model_index.json").is_file():
        return ModelKind.IMAGE
    if (path / "config.json").is_file():
        return ModelKind.AR
    raise InvalidRequest(f"{str(model_dir)!r} is neither an HF model directory (config.json) "
                         "nor a diffusers pipeline folder (model_index.json)", param="model")


def architecture_of(model_dir: str | Path) -> tuple[str, Architecture]:
    """(architecture name, its table entry); `InvalidRequest` for one zomni does not serve."""
    path = Path(model_dir)
    if model_kind(path) == ModelKind.IMAGE:
        name = _json(path / "model_index.json").get("_class_name", "?")
    else:
        name = (_json(path / "config.json").get("architectures") or ["?"])[0]
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


def _token_info(path: Path, max_model_len: int | None, tp: int) -> TokenModelInfo:
    """Context length and EOS ids; EOS from generation_config.json when present (chat models
    list several there), else from config.json."""
    cfg = _json(path / "config.json")
    heads = int(cfg["num_attention_heads"])
    _check_tp(tp, heads, int(cfg.get("num_key_value_heads") or heads),
              int(cfg.get("intermediate_size", 0)))
    eos = _ids(cfg.get("eos_token_id"))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = _ids(_json(gen_path).get("eos_token_id")) or eos
    limit = int(cfg.get("max_position_embeddings", 2048))
    if max_model_len is not None:
        if not 2 <= max_model_len <= limit:
            raise InvalidRequest(f"max_model_len must be in [2, {limit}] (the model's "
                                 f"max_position_embeddings), got {max_model_len}",
                                 param="max_model_len")
        limit = max_model_len
    return TokenModelInfo(max_model_len=limit, vocab_size=int(cfg["vocab_size"]),
                          eos_token_ids=eos)


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
    else:
        details = _token_info(path, max_model_len, tensor_parallel_size)
    return ModelInfo(model=str(model_dir), architecture=name, dtype=dtype,
                     tensor_parallel_size=tensor_parallel_size, details=details)
