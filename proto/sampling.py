"""How one request samples: `SamplingParams` (LLMs) and `ImageParams` (image models).

Both are wire structs (msgspec decodes untrusted bytes straight into them and runs
`__post_init__`), so a bad value is refused the same way whether it came from Python, HTTP or a
custom frontend. What depends on the model (an image size its VAE and patches can take, a step
count its scheduler allows) is checked by the engine core, which knows the model.
"""

from __future__ import annotations

import math

import msgspec

from .errors import InvalidRequest


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """Sampling parameters, named and defaulted as in vLLM so users can switch.

    `stop` strings and `skip_special_tokens` are applied by the frontend (the engine core never
    sees text); everything else is applied by the engine core or the worker's sampler.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be non-negative, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.temperature >= 0.0, "temperature",
               f"temperature must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 0, "top_k",
               f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be positive, got {self.repetition_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"logprobs must be in [0, 20], got {self.logprobs}")
        _check(self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
               "seed must fit in a signed 64-bit integer")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


MAX_IMAGES_PER_REQUEST = 10  # OpenAI's bound on `n` for images
MAX_NUM_STEPS = 200


class ImageParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """Image generation parameters, named as diffusers' pipelines and vLLM-omni name them.

    None means the model's default (from its pipeline: e.g. SD3 28 steps, guidance 7.0; DiT 50
    steps, guidance 4.0; the size its denoiser was trained at). Guidance runs when
    `guidance_scale > 1`, as in diffusers. A request without `seed` gets one drawn by the
    engine; with `seed` S its noise is what diffusers draws with
    `torch.Generator("cpu").manual_seed(S)`, whatever else shares the batch.
    """

    n: int = 1
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(1 <= self.n <= MAX_IMAGES_PER_REQUEST, "n",
               f"n must be in [1, {MAX_IMAGES_PER_REQUEST}], got {self.n}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"{name} must be positive, got {value}")
        steps = self.num_inference_steps
        _check(steps is None or 1 <= steps <= MAX_NUM_STEPS, "num_inference_steps",
               f"num_inference_steps must be in [1, {MAX_NUM_STEPS}], got {steps}")
        g = self.guidance_scale
        _check(g is None or (math.isfinite(g) and 0.0 <= g <= 100.0), "guidance_scale",
               f"guidance_scale must be a finite number in [0, 100], got {g}")
        _check(self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
               "seed must fit in a signed 64-bit integer")
