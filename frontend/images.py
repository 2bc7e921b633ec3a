"""Image requests on the client side: building them, and turning the engine's pixels into
what users get (PIL images, PNG bytes).

    prompt / class_labels + ImageParams ─► ImageRequest ─► engine core
    ImageOutput.pixels (uint8 [num_images, H, W, 3] in a raw frame) ─► PIL images / PNG

What depends on the model (sizes, conditioning, the batch bound) is checked by the engine
(`DenoiseScheduler._resolve`), for every client alike; its refusal comes back as an error
output naming the parameter, which becomes OpenAI's error JSON here. Pillow is imported on
first use, to keep this module light.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from zomni.proto import (
    FinishReason,
    ImageOutput,
    ImageParams,
    ImageRequest,
    InvalidRequest,
    ZomniError,
)
from zomni.proto.arrays import read_array
from zomni.proto.client import EngineClient, output_error

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class ImageGenerationOutput:
    """One image request's result: `images` are `params.n` PIL images (RGB), or for a
    class-conditional model `n` per label, label-major (`[l0] * n + [l1] * n + ...`)."""

    request_id: str
    prompt: str | None
    class_labels: list[int] | None
    images: list[Image.Image] = field(default_factory=list)
    num_steps: int = 0  # denoising steps the engine ran
    finished: bool = False
    # per CFG branch (cond, then uncond): steps that ran the whole denoiser (the step cache
    # skipped the others)
    num_computed_steps: list[int] = field(default_factory=list)
    # ImageParams.partial_images: partial_images[i] holds partial image i of every image (the
    # denoised estimate at an evenly spaced step), in the order they came
    partial_images: list[list[Image.Image]] = field(default_factory=list)
    num_prompt_tokens: int = 0

    def add(self, out: ImageOutput, frames: Sequence) -> None:
        """Take one engine output for this request: a partial image, or the end (its images,
        or its typed error raised). A partial index sent again (the request was preempted and
        restarted) replaces the one before."""
        if out.finish_reason is None:
            if out.partial_image_index is not None and out.pixels is not None:
                images = pil_images(read_array(out.pixels, frames))
                index = out.partial_image_index
                if index < len(self.partial_images):
                    self.partial_images[index] = images
                else:
                    self.partial_images.append(images)
            return
        self.finished, self.num_steps = True, out.num_steps
        self.num_computed_steps = list(out.num_computed_steps)
        self.num_prompt_tokens = out.num_prompt_tokens
        self.images = pil_images(output_pixels(out, frames))


def image_requests(prompts: str | Sequence[str] | None,
                   class_labels: Sequence[int] | Sequence[Sequence[int]] | None,
                   params: ImageParams | Sequence[ImageParams] | None,
                   priority: int | Sequence[int] | None, new_id) -> list[ImageRequest]:
    """One `ImageRequest` per prompt, or per list of class labels (a flat list of labels is
    one request, as diffusers' `DiTPipeline(class_labels=[...])` is one call)."""
    if prompts is not None and class_labels is not None:
        raise InvalidRequest("give prompts or class_labels, not both", param="class_labels")
    if class_labels is not None:
        labels = list(class_labels)
        nested = bool(labels) and not _is_int(labels[0])
        groups = [g if isinstance(g, list) else list(g) if isinstance(g, tuple) else [g]
                  for g in labels] if nested else [labels]
        if not all(g and all(_is_int(c) for c in g) for g in groups) or \
                (nested and not all(isinstance(g, (list, tuple)) for g in labels)):
            raise InvalidRequest("class_labels must be integers, or lists of integers",
                                 param="class_labels")
        inputs: list[tuple[str | None, list[int] | None]] = [(None, g) for g in groups]
    elif prompts is None:
        raise InvalidRequest("give prompts (text-conditioned models) or class_labels "
                             "(class-conditional ones)", param="prompt")
    else:
        inputs = [(p, None) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        if not inputs or not all(isinstance(text, str) for text, _ in inputs):
            raise InvalidRequest("prompts must be a string or a non-empty list of strings",
                                 param="prompt")
    params = params if params is not None else ImageParams()
    all_params = [params] * len(inputs) if isinstance(params, ImageParams) else list(params)
    if len(all_params) != len(inputs):
        raise InvalidRequest(f"need one ImageParams per request ({len(inputs)}), got "
                             f"{len(all_params)}", param="params")
    if priority is None or isinstance(priority, int):
        priorities = [priority or 0] * len(inputs)
    else:
        priorities = list(priority)
        if len(priorities) != len(inputs):
            raise InvalidRequest(f"need one priority per request ({len(inputs)}), got "
                                 f"{len(priorities)}", param="priority")
    now = time.time()
    return [ImageRequest(new_id(), prompt=text, class_labels=labels, params=p, priority=prio,
                         arrival_time=now)
            for (text, labels), p, prio in zip(inputs, all_params, priorities)]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def output_pixels(out: ImageOutput, frames: Sequence) -> np.ndarray:
    """uint8 [num_images, H, W, 3] of a finished output; its typed error otherwise."""
    if (err := output_error(out)) is not None:
        raise err
    if out.finish_reason != FinishReason.STOP or out.pixels is None:
        reason = "none" if out.finish_reason is None else str(FinishReason(out.finish_reason))
        raise ZomniError(f"image request {out.request_id} ended without images "
                         f"(finish reason: {reason})")
    return read_array(out.pixels, frames)


def pil_images(pixels: np.ndarray) -> list[Image.Image]:
    """One RGB PIL image per row of uint8 [n, H, W, 3] (copied: `pixels` may be a view of a
    message frame)."""
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(row)) for row in pixels]


def png_base64(pixels: np.ndarray) -> list[str]:
    """Base64 PNGs of uint8 [n, H, W, 3]; CPU-bound, so servers run it off the event loop."""
    encoded = []
    for image in pil_images(pixels):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return encoded


def run_image_requests(client: EngineClient, requests: list[ImageRequest],
                       use_tqdm: bool) -> list[ImageGenerationOutput]:
    """Send `requests` (the engine batches them), collect each one's output; a progress bar
    counts images. An engine error is raised once every request has finished."""
    from tqdm.auto import tqdm

    results = {r.request_id: ImageGenerationOutput(r.request_id, r.prompt, r.class_labels)
               for r in requests}
    for request in requests:
        client.add_request(request)
    total = sum(r.params.n * len(r.class_labels or [None]) for r in requests)
    bar = tqdm(total=total, desc="Generating images", unit="img",
               disable=not use_tqdm or len(requests) < 2)
    remaining, error = len(requests), None
    while remaining:  # the only loop over the outputs: one per request, all its images
        got = client.recv(timeout_ms=1000)
        if got is None:
            continue
        _, msg, frames = got
        for out in getattr(msg, "outputs", ()):
            result = results.get(out.request_id)
            if result is None or result.finished:
                continue
            try:
                result.add(out, frames)
            except ZomniError as e:
                result.finished, error = True, e
            if result.finished:
                remaining -= 1
                bar.update(len(result.images))
    bar.close()
    if error is not None:
        raise error
    return list(results.values())
