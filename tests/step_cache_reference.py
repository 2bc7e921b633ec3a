"""The step cache as published, written out as a plain per-request loop over diffusers' own
denoisers (an independent reference for zomni's batched `workers/step_cache.py`).

diffusers' `StableDiffusion3Pipeline` / `DiTPipeline` run as they are; only their
transformer's forward is replaced by `cached_forward`, which splits the batch into its CFG
halves and runs each half (one branch) through its own `RefBranch`, one after the other:

  TeaCache (ali-vilab/TeaCache, e.g. TeaCache4FLUX; PaddleMIX's port for SD3):
      m = transformer_blocks[0].norm1(x, ...)[0]                  block 0's modulated input
      first / last step: compute, acc = 0
      else: acc += poly1d(coefficients)(mean|m - m_prev| / mean|m_prev|)
            acc < threshold: x += R (skip every block)   else: compute, acc = 0
      m_prev = m;   on compute: R = blocks(x) - x
  FBCache (ParaAttention's first-block cache):
      h = block 0 (x), r = h - x
      skip iff not first / last and mean|r - r_ref| / mean|r_ref| < threshold: x = h + R
      else: r_ref = r, x = blocks 1..(h), R = x - h
  both: threshold 0 never skips; at most `max_consecutive_skips` skips in a row.

Decisions are logged per branch as (cond, uncond), zomni's order (SD3's pipeline puts the
unconditional half first, DiT's second).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SD3_COEFFICIENTS = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00,
                    2.64230861e-01]
IDENTITY = [1.0, 0.0]


@dataclass
class RefBranch:
    kind: str
    threshold: float
    max_consecutive_skips: int | None
    num_steps: int
    coefficients: list[float]
    previous: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    accumulated: float = 0.0
    skips: int = 0
    computed: list[bool] = field(default_factory=list)

    def blocks(self, x, modulated_input, block0, rest):
        """The block stack's output for x under the published rule; block0(x) -> (h, carry),
        rest(h, carry) -> y runs blocks 1.. ."""
        step = len(self.computed)
        edge = step in (0, self.num_steps - 1)
        capped = self.max_consecutive_skips is not None and \
            self.skips >= self.max_consecutive_skips
        if self.kind == "teacache":
            m = modulated_input(x)
            compute = True
            if self.previous is not None:
                rel = ((m - self.previous).abs().mean() / self.previous.abs().mean()).item()
                self.accumulated += float(np.poly1d(self.coefficients)(rel))
                compute = edge or capped or self.threshold == 0 or \
                    self.accumulated >= self.threshold
            self.previous = m
            if compute:
                self.accumulated = 0.0
                h, carry = block0(x)
                y = rest(h, carry)
                self.residual = y - x
            else:
                y = x + self.residual
        else:
            h, carry = block0(x)
            r = h - x
            compute = edge or capped or self.threshold == 0 or self.previous is None or \
                ((r - self.previous).abs().mean() / self.previous.abs().mean()).item() \
                >= self.threshold
            if compute:
                self.previous = r
                y = rest(h, carry)
                self.residual = y - h
            else:
                y = h + self.residual
        self.skips = 0 if compute else self.skips + 1
        self.computed.append(compute)
        return y


def _sd3_branch(model, branch, hs, ehs, pooled, t):
    x = model.pos_embed(hs).contiguous()
    temb = model.time_text_embed(t, pooled)
    c = model.context_embedder(ehs)
    blocks = model.transformer_blocks

    def run(x, c, some):
        for block in some:
            c, x = block(hidden_states=x, encoder_hidden_states=c, temb=temb)
        return x, c

    x = branch.blocks(x, lambda x: blocks[0].norm1(x, emb=temb)[0],
                      lambda x: run(x, c, blocks[:1]), lambda h, c1: run(h, c1, blocks[1:])[0])
    x = model.proj_out(model.norm_out(x, temb))
    p, (height, width) = model.config.patch_size, hs.shape[-2:]
    x = x.reshape(x.shape[0], height // p, width // p, p, p, model.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], model.out_channels, height, width)


def _dit_branch(model, branch, hs, t, labels):
    x = model.pos_embed(hs)
    blocks = model.transformer_blocks

    def run(x, some):
        for block in some:
            x = block(x, timestep=t, class_labels=labels)
        return x

    x = branch.blocks(x, lambda x: blocks[0].norm1(x, t, labels, hidden_dtype=x.dtype)[0],
                      lambda x: (run(x, blocks[:1]), None), lambda h, _: run(h, blocks[1:]))
    cond = blocks[0].norm1.emb(t, labels, hidden_dtype=x.dtype)
    shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    x = model.proj_out_2(model.norm_out(x) * (1 + scale[:, None]) + shift[:, None])
    p, side = model.patch_size, int(x.shape[1] ** 0.5)
    x = x.reshape(-1, side, side, p, p, model.out_channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(-1, model.out_channels, side * p, side * p)


def cached_images(model_dir, cache: dict, *, seed: int, steps: int, guidance: float,
                  prompt: str | None = None, class_labels: list[int] | None = None,
                  n: int = 1, size: int = 32) -> tuple[np.ndarray, list[list[bool]]]:
    """uint8 images [rows, H, W, 3] of diffusers' pipeline with the reference cache, and
    each branch's decisions, (cond, uncond)."""
    from diffusers import DiffusionPipeline
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    sd3 = prompt is not None
    halves = 2 if guidance > 1 else 1
    threshold = cache.get("threshold", 0.05 if cache["type"] == "fbcache" else 0.2)
    branches = [RefBranch(cache["type"], threshold, cache.get("max_consecutive_skips"), steps,
                          SD3_COEFFICIENTS if sd3 else IDENTITY) for _ in range(halves)]

    def forward(hidden_states, timestep=None, class_labels=None, encoder_hidden_states=None,
                pooled_projections=None, return_dict=True, **_):
        if sd3:
            parts = zip(*(v.chunk(halves) for v in (hidden_states, encoder_hidden_states,
                                                    pooled_projections, timestep)))
            out = [_sd3_branch(model, b, *part) for b, part in zip(branches, parts)]
        else:
            parts = zip(*(v.chunk(halves) for v in (hidden_states, timestep, class_labels)))
            out = [_dit_branch(model, b, *part) for b, part in zip(branches, parts)]
        out = torch.cat(out)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    model.forward = forward
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                  output_type="np")
    with torch.no_grad():
        if sd3:
            images = pipe(prompt=prompt, num_images_per_prompt=n, height=size, width=size,
                          **kwargs).images
        else:
            images = pipe(class_labels=[c for c in class_labels for _ in range(n)],
                          **kwargs).images
    logs = [b.computed for b in branches]
    if sd3 and halves == 2:
        logs.reverse()  # the SD3 pipeline's batch is [uncond | cond]
    return (images * 255).round().astype(np.uint8), logs
