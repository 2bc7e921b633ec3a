"""Our DiT and MMDiT denoisers against diffusers' on the same tiny random weights.

Each diffusers model is built from a small config, every checkpoint tensor (the SD3 positional
table included) re-drawn at random, saved with `save_pretrained` and loaded through our
`load_denoiser`. One batched forward (3 rows at 3 different timesteps) must agree in fp32 to
1e-4 of the output's scale: unpacked, packed for the CPU GEMMs, and at TP=2 over gloo (both
ranks), where each rank must also hold exactly half of every split block weight.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from zomni.workers.denoiser_loader import load_denoiser
from zomni.workers.loader import WeightLoadError
from zomni.workers.models import diffusion_layers

SD3 = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
           num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
           pooled_projection_dim=24, out_channels=4, pos_embed_max_size=16)
CONFIGS = {
    "sd3": ("SD3Transformer2DModel", SD3),
    # SD3.5-medium's switches: q/k RMSNorm and a second self-attention in block 0.
    "sd35": ("SD3Transformer2DModel",
             SD3 | dict(num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "dit": ("DiTTransformer2DModel",
            dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)),
    "dit_affine": ("DiTTransformer2DModel",
                   dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                        activation_fn="gelu", norm_elementwise_affine=True)),
}
# Latent sizes [H, W]: SD3 crops its positional table (non-square too); DiT computes its table,
# at the training grid and at a larger one.
LATENTS = {"sd3": [(16, 16), (8, 12)], "sd35": [(16, 16), (8, 12)],
           "dit": [(8, 8), (12, 12)], "dit_affine": [(8, 8)]}


def randomize(model: nn.Module, seed: int) -> None:
    """Every checkpoint tensor ~ N(0, 1 / fan_in): nothing is zero (diffusers zero-inits some)
    or one, so no mistake passes by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            fan_in = t[0].numel() if t.dim() > 1 else t.numel()
            t.copy_(torch.randn(t.shape, generator=gen) / math.sqrt(fan_in))


def make_inputs(kind: str, height: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    """One batch of 3 rows, each at its own timestep (and for DiT the no-class label)."""
    gen = torch.Generator().manual_seed(seed)
    channels = CONFIGS[kind][1]["in_channels"]
    latents = torch.randn(3, channels, height, width, generator=gen)
    if kind.startswith("dit"):
        return dict(hidden_states=latents, timestep=torch.tensor([999, 500, 3]),
                    class_labels=torch.tensor([1, 1000, 7]))
    return dict(hidden_states=latents, timestep=torch.tensor([999.0, 500.5, 3.0]),
                encoder_hidden_states=torch.randn(3, 7, 32, generator=gen),
                pooled_projections=torch.randn(3, 24, generator=gen))


def pack(model: nn.Module) -> None:
    for module in model.modules():  # as the runner does after loading
        if hasattr(module, "pack"):
            module.pack(batch_hint=4)


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff <= 1e-4 * max(1.0, ref.abs().max().item()), diff
    return diff


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """kind -> (saved diffusers transformer dir, {latent size: (inputs, diffusers output)})."""
    import diffusers  # here, not at import: spawned ranks import this module too

    root = tmp_path_factory.mktemp("denoisers")
    out = {}
    for i, (kind, (class_name, config)) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        ref = getattr(diffusers, class_name)(**config).eval()
        randomize(ref, seed=100 + i)
        ref.save_pretrained(root / kind)
        cases = {}
        for j, (h, w) in enumerate(LATENTS[kind]):
            inputs = make_inputs(kind, h, w, seed=10 * i + j)
            with torch.no_grad():
                cases[(h, w)] = inputs, ref(**inputs, return_dict=False)[0]
        out[kind] = root / kind, cases
    return out


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_matches_diffusers(checkpoints, kind):
    model_dir, cases = checkpoints[kind]
    model = load_denoiser(model_dir, torch.float32, "cpu")
    assert model.config.in_channels == CONFIGS[kind][1]["in_channels"]
    for packed in (False, True):
        if packed:
            pack(model)
        for inputs, ref in cases.values():
            with torch.no_grad():
                assert_matches(model(**inputs), ref)


def _tp_rank(rank: int, world: int, tmp: str, kinds: list[str], dirs: list[str]) -> None:
    """One TP rank: load each model's shard, count its block weights, run its forwards."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)
    try:
        results = {}
        for kind, model_dir in zip(kinds, dirs):
            model = load_denoiser(model_dir, torch.float32, "cpu")
            numel = sum(p.numel() for p in model.transformer_blocks.parameters())
            pack(model)
            cases = torch.load(f"{tmp}/{kind}.pt")
            with torch.no_grad():
                results[kind] = numel, [model(**inputs) for inputs in cases]
        torch.save(results, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _expected_block_numel(model_dir: Path, tp: int) -> tuple[int, int]:
    """(all block weights, what one of `tp` ranks holds): split layers 1/tp each; adaLN and
    embedders, q/k norms and the row-parallel layers' biases in full."""
    checkpoint = load_file(model_dir / "diffusion_pytorch_model.safetensors")
    tensors = {n: t for n, t in checkpoint.items() if n.startswith("transformer_blocks.")}
    replicated = sum(t.numel() for n, t in tensors.items()
                     if ".norm" in n or n.endswith(("to_out.0.bias", "to_add_out.bias",
                                                    "net.2.bias")))
    total = sum(t.numel() for t in tensors.values())
    return total, replicated + (total - replicated) // tp


def test_tp2_matches_diffusers(checkpoints, tmp_path):
    kinds = ["sd35", "dit"]  # all block kinds: joint, dual, context_pre_only, DiT
    for kind in kinds:
        torch.save([inputs for inputs, _ in checkpoints[kind][1].values()], tmp_path / f"{kind}.pt")
    dirs = [str(checkpoints[k][0]) for k in kinds]
    torch.multiprocessing.spawn(_tp_rank, args=(2, str(tmp_path), kinds, dirs), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for kind in kinds:
            numel, outputs = results[kind]
            total, expected = _expected_block_numel(checkpoints[kind][0], 2)
            assert numel == expected, (kind, numel, expected, total)
            for out, (_, ref) in zip(outputs, checkpoints[kind][1].values()):
                assert_matches(out, ref)


def test_tp_size_must_divide_heads(checkpoints, monkeypatch):
    monkeypatch.setattr(diffusion_layers, "get_tp_size", lambda: 3)
    for kind in ("sd3", "dit"):
        with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by "
                                             r"the tensor-parallel size \(3\)"):
            load_denoiser(checkpoints[kind][0], torch.float32, "cpu")


def test_loader_names_what_does_not_match(checkpoints, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["sd3"][0], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(config | {"num_layers": 2}))
    with pytest.raises(WeightLoadError, match="transformer_blocks.2"):
        load_denoiser(bad, torch.float32, "cpu")
    (bad / "config.json").write_text(json.dumps(config | {"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unsupported denoiser 'UNet2DModel'"):
        load_denoiser(bad, torch.float32, "cpu")
    (bad / "config.json").write_text(json.dumps(config | {"qk_norm": "l2"}))
    with pytest.raises(ValueError, match="qk_norm 'l2' is not supported"):
        load_denoiser(bad, torch.float32, "cpu")


def test_legacy_dit_config_is_remapped(checkpoints, tmp_path):
    """facebook/DiT-* checkpoints name the generic Transformer2DModel, with its extra keys."""
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoints["dit"][0], legacy)
    config = json.loads((legacy / "config.json").read_text())
    config |= {"_class_name": "Transformer2DModel", "cross_attention_dim": None,
               "num_vector_embeds": None, "only_cross_attention": False,
               "use_linear_projection": False}
    (legacy / "config.json").write_text(json.dumps(config))
    model = load_denoiser(legacy, torch.float32, "cpu")
    inputs, ref = next(iter(checkpoints["dit"][1].values()))
    with torch.no_grad():
        assert_matches(model(**inputs), ref)
