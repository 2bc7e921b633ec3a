"""How one request samples: `SamplingParams` (LLMs; with `DiffusionParams` for masked-diffusion
LMs) and `ImageParams` (image models).

Both are wire structs (msgspec decodes untrusted bytes straight into them and runs
`__post_init__`), so a bad value is refused the same way whether it came from Python, HTTP or a
custom frontend. What depends on the model (an image size its VAE and patches can take, a step
count its scheduler allows) is checked by the engine core, which knows the model.
"""

from __future__ import annotations

import msgspec

from .checks import check as _check
from .checks import finite_float32 as _finite_float32
from .diffusion import DiffusionParams
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
    # token id -> bias added to its logit before sampling (OpenAI `logit_bias`); ids are
    # checked against the vocabulary by the engine core, which knows it
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None  # top-N logprobs per prompt position (vLLM), N in [0, 20]
    # How a masked-diffusion LM decodes (LLaDA, Dream); None: the model's defaults. Refused by
    # an autoregressive LM. A dict is converted.
    diffusion: DiffusionParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.diffusion, dict):
            self.diffusion = DiffusionParams.from_dict(self.diffusion)
        _check(self.diffusion is None or isinstance(self.diffusion, DiffusionParams),
               "diffusion", "diffusion must be a DiffusionParams, a dict like {'steps': 64}, "
               "or None")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            _check(value is None or _INT64_MIN <= value <= _INT64_MAX, name,
                   f"{name} must fit in a signed 64-bit integer")
        _check(not self.stop_token_ids
               or all(_INT64_MIN <= t <= _INT64_MAX for t in self.stop_token_ids),
               "stop_token_ids", "stop_token_ids must fit in signed 64-bit integers")
        for name, (low, high, shown) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            # NaN fails every comparison; the float32 bound catches values (1e39) that are
            # finite here but inf in the sampler's float32 tensors, where -inf / inf is NaN
            # and a NaN logit wins the argmax even over a token banned by min_tokens.
            _check(_finite_float32(value) and low <= value <= high, name,
                   f"{name} must be a finite number in {shown}, got {str(value)[:24]}")
        _check(1 <= self.n <= MAX_N, "n", f"n must be in [1, {MAX_N}], got {self.n}")
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            _check(value is None or len(value) <= MAX_STOP, name,
                   f"{name} may list at most {MAX_STOP} entries, got {len(value or ())}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be non-negative, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(self.top_p > 0.0, "top_p", f"top_p must be a finite number in (0, 1], got "
               f"{self.top_p}")
        _check(self.top_k == -1 or self.top_k >= 0, "top_k",
               f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
               f"logprobs must be in [0, 20], got {self.logprobs}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
               "prompt_logprobs", f"prompt_logprobs must be in [0, 20], got "
               f"{str(self.prompt_logprobs)[:24]}")
        if self.logit_bias is not None:
            _check_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


    def check_diffusion_lm(self, model: str = "this model") -> None:
        """Refuse (`InvalidRequest` naming the first) the fields set to something a
        masked-diffusion LM cannot honour: it scores no token by a logprob, and penalties and
        biases follow an order of generation it does not have (a position's token may be
        chosen before the tokens left of it)."""
        given = [name for name, neutral in _AR_ONLY_DEFAULTS.items()
                 if getattr(self, name) != neutral and not (name == "logit_bias"
                                                            and not self.logit_bias)]
        _check(not given, given[0] if given else "", f"{', '.join(given)} is not supported by "
               f"{model}, a masked-diffusion LM (it computes no logprobs, and penalties and "
               "biases assume left-to-right generation)")


MAX_N = 128  # OpenAI's bound on `n`; `best_of` has the same
# Stop strings and stop token ids are each checked against every generated token (in the
# frontend's event loop, in the engine's step): a long list slows every other request.
MAX_STOP = 256
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# SamplingParams fields a masked-diffusion LM cannot honour, with the value that asks nothing
_AR_ONLY_DEFAULTS = {"logprobs": None, "prompt_logprobs": None, "logit_bias": None,
                     "presence_penalty": 0.0, "frequency_penalty": 0.0,
                     "repetition_penalty": 1.0, "min_p": 0.0}
_INT_FIELDS = ("n", "max_tokens", "min_tokens", "top_k", "seed", "logprobs")
# Every float field, with its closed range. Temperature: 0 is greedy, and above ~10 sampling
# is already near uniform, so 100 refuses only mistakes. Repetition penalty divides (or
# multiplies) logits: within [0.01, 100] they stay far from float32 overflow.
_FLOAT_RANGES: dict[str, tuple[float, float, str]] = {
    "temperature": (0.0, 100.0, "[0, 100]"),
    "top_p": (0.0, 1.0, "(0, 1]"),  # > 0 is checked apart
    "min_p": (0.0, 1.0, "[0, 1]"),
    "repetition_penalty": (0.01, 100.0, "[0.01, 100]"),
    "frequency_penalty": (-2.0, 2.0, "[-2, 2]"),
    "presence_penalty": (-2.0, 2.0, "[-2, 2]"),
}


MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's bound: a bias map is small, and sent every request


def _check_logit_bias(logit_bias: dict[int, float]) -> None:
    """OpenAI's rules: at most 300 token ids (non-negative ints; < vocab is the engine's
    check), each biased by a finite value in [-100, 100] (refused, not clamped)."""
    _check(isinstance(logit_bias, dict) and len(logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
           "logit_bias", f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to "
           "biases")
    for token_id, bias in logit_bias.items():
        _check(type(token_id) is int and 0 <= token_id <= _INT64_MAX, "logit_bias",
               f"logit_bias keys must be token ids (non-negative integers), got "
               f"{str(token_id)[:24]}")
        _check(not isinstance(bias, bool) and _finite_float32(bias) and -100 <= bias <= 100,
               "logit_bias", f"logit_bias values must be finite numbers in [-100, 100], got "
               f"{str(bias)[:24]} for token {token_id}")


MAX_IMAGES_PER_REQUEST = 10  # OpenAI's bound on `n` for images
MAX_NUM_STEPS = 200
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound


def partial_image_steps(num_steps: int, partial_images: int) -> list[int]:
    """After which completed steps (1-based) a request's partial images are taken: evenly
    spaced, never the last step (that one is the image itself). Fewer when steps are few."""
    steps = {round((i + 1) * num_steps / (partial_images + 1)) for i in range(partial_images)}
    return sorted(s for s in steps if 1 <= s < num_steps)


STEP_CACHE_TYPES = ("fbcache", "teacache", "none")
# A type's threshold when the request gives none: diffusers' FirstBlockCacheConfig default for
# FBCache, vLLM-omni's TeaCacheConfig default for TeaCache.
DEFAULT_STEP_CACHE_THRESHOLDS = {"fbcache": 0.05, "teacache": 0.2, "none": 0.0}
MAX_STEP_CACHE_THRESHOLD = 10.0


class StepCacheParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False,
                      kw_only=True):
    """A denoising step cache (`zomni.workers.step_cache`): at steps where the denoiser's input
    barely changed, reuse the block stack's last residual instead of running the blocks.

    type "fbcache" (First-Block-Cache, ParaAttention / diffusers): block 0 always runs; the
    rest is skipped while block 0's residual differs from the last computed step's by less than
    `threshold` (relative mean absolute difference). type "teacache": the whole stack is
    skipped while the accumulated, rescaled relative L1 change of block 0's modulated input
    stays below `threshold`. type "none": no cache (overrides a server default). The first and
    last steps always run; `max_consecutive_skips` caps skips in a row (None: no cap). Each
    request, and each of its classifier-free-guidance branches, decides on its own.
    """

    type: str
    threshold: float | None = None  # None: the type's default (DEFAULT_STEP_CACHE_THRESHOLDS)
    max_consecutive_skips: int | None = None

    def __post_init__(self) -> None:
        _check(self.type in STEP_CACHE_TYPES, "cache.type",
               f"cache.type must be one of {', '.join(STEP_CACHE_TYPES)}, got "
               f"{str(self.type)[:24]!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_STEP_CACHE_THRESHOLDS[self.type]
        t = self.threshold
        _check(not isinstance(t, bool) and _finite_float32(t)
               and 0.0 <= t <= MAX_STEP_CACHE_THRESHOLD, "cache.threshold",
               f"cache.threshold must be a finite number in [0, {MAX_STEP_CACHE_THRESHOLD:g}], "
               f"got {str(t)[:24]}")
        m = self.max_consecutive_skips
        _check(m is None or (type(m) is int and 0 <= m <= MAX_NUM_STEPS),
               "cache.max_consecutive_skips", f"cache.max_consecutive_skips must be an integer "
               f"in [0, {MAX_NUM_STEPS}] or null, got {str(m)[:24]}")

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    @classmethod
    def from_dict(cls, raw: object, param: str = "cache") -> StepCacheParams:
        """From a JSON object (an HTTP body's `cache`, a `--step-cache` flag): unknown keys and
        wrong types are an `InvalidRequest` naming `param` or the field."""
        _check(isinstance(raw, dict), param, f"{param} must be an object like "
               '{"type": "fbcache", "threshold": 0.08}')
        unknown = sorted(str(k) for k in raw if k not in cls.__struct_fields__)
        _check(not unknown, param, f"{param} has unknown keys {unknown}; known: "
               f"{', '.join(cls.__struct_fields__)}")
        _check("type" in raw, f"{param}.type", f"{param}.type is required "
               f"({', '.join(STEP_CACHE_TYPES)})")
        try:
            return cls(**raw)  # __post_init__ checks every value's type and range
        except InvalidRequest as e:
            raise InvalidRequest(e.message.replace("cache.", f"{param}.", 1),
                                 param=param + e.param[len("cache"):]) from None

    @classmethod
    def from_json(cls, text: str, param: str = "step_cache") -> StepCacheParams:
        try:
            raw = msgspec.json.decode(text)
        except msgspec.DecodeError:
            raise InvalidRequest(f"{param} must be JSON like "
                                 '{"type": "fbcache", "threshold": 0.08}, got '
                                 f"{text[:40]!r}", param=param) from None
        return cls.from_dict(raw, param)


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
    # None: the server's default (`--step-cache`, off unless set); a dict is converted
    cache: StepCacheParams | None = None
    # Denoised estimates (x0 predictions) decoded at evenly spaced steps and sent before the
    # image, as OpenAI's `partial_images`: 0-3 per request
    partial_images: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.cache, dict):
            self.cache = StepCacheParams.from_dict(self.cache)
        _check(self.cache is None or isinstance(self.cache, StepCacheParams), "cache",
               "cache must be a StepCacheParams, a dict like {'type': 'fbcache'}, or None")
        _check(1 <= self.n <= MAX_IMAGES_PER_REQUEST, "n",
               f"n must be in [1, {MAX_IMAGES_PER_REQUEST}], got {self.n}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _check(value is None or value >= 1, name, f"{name} must be positive, got {value}")
        steps = self.num_inference_steps
        _check(steps is None or 1 <= steps <= MAX_NUM_STEPS, "num_inference_steps",
               f"num_inference_steps must be in [1, {MAX_NUM_STEPS}], got {steps}")
        g = self.guidance_scale
        _check(g is None or (_finite_float32(g) and 0.0 <= g <= 100.0), "guidance_scale",
               f"guidance_scale must be a finite number in [0, 100], got {g}")
        _check(self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
               "seed must fit in a signed 64-bit integer")
        _check(0 <= self.partial_images <= MAX_PARTIAL_IMAGES, "partial_images",
               f"partial_images must be in [0, {MAX_PARTIAL_IMAGES}], got "
               f"{str(self.partial_images)[:24]}")
