"""Build a model from an HF-format directory and load this rank's share of its weights.

Checkpoint names map to our parameters one to one, except the fused projections:

    model.layers.N.self_attn.{q,k,v}_proj.*  ->  ...self_attn.qkv_proj.*    shard "q" / "k" / "v"
    model.layers.N.mlp.{gate,up}_proj.*      ->  ...mlp.gate_up_proj.*      shard 0 / 1

as each model's `packed_modules_mapping` says (LLaDA's blocks fuse ff_proj / up_proj).

Tensors are opened lazily (`get_slice`), so each parameter's `weight_loader` reads only the rows
or columns its rank holds. The full name sets are compared before anything is read: a missing or
unexpected tensor fails with the names, not with a shape error halfway through.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from zomni.workers.models import get_model_class
from zomni.workers.parallel_state import materialize

# Tensors some checkpoints carry that we compute ourselves.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """The checkpoint's tensors do not match the model the config describes."""


def default_weight_loader(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    tensor = materialize(loaded)
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, "
                         f"checkpoint {tuple(tensor.shape)}")
    param.data.copy_(tensor)


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    """The HF config object (only its configuration class; no HF modeling code is used)."""
    return AutoConfig.from_pretrained(str(model_dir))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_config(model_dir: str | Path) -> tuple[type[nn.Module], Any]:
    """(our model class, its config) for `model_dir`. Masked-diffusion LMs (LLaDA, Dream) ship
    their config class as remote code, so their classes read config.json themselves
    (`config_from_dict`); every other architecture gets its HF config object."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    arch = (raw.get("architectures") or ["?"])[0]
    cls = get_model_class(arch)
    reader = getattr(cls, "config_from_dict", None)
    return cls, (reader(raw) if reader is not None else load_hf_config(model_dir))


def load_model(model_dir: str | Path, dtype: torch.dtype,
               device: torch.device | str) -> tuple[nn.Module, Any]:
    """Our model for `model_dir`'s architecture, weights loaded for this rank, in eval mode."""
    cls, config = load_config(model_dir)
    # Parameters are created directly in the target dtype on the target device (no fp32 copy).
    with _default_dtype(dtype), torch.device(device):
        model = cls(config)
    load_weights(model, model_dir)
    return model.eval(), config


def expected_checkpoint_names(model: nn.Module) -> dict[str, tuple[str, Any]]:
    """HF tensor name -> (our parameter name, shard id) for every parameter of `model`."""
    packed: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for hf_name, (fused, shard_id) in getattr(model, "packed_modules_mapping", {}).items():
        packed[fused].append((hf_name, shard_id))
    names: dict[str, tuple[str, Any]] = {}
    for name, _ in model.named_parameters():  # tied parameters are listed once
        parts = name.split(".")
        fused = next((p for p in parts if p in packed), None)
        if fused is None:
            names[name] = (name, None)
            continue
        for hf_name, shard_id in packed[fused]:
            names[".".join(hf_name if p == fused else p for p in parts)] = (name, shard_id)
    return names


def _checkpoint_index(model_dir: Path) -> dict[str, Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {model_dir}")
    index: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                index[name] = path
    return index


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor in `model_dir` into `model` (this rank's shard only)."""
    model_dir = Path(model_dir)
    index = _checkpoint_index(model_dir)
    expected = expected_checkpoint_names(model)
    tied = getattr(model.config, "tie_word_embeddings", False)
    ignored = {n for n in index
               if n.endswith(_IGNORED_SUFFIXES) or (tied and n == "lm_head.weight")}
    missing = sorted(set(expected) - set(index))
    unexpected = sorted(set(index) - set(expected) - ignored)
    if missing or unexpected:
        raise WeightLoadError(
            f"checkpoint in {model_dir} does not match {type(model).__name__}: "
            f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = defaultdict(list)
    for hf_name in expected:
        by_file[index[hf_name]].append(hf_name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for hf_name in names:
                    param_name, shard_id = expected[hf_name]
                    param = params[param_name]
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    try:
                        loader(param, f.get_slice(hf_name), shard_id)
                    except ValueError as e:
                        raise WeightLoadError(f"{hf_name} in {path.name}: {e}") from None
