"""The body of `POST /v1/images/generations`: OpenAI's fields plus vLLM-omni's extensions.

    OpenAI:      prompt, model, n (1-10), size ("WxH" or "auto"), response_format (b64_json),
                 user, output_format (png), stream + partial_images (0-3): server-sent events
                 `image_generation.partial_image` (the denoised estimate at evenly spaced
                 steps), then `image_generation.completed`; one image per streamed request
    vLLM-omni:   negative_prompt, num_inference_steps (1-200), guidance_scale, seed
    zomni:       class_labels (class-conditional models, e.g. DiT, instead of a prompt),
                 priority (lower is served first, as for completions),
                 cache: the step cache, e.g. {"type": "fbcache", "threshold": 0.08,
                 "max_consecutive_skips": 3} (`StepCacheParams`; absent: the server's
                 `--step-cache`, off by default; {"type": "none"}: off)

OpenAI fields that zomni does not implement (`quality`, `style`, `background`, `moderation`,
`output_compression`, an `output_format` other than png,
`response_format` "url") are a 400 naming the field whenever they ask for something other than
what zomni does; they are never dropped silently. Fields OpenAI does not define are ignored,
as on every other endpoint of this server (and vLLM's).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from zomni.proto import ImageParams, ImageRequest, InvalidRequest, StepCacheParams

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")

# field -> the values that ask for what zomni does anyway ("auto": the server's choice)
_ACCEPTED: dict[str, tuple[Any, ...]] = {
    "quality": ("auto",),
    "background": ("auto", "opaque"),
    "output_format": ("png",),
    "style": (),
    "moderation": (),
    "output_compression": (),
}


class ImageGenerationRequest(msgspec.Struct, kw_only=True):
    prompt: str | None = None
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    user: str | None = None
    # OpenAI fields checked by `unsupported_fields` (see _ACCEPTED)
    quality: str | None = None
    style: str | None = None
    background: str | None = None
    output_format: str | None = None
    moderation: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None
    # vLLM-omni extensions
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    # zomni
    class_labels: list[int] | None = None
    priority: int = 0
    cache: dict[str, Any] | None = None  # StepCacheParams as a JSON object

    def check_openai_fields(self) -> None:
        """`InvalidRequest` for a response format or an OpenAI option zomni cannot honour."""
        if self.response_format not in (None, "b64_json"):
            hint = " (zomni returns images inline; it stores none to link to)" \
                if self.response_format == "url" else ""
            raise InvalidRequest(f"response_format {self.response_format!r} is not supported; "
                                 f"use 'b64_json'{hint}", param="response_format")
        if self.partial_images and not self.stream:
            raise InvalidRequest("partial_images are sent as events: they need stream=true",
                                 param="partial_images")
        if self.stream and self.n != 1:
            raise InvalidRequest(f"stream=true sends the events of one image; ask n=1 (got "
                                 f"{self.n}) and send one request per image", param="n")
        for name, accepted in _ACCEPTED.items():
            value = getattr(self, name)
            if value is not None and value not in accepted:
                allowed = f"; accepted: {', '.join(map(repr, accepted))}" if accepted else ""
                raise InvalidRequest(f"{name}={value!r} is not supported by zomni{allowed}",
                                     param=name)

    def size_in_pixels(self) -> tuple[int | None, int | None]:
        """(width, height) of `size`; (None, None) for the model's default size."""
        if self.size is None or self.size == "auto":
            return None, None
        found = _SIZE.match(self.size)
        if found is None or int(found.group(1)) < 1 or int(found.group(2)) < 1:
            raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' in pixels (e.g. '512x512') or "
                                 f"'auto', got {self.size!r}", param="size")
        return int(found.group(1)), int(found.group(2))

    def image_request(self, request_id: str, arrival_time: float) -> ImageRequest:
        """The engine request; `ImageParams` checks n, steps, guidance and seed (naming them).
        What depends on the model is checked by the engine."""
        self.check_openai_fields()
        width, height = self.size_in_pixels()
        params = ImageParams(n=self.n, height=height, width=width,
                             num_inference_steps=self.num_inference_steps,
                             guidance_scale=self.guidance_scale,
                             negative_prompt=self.negative_prompt, seed=self.seed,
                             cache=None if self.cache is None
                             else StepCacheParams.from_dict(self.cache),
                             partial_images=self.partial_images or 0)
        return ImageRequest(request_id, prompt=self.prompt, class_labels=self.class_labels,
                            params=params, priority=self.priority, arrival_time=arrival_time)
