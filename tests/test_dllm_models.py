"""LLaDA and Dream: the folders' kind and model info, weight loading, and our bidirectional
forward against transformers' Llama / Qwen2 with a full attention mask (`dllm_reference`).

Tolerance: logits allclose with atol 1e-4 (fp32; |logits| ~ 5 to 15).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dllm_reference import RefModel
from safetensors.torch import load_file, save_file

from zomni.proto import DiffusionLMModelInfo, EngineConfig, InvalidRequest, ModelKind
from zomni.proto.model_info import model_kind, read_model_info
from zomni.workers.dllm_attention import Segment
from zomni.workers.loader import expected_checkpoint_names, load_model
from zomni.workers.models.dllm import DiffusionLMConfig

ATOL = 1e-4
ARCHS = {"llada": "LLaDAModelLM", "dream": "DreamModel"}


@pytest.fixture(scope="module")
def models(dllm_dirs):
    torch.manual_seed(0)
    return {name: (load_model(path, torch.float32, "cpu")[0], RefModel(path))
            for name, path in dllm_dirs.items()}


def _tokens(n: int, seed: int, vocab: int = 511) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ARCHS)
def test_folder_is_a_diffusion_lm(dllm_dirs, name, tmp_path):
    path = dllm_dirs[name]
    assert model_kind(path) == ModelKind.DLLM
    info = read_model_info(str(path), max_model_len=64, tensor_parallel_size=2)
    assert info.architecture == ARCHS[name] and info.kind == ModelKind.DLLM
    assert info.details == DiffusionLMModelInfo(
        max_model_len=64, vocab_size=512, eos_token_ids=[2], mask_token_id=511,
        remasking={"llada": "low_confidence", "dream": "entropy"}[name], block_length=32)
    with pytest.raises(InvalidRequest, match="tensor_parallel_size=3"):
        read_model_info(str(path), tensor_parallel_size=3)
    EngineConfig(model=str(path), num_kv_blocks=8, block_size=16)  # served by the engine
    for field in ("enable_prefix_caching", "max_num_batched_tokens"):  # what it cannot use
        with pytest.raises(InvalidRequest, match="autoregressive") as e:
            EngineConfig(model=str(path), **{field: 64 if "tokens" in field else True})
        assert e.value.param == field
    with pytest.raises(InvalidRequest, match="one step at a time"):
        EngineConfig(model=str(path), async_scheduling=True)
    # a config without `architectures` is recognised by its model_type
    shutil.copytree(path, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["architectures"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert read_model_info(str(tmp_path / "m")).architecture == ARCHS[name]
    del cfg["mask_token_id"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidRequest, match="mask_token_id"):
        read_model_info(str(tmp_path / "m"))


def test_llada_names_and_gate(dllm_dirs, models):
    """Every checkpoint tensor is loaded once; ff_proj is the SiLU gate, up_proj the up."""
    model, _ = models["llada"]
    names = expected_checkpoint_names(model)
    ckpt = load_file(dllm_dirs["llada"] / "model.safetensors")
    assert set(names) == set(ckpt)
    block = "model.transformer.blocks.1"
    assert names[f"{block}.ff_proj.weight"] == (f"{block}.gate_up_proj.weight", 0)
    assert names[f"{block}.up_proj.weight"] == (f"{block}.gate_up_proj.weight", 1)
    gate_up = torch.cat([ckpt[f"{block}.ff_proj.weight"], ckpt[f"{block}.up_proj.weight"]])
    assert torch.equal(model.model.transformer.blocks[1].gate_up_proj.weight, gate_up)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_bidirectional_reference(models, name):
    model, ref = models[name]
    x = _tokens(21, seed=3)
    with torch.no_grad():
        ours = model.compute_logits(model(x, [Segment(0, 21)]))
    expected = ref.raw_logits(x[None])[0]
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    causal = ref.raw_logits(x[None], causal=True)[0]
    assert (causal[:-1] - expected[:-1]).abs().amax(-1).min() > 1e-2  # it is bidirectional


@pytest.mark.parametrize("name", ARCHS)
def test_batched_segments_and_packed_weights(dllm_dirs, name):
    """Sequences of different lengths in one forward, weights packed as the runner packs
    them: each sequence's logits as alone, against the reference."""
    model, _ = load_model(dllm_dirs[name], torch.float32, "cpu")
    for module in model.modules():
        if hasattr(module, "pack"):
            module.pack(batch_hint=8)
    ref = RefModel(dllm_dirs[name])
    a, b = _tokens(9, seed=4), _tokens(17, seed=5)
    with torch.no_grad():
        hidden = model(torch.cat([a, b]), [Segment(0, 9), Segment(0, 17)])
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits[:9], ref.raw_logits(a[None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[9:], ref.raw_logits(b[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_cached_windows_match_reference(models, name):
    """A refresh stores every position's K/V; a later window reads the cached prefix (and
    suffix) and recomputes only its rows, after its tokens changed: as transformers with
    the same cached K/V (DynamicCache)."""
    model, ref = models[name]
    x = _tokens(24, seed=6)
    with torch.no_grad():
        _, ref_kv = ref.logits_and_kv(x[None])
        y = x.clone()
        y[10:18] = _tokens(8, seed=7)  # the "block" got new tokens
        for start, stop, suffix in ((10, 24, False), (10, 18, True)):
            kv = model.new_kv_cache(24)
            model(x, [Segment(0, 24, kv)])  # the refresh
            hidden = model(y[start:stop], [Segment(start, stop, kv, read_prefix=True,
                                                   read_suffix=suffix)])
            ours = model.compute_logits(hidden)
            first = start + ref.shift  # window_logits starts its rows at start - shift
            expected = ref.window_logits(y[None], first, stop, ref_kv, suffix)[0]
            torch.testing.assert_close(ours[: stop - first], expected, atol=ATOL, rtol=0)
            full = model.compute_logits(model(y, [Segment(0, 24)]))
            assert not torch.allclose(ours, full[start:stop], atol=1e-3)  # cache was used


def test_llada_weight_tying_and_embedding_size(dllm_dirs, tmp_path):
    path = tmp_path / "tied"
    shutil.copytree(dllm_dirs["llada"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(weight_tying=True, vocab_size=500)  # embedding_size stays 512
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(path / "model.safetensors")
    del tensors["model.transformer.ff_out.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model, config = load_model(path, torch.float32, "cpu")
    transformer = model.model.transformer
    assert transformer.ff_out.weight is transformer.wte.weight
    with torch.no_grad():
        logits = model.compute_logits(model(_tokens(5, seed=8), [Segment(0, 5)]))
    assert logits.shape == (5, 512) and config.vocab_size == 500


@pytest.mark.parametrize("key, value", [("block_type", "sequential"), ("include_bias", True),
                                        ("layer_norm_type", "default"), ("scale_logits", True)])
def test_llada_switches_we_do_not_implement(dllm_dirs, key, value):
    cfg = json.loads((dllm_dirs["llada"] / "config.json").read_text())
    with pytest.raises(ValueError, match=key):
        DiffusionLMConfig.from_llada({**cfg, key: value})
