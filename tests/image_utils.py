"""Helpers of the image tests: tiny pipelines built once per session, diffusers' own pipelines
as the reference, PNG decoding and PSNR.

The references run diffusers' `StableDiffusion3Pipeline` / `DiTPipeline` on the same folders
with the same seed, steps, guidance, size and number of images, on one torch thread (the
engines under test run beside them on the machine's two cores; more threads only contend).
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from zomni.testing_images import build_dit_pipeline, build_sd3_pipeline

MIN_PSNR_DB = 40.0

_BUILT: dict[Path, SimpleNamespace] = {}
_PIPELINES: dict[str, object] = {}


def tiny_pipelines(tmp_path_factory) -> SimpleNamespace:
    """`.sd3` and `.dit`: tiny random-weight pipeline folders (32x32 images by default), built
    once per test session whichever module asks first."""
    root = tmp_path_factory.getbasetemp() / "tiny-pipelines"
    if root not in _BUILT:
        _BUILT[root] = SimpleNamespace(sd3=build_sd3_pipeline(root / "sd3", seed=3),
                                       dit=build_dit_pipeline(root / "dit", seed=4))
    return _BUILT[root]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images (or stacks of them), in dB:

        PSNR = 10 * log10(255^2 / MSE),  MSE = mean over every pixel and channel of (a - b)^2

    inf when they are equal. 40 dB is an RMS error of 2.55 levels out of 255.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def decode_png(b64: str) -> np.ndarray:
    """uint8 [H, W, 3] of a base64 PNG, checking that it is one."""
    from PIL import Image

    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _pipeline(path: Path):
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    key = str(path)
    if key not in _PIPELINES:
        pipe = DiffusionPipeline.from_pretrained(key)
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[key] = pipe
    return _PIPELINES[key]


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def sd3_reference(path: Path, prompt: str, seed: int, steps: int, guidance: float, n: int = 1,
                  width: int = 32, height: int = 32,
                  negative_prompt: str | None = None) -> np.ndarray:
    """uint8 [n, H, W, 3] from diffusers' StableDiffusion3Pipeline."""
    out = _pipeline(path)(prompt=prompt, negative_prompt=negative_prompt,
                          num_images_per_prompt=n, height=height, width=width,
                          num_inference_steps=steps, guidance_scale=guidance,
                          generator=_generator(seed), output_type="pil")
    return np.stack([np.asarray(image) for image in out.images])


def sd3_partial_references(path: Path, prompt: str, seed: int, steps: int, guidance: float,
                           after_steps: list[int]) -> list[np.ndarray]:
    """uint8 [1, H, W, 3] per entry of `after_steps`: the denoised estimate after that many
    steps of diffusers' StableDiffusion3Pipeline, decoded as the pipeline decodes its result.

    The estimate is solved from the pipeline's own latents: its Euler step is
    x_next = x + (sigma_next - sigma) v on x = (1 - sigma) x0 + sigma noise with
    v = noise - x0, so the step k (1-based) that starts at x_{k-1} has
    x0 = x_{k-1} - sigma_{k-1} (x_k - x_{k-1}) / (sigma_k - sigma_{k-1})."""
    import torch

    pipe = _pipeline(path)
    seen: list = []  # latents after each step

    def keep(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    pipe(prompt=prompt, num_images_per_prompt=1, height=32, width=32,
         num_inference_steps=steps, guidance_scale=guidance, generator=_generator(seed),
         output_type="latent", callback_on_step_end=keep)
    sigmas, out = pipe.scheduler.sigmas, []
    for k in after_steps:
        assert k >= 2, "the first step's input (the noise) is not seen by the callback"
        x, x_next = seen[k - 2], seen[k - 1]
        x0 = x - sigmas[k - 1] * (x_next - x) / (sigmas[k] - sigmas[k - 1])
        vae = pipe.vae
        with torch.no_grad():
            image = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor,
                               return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        out.append((image * 255).round().astype("uint8"))
    return out


def dit_reference(path: Path, class_labels: list[int], seed: int, steps: int, guidance: float,
                  n: int = 1) -> np.ndarray:
    """uint8 [n * len(labels), H, W, 3] from diffusers' DiTPipeline: n images per label,
    label-major, as zomni returns them."""
    rows = [label for label in class_labels for _ in range(n)]
    out = _pipeline(path)(class_labels=rows, guidance_scale=guidance,
                          num_inference_steps=steps, generator=_generator(seed),
                          output_type="pil")
    return np.stack([np.asarray(image) for image in out.images])
