"""How a masked-diffusion LM (LLaDA, Dream) decodes one request: `DiffusionParams`, carried by
`SamplingParams.diffusion`, and `resolve_diffusion`, which the engine core runs to fill in the
model's defaults and check what needs the model or the length.

Torch-free, like the rest of `proto`: the workers build their decoding state from the resolved
struct (`workers.dllm_decoding.DecodingParams.from_request`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from .checks import check as _check
from .checks import finite_float32 as _finite_float32
from .errors import ContextLengthExceeded

if TYPE_CHECKING:
    from .sampling import SamplingParams

# How a denoising step picks the masked positions it commits (`workers/dllm_decoding.py` has
# the table): LLaDA's two, then Dream's four.
REMASKING = ("low_confidence", "random", "origin", "maskgit_plus", "topk_margin", "entropy")
LLADA_REMASKING = ("low_confidence", "random")  # LLaDA's schedule and token choice
THRESHOLD_REMASKING = ("low_confidence", "maskgit_plus", "topk_margin")  # confidence in [0, 1]
DIFFUSION_CACHES = ("none", "prefix", "dual")
# The generated length of a request that gives no max_tokens (a chat request may leave it
# out): LLaDA's `generate` default.
DEFAULT_DIFFUSION_MAX_TOKENS = 128
_MAX_BLOCK_LENGTH = 2**31 - 1
_MAX_CFG_SCALE = 100.0


class DiffusionParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False,
                      kw_only=True):
    """How a masked-diffusion LM (LLaDA, Dream) decodes one request.

    The answer is `max_tokens` rounded up to whole blocks of `block_length` masked positions,
    decoded block by block (left to right), each block over `steps / num_blocks` denoising
    steps; each step commits some of the block's masked positions, chosen by `remasking`:

        low_confidence, random                      LLaDA's (the most probable token's
                                                    probability / a uniform draw)
        origin, maskgit_plus, topk_margin, entropy  Dream's (`alg`)

    `threshold` (Fast-dLLM's parallel decoding) commits every position whose confidence reaches
    it (at least one per step) instead of a fixed count, so a block takes as many steps as it
    needs and `steps` is not used. `cache` keeps the K/V of the positions outside the current
    block between its steps (Fast-dLLM): "prefix" those before it, "dual" before and after it,
    refreshed at each block's first step. `cfg_scale` > 0: LLaDA's classifier-free guidance
    (a second, prompt-masked forward per step; without a cache).

    None means the model's default (`DiffusionLMModelInfo`: `remasking`, `block_length`;
    `steps` = the generated length, one token per step; no threshold; cache "none").
    Everything that needs the model or the length (steps against the number of blocks,
    threshold against the default remasking) is checked by `resolve_diffusion`.
    """

    steps: int | None = None  # over the whole answer, split evenly over its blocks
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "block_length"):
            value = getattr(self, name)
            _check(value is None or (type(value) is int and 1 <= value <= _MAX_BLOCK_LENGTH),
                   name, f"{name} must be a positive integer, got {repr(value)[:24]}")
        _check(self.remasking is None or self.remasking in REMASKING, "remasking",
               f"remasking must be one of {', '.join(REMASKING)}, got "
               f"{str(self.remasking)[:24]!r}")
        t = self.threshold
        _check(t is None or (not isinstance(t, bool) and _finite_float32(t) and 0 < t <= 1),
               "threshold", f"threshold must be a number in (0, 1], got {str(t)[:24]}")
        _check(t is None or self.remasking is None or self.remasking in THRESHOLD_REMASKING,
               "threshold", f"threshold applies to remasking {', '.join(THRESHOLD_REMASKING)} "
               f"(whose confidence is a probability), not {self.remasking}")
        _check(t is None or self.steps is None, "steps", "steps has no effect with threshold "
               "(a block takes as many steps as it needs): give one of them")
        _check(self.cache is None or self.cache in DIFFUSION_CACHES, "cache",
               f"cache must be one of {', '.join(DIFFUSION_CACHES)}, got "
               f"{str(self.cache)[:24]!r}")
        g = self.cfg_scale
        _check(not isinstance(g, bool) and _finite_float32(g) and 0 <= g <= _MAX_CFG_SCALE,
               "cfg_scale", f"cfg_scale must be a number in [0, {_MAX_CFG_SCALE:g}], got "
               f"{str(g)[:24]}")
        _check(g == 0 or self.cache in (None, "none"), "cfg_scale",
               "classifier-free guidance (cfg_scale > 0) runs without a KV cache: "
               f"send cache \"none\", not {self.cache!r}")

    @classmethod
    def from_dict(cls, raw: object, param: str = "diffusion") -> DiffusionParams:
        """From a plain dict: unknown keys and wrong types are an `InvalidRequest`."""
        _check(isinstance(raw, dict), param, f"{param} must be an object like "
               '{"steps": 64, "block_length": 32}')
        unknown = sorted(str(k) for k in raw if k not in cls.__struct_fields__)
        _check(not unknown, param, f"{param} has unknown keys {unknown}; known: "
               f"{', '.join(cls.__struct_fields__)}")
        return cls(**raw)  # __post_init__ checks every value's type and range


def resolve_diffusion(sampling: SamplingParams, num_prompt_tokens: int, max_model_len: int,
                      default_remasking: str, default_block_length: int
                      ) -> tuple[SamplingParams, int]:
    """(`sampling` with its `diffusion` resolved: every default filled in and
    `max_tokens` set, the generated length), for a prompt of `num_prompt_tokens`.

    The generated length is `max_tokens` rounded up to whole blocks (128 tokens without
    `max_tokens`, fewer when the context has less room); at most `max_tokens` of them are
    returned. Raises `InvalidRequest` / `ContextLengthExceeded` naming the field."""
    p = sampling.diffusion or DiffusionParams()
    block = p.block_length or default_block_length
    room = max_model_len - num_prompt_tokens
    if sampling.max_tokens is None:
        max_tokens = min(DEFAULT_DIFFUSION_MAX_TOKENS, room // block * block)
    else:
        max_tokens = sampling.max_tokens
    gen_length = -(-max(max_tokens, 1) // block) * block
    if max_tokens < 1 or gen_length > room:
        asked = "one block" if sampling.max_tokens is None \
            else f"max_tokens={sampling.max_tokens} needs {gen_length} positions"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. The prompt has "
            f"{num_prompt_tokens} tokens and the answer is decoded in blocks of {block}: "
            f"{asked}, {num_prompt_tokens + gen_length} in all. Reduce the prompt, "
            "max_tokens or block_length.", param="max_tokens")
    num_blocks = gen_length // block
    # with a threshold a block takes as many steps as it needs: there is no step count
    steps = None if p.threshold is not None else gen_length if p.steps is None else p.steps
    _check(steps is None or (steps % num_blocks == 0 and steps <= gen_length), "steps",
           f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks}: "
           f"{gen_length} positions in blocks of {block}) and at most {gen_length}")
    remasking = p.remasking or default_remasking
    _check(p.threshold is None or remasking in THRESHOLD_REMASKING, "threshold",
           f"threshold applies to remasking {', '.join(THRESHOLD_REMASKING)}; this "
           f"request decodes with {remasking} (the model's default when not given): send "
           "remasking too")
    if remasking in LLADA_REMASKING:
        for name, unset in (("top_p", (1.0,)), ("top_k", (0, -1))):
            _check(getattr(sampling, name) in unset, name,
                   f"{name} applies to Dream's remasking ({', '.join(REMASKING[2:])}), "
                   f"not {remasking}")
    resolved = DiffusionParams(steps=steps, block_length=block, remasking=remasking,
                               threshold=p.threshold, cache=p.cache or "none",
                               cfg_scale=p.cfg_scale)
    return msgspec.structs.replace(sampling, max_tokens=max_tokens,
                                   diffusion=resolved), gen_length
