"""What differs between image pipeline families: how a request is conditioned, how the
denoiser is called, and how latents become pixels.

    family              conditioning (once, at admission)       denoiser call
    StableDiffusion3    prompt -> CLIP-L, CLIP-G, T5 embeddings  (x, t, context, pooled)
    DiT                 class labels (null class: uncond)        (x, t, labels); learned sigma
                                                                 channels dropped

Text encoders and the VAE are diffusers' / transformers' own modules, loaded by diffusers from
the pipeline folder with everything but the denoiser (ours), and run on rank 0 only: rank 0
broadcasts the embeddings to the other ranks and alone decodes latents. The prompt encoding
is the pipeline's own `encode_prompt`, so tokenization, padding, truncation and the CLIP / T5
concatenation are exactly diffusers'.

A `Conditioning` holds one request's rows: `n` rows (one per image) of the conditional input,
and, with guidance, `n` rows of the unconditional one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from zomni.proto import DenoiseRequestData
from zomni.workers.parallel_state import broadcast, get_tp_rank, get_tp_size
from zomni.workers.step_cache import StepCache

logger = logging.getLogger("zomni.worker")


@dataclass
class Conditioning:
    cond: tuple[torch.Tensor, ...]  # per denoiser input, rows first
    uncond: tuple[torch.Tensor, ...] | None  # with guidance: the same shapes
    # what the request's `usage` counts as its input: the prompt's tokens (as the first text
    # encoder's tokenizer splits it, before padding or truncation), or its class labels.
    # Known on rank 0 only.
    num_prompt_tokens: int = 0


def _broadcast_tensors(tensors: tuple[torch.Tensor, ...] | None, count: int,
                       dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Rank 0's `count` tensors on every rank: shapes first (one int64 tensor), then data."""
    if get_tp_size() == 1:
        return tensors
    shapes = torch.zeros(count, 4, dtype=torch.int64, device=device)
    if get_tp_rank() == 0:
        for i, t in enumerate(tensors):
            shapes[i, : t.dim()] = torch.tensor(t.shape)
    broadcast(shapes)
    out = []
    for i in range(count):
        shape = [int(d) for d in shapes[i] if d > 0]
        t = tensors[i].contiguous() if get_tp_rank() == 0 else \
            torch.empty(shape, dtype=dtype, device=device)
        out.append(broadcast(t))
    return tuple(out)


class ImagePipeline:
    """One family's conditioning, denoiser call and decoding; subclasses fill them in."""

    def __init__(self, model_dir: str, denoiser: torch.nn.Module, dtype: torch.dtype,
                 device: torch.device):
        self.denoiser = denoiser
        self.dtype = dtype
        self.device = device
        self.parts = None  # rank 0: the diffusers pipeline without its denoiser
        if get_tp_rank() == 0:
            self.parts = self._load_parts(model_dir)
        vae_cfg = _read_json(Path(model_dir) / "vae" / "config.json")
        self.vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0])) - 1)

    def _load_parts(self, model_dir: str):
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(model_dir, transformer=None,
                                                 dtype=self.dtype).to(self.device)

    def latent_shape(self, req: DenoiseRequestData) -> tuple[int, int, int, int]:
        c = self.denoiser.config.in_channels
        return (req.num_images, c, req.height // self.vae_scale_factor,
                req.width // self.vae_scale_factor)

    def initial_latents(self, req: DenoiseRequestData) -> torch.Tensor:
        """The noise diffusers draws for `generator=torch.Generator("cpu").manual_seed(seed)`
        (its `randn_tensor`: on the CPU generator, in the model's dtype, then moved)."""
        generator = torch.Generator("cpu").manual_seed(req.seed)
        noise = torch.randn(self.latent_shape(req), generator=generator, dtype=self.dtype)
        return noise.to(self.device)

    def condition(self, req: DenoiseRequestData) -> Conditioning:
        raise NotImplementedError

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor,
                inputs: tuple[torch.Tensor, ...], cache: StepCache | None = None) -> torch.Tensor:
        """The denoiser's output for rows `latents` [B, C, h, w] with the latent's channels;
        `cache`: the step cache's plan for these rows (workers/step_cache.py), if any."""
        raise NotImplementedError

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [n, H, W, 3] of latents [n, C, h, w] (rank 0), as the pipeline's
        postprocessing rounds them: (x / 2 + 0.5) clamped to [0, 1], x 255, rounded."""
        vae = self.parts.vae
        image = vae.decode(self._unscale(latents.to(vae.dtype)), return_dict=False)[0]
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (image * 255).round().to(torch.uint8).cpu()

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SD3Pipeline(ImagePipeline):
    """StableDiffusion3Pipeline: flow matching on VAE latents, text embeddings from CLIP-L,
    CLIP-G and T5 (any may be absent from the folder, as diffusers allows for T5)."""

    max_sequence_length = 256  # StableDiffusion3Pipeline.__call__'s default

    def condition(self, req: DenoiseRequestData) -> Conditioning:
        cfg = req.guidance_scale > 1.0
        embeds = None
        if self.parts is not None:
            with torch.inference_mode():
                pos, neg, pooled, neg_pooled = self.parts.encode_prompt(
                    prompt=req.prompt, prompt_2=None, prompt_3=None, device=self.device,
                    num_images_per_prompt=req.num_images, do_classifier_free_guidance=cfg,
                    negative_prompt=req.negative_prompt,
                    max_sequence_length=self.max_sequence_length)
            embeds = (pos, pooled) + ((neg, neg_pooled) if cfg else ())
        embeds = _broadcast_tensors(embeds, 4 if cfg else 2, self.dtype, self.device)
        return Conditioning(embeds[:2], embeds[2:] if cfg else None, self._count_tokens(req))

    def _count_tokens(self, req: DenoiseRequestData) -> int:
        tokenizer = self.parts and next(
            (t for t in (self.parts.tokenizer, self.parts.tokenizer_2, self.parts.tokenizer_3)
             if t is not None), None)
        if tokenizer is None:
            return 0
        return len(tokenizer(req.prompt, add_special_tokens=False, verbose=False).input_ids)

    def predict(self, latents, timesteps, inputs, cache=None):
        context, pooled = inputs
        return self.denoiser(latents, timesteps, context, pooled, cache=cache)

    def _unscale(self, latents):
        cfg = self.parts.vae.config
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)


class DiTPipeline(ImagePipeline):
    """DiTPipeline: class-conditional DDIM on VAE latents; the null class (`num_classes`, as
    the pipeline's 1000 for ImageNet) is the unconditional input."""

    def condition(self, req: DenoiseRequestData) -> Conditioning:
        # n images per label, label-major: rows [l0] * n + [l1] * n + ...
        rows = [label for label in req.class_labels for _ in range(req.num_images
                                                                     // len(req.class_labels))]
        labels = torch.tensor(rows, dtype=torch.int64, device=self.device)
        null = torch.full_like(labels, self.denoiser.config.num_embeds_ada_norm)
        return Conditioning((labels,), (null,) if req.guidance_scale > 1.0 else None,
                            len(req.class_labels))

    def predict(self, latents, timesteps, inputs, cache=None):
        (labels,) = inputs
        out = self.denoiser(latents, timesteps, labels, cache=cache)
        return out[:, : latents.shape[1]]  # learned sigma: the pipeline uses eps only

    def _unscale(self, latents):
        return 1 / self.parts.vae.config.scaling_factor * latents


PIPELINES: dict[str, type[ImagePipeline]] = {
    "StableDiffusion3Pipeline": SD3Pipeline,
    "DiTPipeline": DiTPipeline,
}


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
