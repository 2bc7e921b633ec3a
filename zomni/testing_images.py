"""Random-weight diffusers pipelines for tests and benchmarks (no hub exists on our machines).

`build_sd3_pipeline(path)` writes a `StableDiffusion3Pipeline` folder and `build_dit_pipeline(path)`
a `DiTPipeline` folder, each with `pipeline.save_pretrained`, so they are laid out exactly as a
hub download (model_index.json plus one folder per component) and the real loading code is what
gets tested. The tokenizers are trained here on a fixed caption corpus:

    tokenizer/, tokenizer_2/   CLIP byte-level BPE, 77 tokens, <|startoftext|> ... <|endoftext|>
                               (CLIP-L pads with <|endoftext|>, CLIP-G with "!", as SD3 ships them)
    tokenizer_3/               T5 Unigram: <pad>=0, </s>=1, <unk>=2, "</s>" appended

Every weight is redrawn (see `_randomize`) so that no output is near zero by construction and a
wrong implementation cannot match the reference by accident.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from torch import nn
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer


@dataclass(frozen=True)
class ImageShape:
    # transformer blocks
    layers: int
    # attention heads; transformer width = heads * head_dim
    heads: int
    head_dim: int
    # latent side at the default resolution (pixels / VAE scale factor)
    sample_size: int
    # SD3 only: largest latent side, in patches, that the cropped position embedding covers
    pos_embed_max_size: int
    # VAE channels per resolution; VAE scale factor = 2 ** (len - 1)
    vae_channels: tuple[int, ...]
    # VAE GroupNorm groups; divides every entry of vae_channels
    vae_groups: int
    # VAE latent channels == transformer in_channels
    latent_channels: int
    # SD3 CLIP-L and CLIP-G text towers: (hidden, layers, heads, projection); the pipeline pads
    # their concatenated hidden states to the T5 width, so clip_l + clip_g hidden <= t5 d_model
    clip_l: tuple[int, int, int, int]
    clip_g: tuple[int, int, int, int]
    # SD3 T5 encoder: (d_model == joint_attention_dim, layers, heads, d_kv, d_ff)
    t5: tuple[int, int, int, int, int]


SHAPES = {
    # 32x32 images (latent 16x16, 8x8 patches), up to 128x128. Projection != hidden so that the
    # pooled (projected) and per-token (hidden) CLIP outputs cannot be confused; T5 heads * d_kv
    # != d_model; the CLIP states are zero-padded 80 -> 96.
    "tiny": ImageShape(
        layers=2, heads=2, head_dim=16, sample_size=16, pos_embed_max_size=32,
        vae_channels=(16, 32), vae_groups=8, latent_channels=4,
        clip_l=(32, 2, 2, 16), clip_g=(48, 2, 3, 32), t5=(96, 2, 4, 16, 128)),
    # SD3-shaped benchmark: 256x256 images (latent 32x32, 16x16 patches), up to 1024x1024.
    "bench": ImageShape(
        layers=8, heads=8, head_dim=64, sample_size=32, pos_embed_max_size=64,
        vae_channels=(32, 64, 64, 64), vae_groups=32, latent_channels=16,
        clip_l=(128, 3, 2, 128), clip_g=(192, 3, 3, 192), t5=(384, 3, 6, 64, 1024)),
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
# ImageNet classes 0-4 as DiT's id2label has them: comma-separated synonyms.
DIT_LABELS = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    2: "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
    3: "tiger shark, Galeocerdo cuvieri",
    4: "hammerhead, hammerhead shark",
}

_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
            "white", "gray", "cyan", "magenta"]
_FORMS = ["circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond", "hexagon",
          "line", "dot"]
_PLACES = ["top left", "top right", "bottom left", "bottom right", "in the center", "on the left",
           "on the right", "at the top", "at the bottom"]
_SIZES = ["small", "large", "tiny", "big", "thin", "bright", "dark"]
_EXTRA = ["A painting of a squirrel eating a burger", "a photo of a cat holding a sign",
          "an astronaut riding a horse on the moon, 4k, highly detailed", "deformed, blurry"]


def _captions() -> list[str]:
    """Fixed corpus, e.g. "a small red circle on a blue background, top left"."""
    out = list(_EXTRA)
    for i in range(600):
        size, form, place = _SIZES[i % 7], _FORMS[i % 11], _PLACES[i % 9]
        fg, bg = _COLOURS[i % 13], _COLOURS[(i * 5 + 3) % 13]
        out.append(f"a {size} {fg} {form} on a {bg} background, {place}")
    return out


def train_clip_tokenizers(vocab_size: int = 1024) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """Train one CLIP BPE; return it padding with <|endoftext|> (CLIP-L) and with "!" (CLIP-G).

    The vocabulary is laid out as CLIP's: the 256 byte symbols in CLIP's order ("!" first), the
    same with the end-of-word suffix "</w>", one entry per merge, then the two specials. Every
    byte is in it, so no text maps to the unknown token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    # transformers 5 rebuilds CLIP's normalizer and pre-tokenizer in `CLIPTokenizer.__init__` and
    # takes only vocab and merges from tokenizer.json, so train with exactly those.
    clip = CLIPTokenizer().backend_tokenizer
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tok.normalizer, tok.pre_tokenizer = clip.normalizer, clip.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_captions(), trainer=trainer)
    merges = [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # code point order == CLIP's order
    symbols = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    return tuple(CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad,
                               model_max_length=CLIP_MAX_LENGTH)
                 for pad in ["<|endoftext|>", "!"])


def train_t5_tokenizer() -> T5Tokenizer:
    """Fit a T5 Unigram: <pad>=0, </s>=1, <unk>=2, "</s>" appended, no sentinel tokens.

    Pieces are the corpus words as "▁word", scored by log frequency, and every printable ASCII
    character, scored below any word, so unseen words split into characters. (The `tokenizers`
    Unigram trainer keeps only ~100 sub-word pieces on a corpus this small.)
    """
    from transformers import T5Tokenizer

    words = Counter(w for c in _captions() for w in re.findall(r"\w+", c))
    total = sum(words.values())
    pieces = [("▁" + w, math.log(n / total)) for w, n in words.most_common()]
    floor = pieces[-1][1] - 1.0
    chars = [("▁", floor)] + [(ch, floor - 1.0) for ch in string.printable if not ch.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + chars
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _randomize(model: nn.Module, seed: int) -> None:
    """Redraw every parameter: matrices and convs N(0, 1/fan_in), biases N(0, 0.1^2), other
    vectors (norm scales) 1 + N(0, 0.1^2).

    Default inits zero the biases and set norm scales to one, so an implementation that drops or
    misplaces them would still match; these draws keep every path live while activations stay
    O(1) (finite through a 28-step generation with guidance 5).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.1)


def _vae(shape: ImageShape, seed: int, **fields: object) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    n = len(shape.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=shape.vae_channels,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                        latent_channels=shape.latent_channels, norm_num_groups=shape.vae_groups,
                        sample_size=shape.sample_size * 2 ** (n - 1), **fields)
    _randomize(vae, seed)
    return vae


def _clip(vocab: int, dims: tuple[int, int, int, int], act: str, pad_id: int,
          seed: int) -> CLIPTextModelWithProjection:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    hidden, layers, heads, projection = dims
    # eos_token_id is where the pooled output is read; it must be the real <|endoftext|> id.
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                            projection_dim=projection, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=CLIP_MAX_LENGTH,
                            hidden_act=act, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                            pad_token_id=pad_id)
    model = CLIPTextModelWithProjection(config)
    _randomize(model, seed)
    return model


def _t5(vocab: int, dims: tuple[int, int, int, int, int], seed: int) -> T5EncoderModel:
    from transformers import T5Config, T5EncoderModel

    d_model, layers, heads, d_kv, d_ff = dims
    config = T5Config(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads,
                      d_kv=d_kv, d_ff=d_ff, feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(config)
    _randomize(model, seed)
    return model


def build_sd3_pipeline(path: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight `StableDiffusion3Pipeline` of `shape` to `path`; returns the path."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    path, s = Path(path), SHAPES[shape]
    assert s.clip_l[0] + s.clip_g[0] <= s.t5[0], "CLIP hidden states are padded to the T5 width"
    clip_l_tok, clip_g_tok = train_clip_tokenizers()
    t5_tok = train_t5_tokenizer()
    clip_vocab, width = len(clip_l_tok), s.heads * s.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=s.sample_size, patch_size=2, in_channels=s.latent_channels,
        out_channels=s.latent_channels, num_layers=s.layers, attention_head_dim=s.head_dim,
        num_attention_heads=s.heads, joint_attention_dim=s.t5[0], caption_projection_dim=width,
        pooled_projection_dim=s.clip_l[3] + s.clip_g[3], pos_embed_max_size=s.pos_embed_max_size)
    _randomize(transformer, seed)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's released scheduler
        vae=_vae(s, seed + 1, scaling_factor=1.5305, shift_factor=0.0609,  # SD3's VAE
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(clip_vocab, s.clip_l, "quick_gelu", clip_l_tok.pad_token_id, seed + 2),
        tokenizer=clip_l_tok,
        text_encoder_2=_clip(clip_vocab, s.clip_g, "gelu", clip_g_tok.pad_token_id, seed + 3),
        tokenizer_2=clip_g_tok,
        text_encoder_3=_t5(len(t5_tok), s.t5, seed + 4),
        tokenizer_3=t5_tok)
    pipe.save_pretrained(path)
    # transformers 5 merged T5TokenizerFast into T5Tokenizer (the old name is an alias); name it
    # as the SD3 release's model_index.json does.
    _edit_model_index(path, tokenizer_3=["transformers", "T5TokenizerFast"])
    return path


def build_dit_pipeline(path: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight class-conditional `DiTPipeline` of `shape` to `path`."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    path = Path(path)
    s = replace(SHAPES[shape], latent_channels=4)  # DiT decodes with SD1's 4-channel VAE
    transformer = DiTTransformer2DModel(
        num_attention_heads=s.heads, attention_head_dim=s.head_dim, in_channels=4,
        out_channels=8,  # learned sigma: (noise, variance) per latent channel, as DiT-XL-2
        num_layers=s.layers, sample_size=s.sample_size, patch_size=2,
        num_embeds_ada_norm=1000)  # DiTPipeline uses class 1000 as the null (CFG) class
    _randomize(transformer, seed)
    pipe = DiTPipeline(transformer=transformer, vae=_vae(s, seed + 1, scaling_factor=0.18215),
                       scheduler=DDIMScheduler(clip_sample=False))  # as DiT-XL-2-256's
    pipe.save_pretrained(path)
    # DiTPipeline reads id2label from model_index.json but does not register it, so add it.
    _edit_model_index(path, id2label={str(k): v for k, v in DIT_LABELS.items()})
    return path


def _edit_model_index(path: Path, **entries: object) -> None:
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index.update(entries)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


PIPELINE_KINDS: dict[str, Callable[..., Path]] = {
    "sd3": build_sd3_pipeline,
    "dit": build_dit_pipeline,
}


def build_pipeline(path: str | Path, kind: str = "sd3", shape: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight pipeline of `kind` (a key of PIPELINE_KINDS) to `path`."""
    return PIPELINE_KINDS[kind](path, shape=shape, seed=seed)
