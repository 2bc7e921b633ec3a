"""Weight loading: name mapping, clear errors on missing / unexpected tensors, tied weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zomni.workers.loader import WeightLoadError, expected_checkpoint_names, load_model


def _copy_with(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_loads_every_tensor_once(model_dirs):
    model, config = load_model(model_dirs["qwen3"], torch.float32, "cpu")
    names = expected_checkpoint_names(model)
    assert names["model.layers.0.self_attn.k_proj.weight"] == (
        "model.layers.0.self_attn.qkv_proj.weight", "k")
    assert names["model.layers.1.mlp.up_proj.weight"] == ("model.layers.1.mlp.gate_up_proj.weight",
                                                          1)
    assert "model.layers.0.self_attn.q_norm.weight" in names
    ckpt = load_file(model_dirs["qwen3"] / "model.safetensors")
    assert set(names) == set(ckpt)
    qkv = model.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([ckpt[f"model.layers.1.self_attn.{n}_proj.weight"]
                                       for n in "qkv"]))


def test_missing_tensor_is_named(model_dirs, tmp_path):
    _copy_with(model_dirs["llama"], tmp_path / "m",
               lambda t: t.pop("model.layers.1.mlp.gate_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"missing tensors \['model.layers.1.mlp.gate_proj"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_unexpected_tensor_is_named(model_dirs, tmp_path):
    _copy_with(model_dirs["llama"], tmp_path / "m",
               lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightLoadError, match=r"unexpected tensors \['model.layers.0.extra"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_wrong_shape_names_the_tensor(model_dirs, tmp_path):
    _copy_with(model_dirs["llama"], tmp_path / "m",
               lambda t: t.update({"model.norm.weight": torch.zeros(3)}))
    with pytest.raises(WeightLoadError, match="model.norm.weight"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_no_safetensors_is_an_error(model_dirs, tmp_path):
    shutil.copytree(model_dirs["llama"], tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no \\*.safetensors"):
        load_model(tmp_path / "m", torch.float32, "cpu")


def test_tied_embeddings_share_one_parameter(tmp_path):
    from zomni.testing import build_model

    path = build_model(tmp_path / "tied", "qwen2", tie_word_embeddings=True)
    model, _ = load_model(path, torch.bfloat16, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE stays fp32
