"""Build a diffusion denoiser from a diffusers `transformer/` directory, with this rank's
share of its weights.

The directory holds diffusers' config.json (`_class_name` picks the model) and
diffusion_pytorch_model.safetensors, or its shards. Weights go through the AR loader's
`load_weights`: names are checked in full before anything is read, fused projections follow the
model's `packed_modules_mapping`, and each rank reads only its rows or columns. Packing the
linears for the CPU GEMMs is left to the caller, as for the LLMs (`module.pack(batch_hint)`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from zomni.workers.loader import _default_dtype, load_weights
from zomni.workers.models.dit import DiTConfig, DiTTransformer2DModel
from zomni.workers.models.mmdit import SD3Config, SD3Transformer2DModel

# diffusers `_class_name` -> (our model, its config dataclass)
DENOISER_REGISTRY: dict[str, tuple[type[nn.Module], type]] = {
    "SD3Transformer2DModel": (SD3Transformer2DModel, SD3Config),
    "DiTTransformer2DModel": (DiTTransformer2DModel, DiTConfig),
}
# Older checkpoints (facebook/DiT-*) name the generic Transformer2DModel; diffusers remaps it by
# `norm_type` (model_loading_utils._CLASS_REMAPPING_DICT), same weight names, and drops the
# config keys the new class does not take.
_LEGACY_CLASS_NAMES = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel"}


def read_denoiser_config(transformer_dir: str | Path) -> dict:
    """The raw diffusers config.json of a denoiser directory."""
    path = Path(transformer_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {transformer_dir} (expected a diffusers "
                                f"transformer directory)")
    return json.loads(path.read_text())


def load_denoiser(transformer_dir: str | Path, dtype: torch.dtype,
                  device: torch.device | str) -> nn.Module:
    """Our denoiser for the directory's `_class_name`, weights loaded for this rank, in eval
    mode; `model.config` is the validated config dataclass."""
    raw = read_denoiser_config(transformer_dir)
    name = raw.get("_class_name", "?")
    legacy = _LEGACY_CLASS_NAMES.get((name, raw.get("norm_type")))
    if legacy is not None:
        config_cls = DENOISER_REGISTRY[legacy][1]
        known = {f.name for f in dataclasses.fields(config_cls)}
        raw, name = {k: v for k, v in raw.items() if k in known}, legacy
    if name not in DENOISER_REGISTRY:
        raise ValueError(f"unsupported denoiser {name!r} in {transformer_dir}; supported: "
                         f"{', '.join(DENOISER_REGISTRY)}")
    model_cls, config_cls = DENOISER_REGISTRY[name]
    config = config_cls.from_dict(raw)
    # Parameters are created directly in the target dtype on the target device.
    with _default_dtype(dtype), torch.device(device):
        model = model_cls(config)
    load_weights(model, transformer_dir)
    return model.eval()
