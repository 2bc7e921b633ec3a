"""`POST /v1/images/generations` over one image engine.

    body ─► ImageGenerationRequest.image_request (OpenAI fields, ImageParams' checks)
         ─► AsyncEngineClient.generate (the engine checks sizes, conditioning and its batch
             bound; a refusal names the parameter): one ImageOutput, its pixels in a raw frame
         ─► PNG + base64 on a thread (never on the event loop) ─► {created, data: [...]}
    stream=true: each partial image's output, then the finished one, as OpenAI's SSE events

The engine stream is closed on every way out (`aclosing`): a client that disconnects cancels
the handler (the app runs with `handler_cancellation=True`), and closing an unfinished stream
aborts the request in the engine, which frees its batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np

from zomni.proto import (
    EngineOverloaded,
    FinishReason,
    ImageOutput,
    ModelInfo,
    ZomniError,
)
from zomni.proto.arrays import read_array
from zomni.proto.client import AsyncEngineClient

from .image_protocol import ImageGenerationRequest
from .images import output_pixels, png_base64
from .metrics import ModelMetrics


class ImageServing:
    """The images endpoint over one engine client."""

    def __init__(self, client: AsyncEngineClient, info: ModelInfo,
                 model_names: list[str], metrics: ModelMetrics, max_inflight: int):
        self.client = client
        self.info = info
        self.model_names = model_names
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.inflight = 0  # engine requests of this frontend not finished yet

    async def generations(self, body: ImageGenerationRequest,
                          request_id: str) -> dict[str, Any]:
        """The response body; typed errors (400 naming the field, 429, 503) are raised."""
        created, pixels, out = int(time.time()), None, None
        async with aclosing(self._run(body, request_id)) as stream:
            async for out, frames in stream:
                if out.finish_reason is not None:
                    pixels = output_pixels(out, frames)
        images = await asyncio.to_thread(png_base64, pixels)
        return {"created": created, "data": [{"b64_json": b64} for b64 in images],
                "output_format": "png", "size": _size(pixels), "usage": self._usage(out, pixels)}

    async def stream(self, body: ImageGenerationRequest,
                     request_id: str) -> AsyncIterator[dict[str, Any]]:
        """OpenAI's image stream events: `image_generation.partial_image` for each partial
        image (in index order, each once: a preempted request that sends an index again is
        not repeated), then `image_generation.completed`."""
        sent = -1
        async with aclosing(self._run(body, request_id)) as stream:
            async for out, frames in stream:
                if out.finish_reason is None and out.partial_image_index is not None:
                    if out.partial_image_index <= sent:
                        continue
                    sent = out.partial_image_index
                    pixels = read_array(out.pixels, frames)
                    [b64] = await asyncio.to_thread(png_base64, pixels)
                    yield self._event("image_generation.partial_image", b64, pixels,
                                      partial_image_index=sent)
                elif out.finish_reason is not None:
                    pixels = output_pixels(out, frames)
                    [b64] = await asyncio.to_thread(png_base64, pixels)
                    yield self._event("image_generation.completed", b64, pixels,
                                      usage=self._usage(out, pixels))

    async def _run(self, body: ImageGenerationRequest,
                   request_id: str) -> AsyncIterator[tuple[ImageOutput, list]]:
        """The engine's outputs for `body` (partial images, then the finished one), counted in
        this frontend's in-flight bound and metrics."""
        request = body.image_request(f"img-{request_id}-{uuid.uuid4().hex[:8]}", time.time())
        if self.inflight >= self.max_inflight:
            raise EngineOverloaded(f"this frontend already has {self.inflight} requests in "
                                   f"flight for this model (--max-inflight-requests "
                                   f"{self.max_inflight}); retry later")
        arrival, num_images, reason = time.monotonic(), 0, None
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            async with aclosing(self.client.generate(request)) as stream:
                async for out, frames in stream:
                    if out.finish_reason is not None:
                        reason = str(FinishReason(out.finish_reason))
                        if out.pixels is not None:
                            num_images = out.pixels.shape[0]
                    yield out, frames
        except ZomniError:
            reason = "error"
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.metrics.image_request_done(arrival, num_images, reason)

    def _usage(self, out: ImageOutput, pixels: np.ndarray) -> dict[str, Any]:
        """OpenAI's image usage: input = the prompt's tokens (the model's first tokenizer;
        class-conditional: its labels), output = the denoiser's image tokens (latent patches)
        over all images."""
        per_image = (pixels.shape[1] // self.info.details.size_multiple) * \
            (pixels.shape[2] // self.info.details.size_multiple)
        output = per_image * pixels.shape[0]
        return {"input_tokens": out.num_prompt_tokens, "output_tokens": output,
                "total_tokens": out.num_prompt_tokens + output,
                "input_tokens_details": {"text_tokens": out.num_prompt_tokens,
                                         "image_tokens": 0}}

    @staticmethod
    def _event(kind: str, b64: str, pixels: np.ndarray, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "b64_json": b64, "created_at": int(time.time()),
                "size": _size(pixels), "quality": "auto", "background": "opaque",
                "output_format": "png", **fields}


def _size(pixels: np.ndarray) -> str:
    """OpenAI's "WIDTHxHEIGHT" of uint8 [n, H, W, 3]."""
    return f"{pixels.shape[2]}x{pixels.shape[1]}"
