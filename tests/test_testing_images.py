"""The random-weight pipeline folders load with diffusers' own code and generate sanely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zomni.testing_images import CLIP_MAX_LENGTH, PIPELINE_KINDS, SHAPES, build_pipeline

CAPTION = "a red circle on a blue background, top left"


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory) -> dict[str, Path]:
    """kind -> folder of the tiny random-weight pipeline of that kind."""
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: build_pipeline(root / kind, kind) for kind in PIPELINE_KINDS}


def _sd3_images(pipe, seed: int) -> np.ndarray:
    return pipe(CAPTION, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=3,
                guidance_scale=5.0, height=32, width=32, output_type="np").images


def _dit_images(pipe, seed: int) -> np.ndarray:
    return pipe(class_labels=[1, 2], generator=torch.Generator("cpu").manual_seed(seed),
                num_inference_steps=3, guidance_scale=4.0, output_type="np").images


@pytest.mark.parametrize("kind", ["sd3", "dit"])
def test_pipeline_generates_seeded_finite_images(pipeline_dirs, kind):
    from diffusers import DiTPipeline, StableDiffusion3Pipeline

    cls, run = {"sd3": (StableDiffusion3Pipeline, _sd3_images),
                "dit": (DiTPipeline, _dit_images)}[kind]
    pipe = cls.from_pretrained(pipeline_dirs[kind])
    pipe.set_progress_bar_config(disable=True)
    first, again, other = run(pipe, 0), run(pipe, 0), run(pipe, 1)
    assert first.shape == ((1, 32, 32, 3) if kind == "sd3" else (2, 32, 32, 3))
    assert np.isfinite(first).all() and first.std() > 0.01
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-2


def test_sd3_components_are_consistent(pipeline_dirs):
    root = pipeline_dirs["sd3"]
    index = json.loads((root / "model_index.json").read_text())
    assert index["tokenizer_3"] == ["transformers", "T5TokenizerFast"]
    config = json.loads((root / "transformer" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    t5 = json.loads((root / "text_encoder_3" / "config.json").read_text())
    clips = [json.loads((root / d / "config.json").read_text())
             for d in ("text_encoder", "text_encoder_2")]
    assert config["joint_attention_dim"] == t5["d_model"] >= sum(c["hidden_size"] for c in clips)
    assert config["pooled_projection_dim"] == sum(c["projection_dim"] for c in clips)
    assert config["in_channels"] == config["out_channels"] == vae["latent_channels"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 2
    assert json.loads((root / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0


def test_sd3_tokenizers(pipeline_dirs):
    from transformers import AutoTokenizer

    root = pipeline_dirs["sd3"]
    for sub, pad in [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")]:
        tok = AutoTokenizer.from_pretrained(root / sub)
        ids = tok(CAPTION, padding="max_length", max_length=CLIP_MAX_LENGTH).input_ids
        n = len(tok(CAPTION).input_ids)
        assert len(ids) == tok.model_max_length == CLIP_MAX_LENGTH
        assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id
        assert tok.pad_token == pad and set(ids[n:]) == {tok.pad_token_id}
        assert tok.unk_token_id not in ids[1:n - 1]
        # CLIP's decoder puts a space before punctuation, as the released tokenizers do
        assert tok.decode(ids, skip_special_tokens=True) == CAPTION.replace(",", " ,")
        config = json.loads((root / sub.replace("tokenizer", "text_encoder") / "config.json")
                            .read_text())
        assert config["vocab_size"] == len(tok) and config["eos_token_id"] == tok.eos_token_id

    t5 = AutoTokenizer.from_pretrained(root / "tokenizer_3")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5(CAPTION, padding="max_length", max_length=256).input_ids
    n = len(t5(CAPTION).input_ids)
    assert len(ids) == 256 and t5.model_max_length >= 256
    assert ids[n - 1] == 1 and set(ids[n:]) == {0} and 2 not in ids
    assert t5.decode(ids, skip_special_tokens=True) == CAPTION
    config = json.loads((root / "text_encoder_3" / "config.json").read_text())
    assert config["vocab_size"] == len(t5)


def test_dit_folder_mirrors_release(pipeline_dirs):
    from diffusers import DiTPipeline

    root = pipeline_dirs["dit"]
    config = json.loads((root / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == 1000
    assert config["out_channels"] == 2 * config["in_channels"]
    assert not json.loads((root / "scheduler" / "scheduler_config.json").read_text())["clip_sample"]
    assert DiTPipeline.from_pretrained(root).get_label_ids(["goldfish", "white shark"]) == [1, 2]


def test_builds_are_deterministic_per_seed(tmp_path):
    files = "transformer/diffusion_pytorch_model.safetensors"
    a, b, c = (build_pipeline(tmp_path / name, "dit", seed=seed)
               for name, seed in [("a", 0), ("b", 0), ("c", 1)])
    assert (a / files).read_bytes() == (b / files).read_bytes() != (c / files).read_bytes()


def test_bench_shape_is_sd3_shaped():
    bench = SHAPES["bench"]
    assert (bench.layers, bench.heads, bench.head_dim) == (8, 8, 64)
    assert 2 ** (len(bench.vae_channels) - 1) * bench.sample_size == 256
    assert bench.pos_embed_max_size >= 512 // 8 // 2
