"""`POST /v1/images/generations` over one image engine.

    body ─► ImageGenerationRequest.image_request (OpenAI fields, ImageParams' checks)
         ─► AsyncEngineClient.generate (the engine checks sizes, conditioning and its batch
             bound; a refusal names the parameter): one ImageOutput, its pixels in a raw frame
         ─► PNG + base64 on a thread (never on the event loop) ─► {created, data: [...]}

The engine stream is closed on every way out (`aclosing`): a client that disconnects cancels
the handler (the app runs with `handler_cancellation=True`), and closing an unfinished stream
aborts the request in the engine, which frees its batch slots at the next step.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from typing import Any

from zomni.proto import (
    EngineOverloaded,
    FinishReason,
    ModelInfo,
    ZomniError,
)
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
        created = int(time.time())
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
                        pixels = output_pixels(out, frames)
            images = await asyncio.to_thread(png_base64, pixels)
            num_images = len(images)
        except ZomniError:
            reason = "error"
            raise
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)
            self.metrics.image_request_done(arrival, num_images, reason)
        width, height = pixels.shape[2], pixels.shape[1]
        return {"created": created, "data": [{"b64_json": b64} for b64 in images],
                "output_format": "png", "size": f"{width}x{height}"}
