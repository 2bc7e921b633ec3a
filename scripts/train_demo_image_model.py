#!/usr/bin/env python3
"""Train zomni's demo image model: a tiny Stable Diffusion 3 on pictures it draws itself.

There is no model hub on the machines zomni is built and tested on, so the demo image model is
trained here, from pictures of one coloured shape on a coloured background that
scripts/demo_image_data.py draws ("a small red circle on a blue background, top left"). The
result is a diffusers `StableDiffusion3Pipeline` folder (model_index.json, transformer/, vae/,
scheduler/, text_encoder{,_2,_3}/, tokenizer{,_2,_3}/) plus TRAINING.md with the numbers, in
`zomni/demo_image_model/` by default, which `zomni serve --model zomni-demo-image` serves.

Steps (deterministic for a given --seed on a given machine):

1. Split: `--holdout` (shape, colour, background) triples never drawn for training.
2. Tokenizers: zomni.testing_images' CLIP BPE (CLIP-L and CLIP-G) and T5 Unigram, trained on
   its fixed caption corpus, which has every word of these captions.
3. VAE: AutoencoderKL (scale factor 2, 4 latent channels, SD3's layout without quant convs)
   trained on freshly drawn training pictures (MSE + a small KL term); `shift_factor` and
   `scaling_factor` are the mean and 1 / std of the encoded training set, as SD3's.
4. Latents: `--images` training pictures drawn once, encoded (posterior mean), scaled.
5. Denoiser + text encoders, trained together end to end: SD3's rectified flow,
   x_t = (1 - s) x0 + s noise, target noise - x0, s logit-normal(0, 1), timestep s * 1000 (as
   the pipeline feeds it); prompts through the pipeline's own `encode_prompt`; captions
   dropped to "" (the pipeline's negative prompt) with probability --caption-dropout so that
   classifier-free guidance works. AdamW, warmup + cosine, fp32 (faster than bf16 autocast at
   these widths), EMA of the weights.
6. Save with `save_pretrained`, load back with diffusers and through zomni, score the
   generated pictures with the checker (demo_image_report.py) on held-out and training
   captions, draw the contact sheet, write TRAINING.md.

Usage:
    python scripts/train_demo_image_model.py                      # full run (~26 min, 2 cores)
    python scripts/train_demo_image_model.py --vae-steps 20 --steps 20 --images 256 \\
        --eval-images 4 --out /tmp/demo-image                      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from demo_image_attention import (
    CLIP_ROWS,
    RepeatedLastRowAttention,
    check_equivalent,
    short_context,
)
from demo_image_data import SIZE, captions_of, draw, draw_dataset, split_triples
from demo_image_report import evaluate_and_report, log

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "zomni" / "demo_image_model"
VAE_CHANNELS = (16, 32)  # scale factor 2 ** (2 - 1) = 2: 64 px -> 32 x 32 latents
LATENT_CHANNELS = 4
PATCH = 4  # 32 x 32 latents -> 8 x 8 = 64 image tokens
# text towers: (hidden, layers, heads, projection); CLIP-L + CLIP-G hidden = T5 width = the
# denoiser's joint_attention_dim (the pipeline pads the CLIP states to the T5 width)
CLIP_L = (32, 2, 2, 32)
CLIP_G = (64, 2, 2, 64)
T5 = (96, 1, 2, 16, 192)  # (d_model, layers, heads, d_kv, d_ff)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output pipeline folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--holdout", type=int, default=16, help="held-out (shape, colour, "
                    "background) triples")
    ap.add_argument("--vae", type=Path, default=None, help="use this trained vae/ folder "
                    "(of an earlier run) instead of training one (for experiments)")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--vae-lr", type=float, default=3e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the KL term")
    ap.add_argument("--images", type=int, default=16384, help="training pictures (latents)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4500, help="denoiser optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights")
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=3.0, help="sigma shift, s -> shift s / (1 + "
                    "(shift - 1) s), of the training sigmas and of the scheduler (SD3's 3.0)")
    ap.add_argument("--eval-images", type=int, default=48,
                    help="pictures scored per caption set (held-out, training)")
    ap.add_argument("--sheet", type=Path, default=None, help="contact sheet PNG (default: "
                    "docs/demo_image_contact_sheet.png for the default --out, else next to it)")
    ap.add_argument("--time-budget", type=float, default=25 * 60,
                    help="safety stop (s) for the denoiser loop; a run cut short is reported")
    return ap.parse_args(argv)


def setup_runtime(args) -> None:
    """Thread and determinism settings; must run before torch is first imported."""
    # Idle OpenMP threads sleep instead of spinning (see scripts/train_demo_model.py).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 * lr + 0.45 * lr * (1.0 + math.cos(math.pi * progress))


def to_tensor(pixels):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as the pipeline's VAE sees pixels."""
    import torch

    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# 3-4. VAE and latents


def build_vae():
    from diffusers import AutoencoderKL

    n = len(VAE_CHANNELS)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=VAE_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=SIZE,
                         mid_block_add_attention=False, use_quant_conv=False,
                         use_post_quant_conv=False)


def train_vae(args, train_captions) -> tuple[object, list[tuple[int, float, float]]]:
    """(trained VAE, [(step, reconstruction MSE, KL)] every 100 steps); a fresh batch of
    drawn training pictures per step."""
    import numpy as np
    import torch

    torch.manual_seed(args.seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    history, t0 = [], time.perf_counter()
    for step in range(args.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vae_steps, args.vae_steps // 20 + 1, args.vae_lr)
        picks = rng.integers(len(train_captions), size=args.vae_batch)
        x = to_tensor(np.stack([draw(train_captions[i], rng) for i in picks]))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == args.vae_steps:
            history.append((step + 1, mse.item(), kl.item()))
            log(f"vae step {step + 1}/{args.vae_steps}  mse {mse.item():.5f}  kl/dim "
                f"{kl.item():.3f}  {time.perf_counter() - t0:.0f}s")
    return vae.eval(), history


def encode_dataset(args, vae, train_captions):
    """(scaled latents [N, C, h, w], captions, reconstruction MSE of a 256-picture sample);
    sets the VAE's shift_factor and scaling_factor from the latents."""
    import torch

    pixels, captions = draw_dataset(train_captions, args.images, args.seed + 2)
    chunks = []
    with torch.no_grad():
        for i in range(0, len(pixels), 256):
            chunks.append(vae.encode(to_tensor(pixels[i:i + 256])).latent_dist.mean)
        latents = torch.cat(chunks)
        x = to_tensor(pixels[:256])
        recon_mse = (vae.decode(chunks[0]).sample - x).pow(2).mean().item()
    shift, scale = latents.mean().item(), 1.0 / latents.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    log(f"latents {tuple(latents.shape)}: shift_factor {shift:.4f}, scaling_factor "
        f"{scale:.4f}; reconstruction MSE {recon_mse:.5f}")
    return (latents - shift) * scale, captions, recon_mse


# --------------------------------------------------------------------------------------------
# 5. the pipeline and its training


def build_pipeline(args, vae):
    """A StableDiffusion3Pipeline of fresh text towers and denoiser around the trained VAE."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from zomni.testing_images import train_clip_tokenizers, train_t5_tokenizer

    clip_l_tok, clip_g_tok = train_clip_tokenizers()
    # The pipeline pads CLIP prompts to the tokenizer's model_max_length (77 in SD3): the
    # longest caption is 14 tokens + BOS + EOS, and fewer rows make each training step cheaper
    for tok in (clip_l_tok, clip_g_tok):
        tok.model_max_length = CLIP_ROWS
    t5_tok = train_t5_tokenizer()
    vocab = len(clip_l_tok)

    def clip(dims, act, pad_id):
        hidden, layers, heads, projection = dims
        # the pooled output is read at eos_token_id: the real <|endoftext|> id
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
            projection_dim=projection, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=clip_l_tok.model_max_length, hidden_act=act,
            bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=pad_id))

    torch.manual_seed(args.seed + 3)
    d_model, t5_layers, t5_heads, d_kv, d_ff = T5
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=d_model, num_layers=t5_layers, num_heads=t5_heads,
        d_kv=d_kv, d_ff=d_ff, feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    # silent: exactly the zeros diffusers feeds without a T5 (see demo_image_attention.py)
    t5.encoder.final_layer_norm.weight.data.zero_()
    t5.requires_grad_(False)
    width = args.heads * args.head_dim
    latent_side = SIZE // 2 ** (len(VAE_CHANNELS) - 1)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            sample_size=latent_side, patch_size=PATCH, in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS, num_layers=args.layers,
            attention_head_dim=args.head_dim, num_attention_heads=args.heads,
            joint_attention_dim=d_model, caption_projection_dim=width,
            pooled_projection_dim=CLIP_L[3] + CLIP_G[3],
            pos_embed_max_size=latent_side // PATCH),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift),
        vae=vae,
        text_encoder=clip(CLIP_L, "quick_gelu", clip_l_tok.pad_token_id), tokenizer=clip_l_tok,
        text_encoder_2=clip(CLIP_G, "gelu", clip_g_tok.pad_token_id), tokenizer_2=clip_g_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)


def zero_init(transformer) -> None:
    """adaLN-Zero (DiT): every modulation and the output projection start at zero, so each
    block starts as the identity and the output as 0 (diffusers' default init does not)."""
    import torch

    layers = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.norm1.linear, block.norm1_context.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def trained_modules(pipe) -> dict:
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2}  # T5 stays silent and frozen


def encode(pipe, prompts: list[str]):
    """(context [B, CLIP_ROWS + 256, D], pooled [B, P]): the pipeline's own prompt encoding."""
    import torch

    context, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
        do_classifier_free_guidance=False, max_sequence_length=256)
    return context, pooled


def flow_matching_loss(pipe, latents, prompts: list[str], gen, shift: float):
    """SD3's rectified-flow loss of one batch (mean squared error of the velocity); the
    denoiser runs RepeatedLastRowAttention on the short context."""
    import torch

    n = len(latents)
    sigma = torch.sigmoid(torch.randn(n, generator=gen))  # logit-normal(0, 1)
    sigma = shift * sigma / (1 + (shift - 1) * sigma)  # as the scheduler shifts its sigmas
    noise = torch.randn(latents.shape, generator=gen)
    s = sigma.view(n, 1, 1, 1)
    x_t = (1 - s) * latents + s * noise
    context, pooled = encode(pipe, prompts)
    v = pipe.transformer(x_t, short_context(context), pooled, sigma * 1000, return_dict=False)[0]
    return (v - (noise - latents)).pow(2).mean()


def train_denoiser(args, pipe, latents, captions):
    """args.steps AdamW steps over seeded permutations of the latents; returns (EMA modules,
    [(step, smoothed loss)], steps done, stopped early, seconds)."""
    import torch

    with torch.no_grad():  # before zero_init, which makes every output 0
        context, pooled = encode(pipe, [c.text for c in captions[:4]])
        diff = check_equivalent(pipe.transformer, latents[:4], context, pooled,
                                torch.full((4,), 700.0))
    log(f"short context ({CLIP_ROWS} + 1 rows) vs full ({CLIP_ROWS} + 256): max |difference| "
        f"{diff:.2e}")
    assert diff < 1e-4 and not context[:, CLIP_ROWS:].any(), diff
    # T5 says nothing; without it the pipeline feeds the same zeros, without running it
    t5, pipe.text_encoder_3 = pipe.text_encoder_3, None
    zero_init(pipe.transformer)
    modules = trained_modules(pipe)
    params = [p for m in modules.values() for p in m.parameters()]
    for m in modules.values():
        m.train()
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    ema_params = [p for m in ema.values() for p in m.parameters()]
    pipe.transformer.set_attn_processor(RepeatedLastRowAttention())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + 4)
    order, pos = torch.randperm(len(latents), generator=gen), 0
    history, smooth, t0, step = [], None, time.perf_counter(), 0
    for step in range(args.steps):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(latents), generator=gen), 0
        idx = order[pos:pos + args.batch_size].tolist()
        pos += args.batch_size
        drop = torch.rand(len(idx), generator=gen) < args.caption_dropout
        prompts = ["" if d else captions[i].text for i, d in zip(idx, drop.tolist())]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        loss = flow_matching_loss(pipe, latents[idx], prompts, gen, args.shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        elapsed = time.perf_counter() - t0
        if (step + 1) % 250 == 0 or step == 0:
            history.append((step + 1, smooth))
        if (step + 1) % 100 == 0 or step in (0, 19):
            log(f"step {step + 1}/{args.steps}  loss {loss.item():.4f} (avg {smooth:.4f})  "
                f"lr {lr_at(step, args.steps, args.warmup, args.lr):.2e}  {elapsed:.0f}s")
        if elapsed > args.time_budget and step + 1 < args.steps:
            log(f"WARNING: time budget {args.time_budget:.0f}s hit at step {step + 1}")
            break
    # register_modules, not setattr: diffusers keeps a component set to None as None in
    # model_index.json when it is set back by attribute
    pipe.register_modules(text_encoder_3=t5)
    return ema, history, step + 1, elapsed > args.time_budget, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# 6. save


def save(pipe, ema: dict, out: Path) -> int:
    """The pipeline with the EMA weights, written fresh to `out`; returns its size in bytes."""
    for name, module in ema.items():
        setattr(pipe, name, module)
        pipe.register_modules(**{name: module})
    for stale in out.glob("*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.name != "TRAINING.md":
            stale.unlink()
    pipe.save_pretrained(out)
    # transformers 5 merged T5TokenizerFast into T5Tokenizer (the old name is an alias); name
    # it as SD3's model_index.json does (as zomni.testing_images does).
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for f in out.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def count_params(pipe) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2",
                         "text_encoder_3")}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sheet is None:
        args.sheet = REPO / "docs" / "demo_image_contact_sheet.png" if args.out == DEFAULT_OUT \
            else args.out.parent / f"{args.out.name}_contact_sheet.png"
    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0]
    setup_runtime(args)
    train_triples, held_out = split_triples(args.seed, args.holdout)  # 1. split
    train_captions = captions_of(train_triples)
    log(f"{len(train_triples)} training triples ({len(train_captions)} captions), "
        f"{len(held_out)} held out: {held_out}")
    t0 = time.perf_counter()
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae, vae_history = AutoencoderKL.from_pretrained(args.vae).eval(), []
    else:
        vae, vae_history = train_vae(args, train_captions)  # 3. VAE
    latents, captions, recon_mse = encode_dataset(args, vae, train_captions)  # 4. latents
    t_vae = time.perf_counter() - t0
    pipe = build_pipeline(args, vae)  # 2. tokenizers, 5. models
    params = count_params(pipe)
    log(f"parameters: {params}")
    ema, history, steps_done, stopped, t_train = train_denoiser(args, pipe, latents, captions)
    size = save(pipe, ema, args.out)  # 6. save, check, score
    log(f"saved {args.out}: {size / 1e6:.2f} MB")
    config = {"vae_channels": VAE_CHANNELS, "patch": PATCH, "clip_l": CLIP_L, "clip_g": CLIP_G,
              "t5": T5}
    run = {"args": {**vars(args), **config}, "sheet": args.sheet, "held_out": held_out,
           "train_triples": len(train_triples),
           "vae_history": vae_history, "recon_mse": recon_mse, "t_vae": t_vae,
           "history": history, "steps_done": steps_done, "stopped_early": stopped,
           "t_train": t_train, "params": params, "size": size, "t_start": t_start,
           "cpu_start": cpu_start, "load_start": load_start,
           "scaling": (vae.config.shift_factor, vae.config.scaling_factor)}
    evaluate_and_report(args.out, run, train_captions, held_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
