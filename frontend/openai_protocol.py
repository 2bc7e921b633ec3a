"""The OpenAI-compatible request bodies, decoded with msgspec, and the pieces of responses.

Field names and defaults follow OpenAI's API plus vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, `prompt_logprobs`, ...),
so clients and tools written for either work unchanged. Every field a struct declares is
honoured or refused: an OpenAI option zomni does not implement is a 400 naming it unless it
asks for what zomni does anyway (`_UNSUPPORTED`). Fields neither API defines are ignored, as
both servers do.

Masked-diffusion LMs (LLaDA, Dream) take zomni's own fields besides (`DIFFUSION_FIELDS`:
`steps`, `block_length`, `remasking`, `threshold`, `cache`, `cfg_scale`, as in
`proto.sampling.DiffusionParams`); an autoregressive LLM refuses them, and a masked-diffusion
LM refuses the options it cannot honour (logprobs, penalties, logit_bias, best_of), each with a
400 naming the field.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

from zomni.proto import (
    DiffusionLMModelInfo,
    DiffusionParams,
    ImageModelInfo,
    InvalidRequest,
    ModelKind,
    SamplingParams,
    TokenModelInfo,
)
from zomni.proto.sampling import MAX_LOGIT_BIAS_ENTRIES, MAX_N, MAX_STOP

from .outputs import PositionLogprobs


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _GenerationRequest(msgspec.Struct, kw_only=True):
    """What completions and chat completions share: the model and the sampling fields.

    None (temperature, top_p, top_k, min_p, repetition_penalty) means the model's default
    from its generation_config.json, else the library's.
    """

    # field -> the values that ask for what zomni does anyway; others are a 400 naming it
    _UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None  # token id (a string, as JSON keys are) -> bias
    user: str | None = None  # who asked, for the caller's own records: nothing to apply
    # vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    prompt_logprobs: int | None = None
    # zomni: how a masked-diffusion LM decodes (DiffusionParams; None: the model's default)
    steps: int | None = None
    block_length: int | None = None
    remasking: str | None = None
    threshold: float | None = None
    cache: str | None = None
    cfg_scale: float | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_fields(self) -> None:
        """What can be refused from the body alone, before any work (a huge `n` included)."""
        for name, accepted in self._UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value not in accepted:
                allowed = f" (accepted: {', '.join(map(repr, accepted))})" if accepted else ""
                raise InvalidRequest(f"{name} is not supported by zomni{allowed}", param=name)
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequest(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) > MAX_STOP:
                raise InvalidRequest(f"{name} may list at most {MAX_STOP} entries, got "
                                     f"{len(value)}", param=name)
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options needs stream=true", param="stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequest("prompt_logprobs cannot be streamed; send stream=false",
                                 param="prompt_logprobs")

    def check_kind(self, kind: ModelKind, model: str) -> None:
        """Fields the model's kind cannot honour: diffusion fields for an autoregressive LLM,
        best_of for a masked-diffusion LM (the rest it refuses, `SamplingParams`'
        `check_diffusion_lm`, are checked once the params are built)."""
        if kind == ModelKind.AR:
            given = [f for f in DIFFUSION_FIELDS if getattr(self, f) is not None]
            if given:
                raise InvalidRequest(f"{', '.join(given)} apply to masked-diffusion LMs; "
                                     f"{model!r} is an autoregressive LLM", param=given[0])
        best_of = getattr(self, "best_of", None)
        if kind == ModelKind.DLLM and best_of is not None and best_of != self.n:
            raise InvalidRequest(f"best_of is not supported by {model!r}, a masked-diffusion LM "
                                 "(it ranks samples by logprobs, which it does not compute)",
                                 param="best_of")

    def diffusion_params(self) -> DiffusionParams | None:
        """The request's DiffusionParams (its checks raise `InvalidRequest` naming the
        field); None when it sets none of them."""
        given = {f: getattr(self, f) for f in DIFFUSION_FIELDS if getattr(self, f) is not None}
        return DiffusionParams(**given) if given else None

    def sampling_params(self, vocab_size: int, defaults: dict[str, Any],
                        max_tokens: int | None, logprobs: int | None, n: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Validated `SamplingParams` (its checks raise `InvalidRequest` naming the field);
        `defaults` are the model's generation_config values."""
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}",
                                 param="max_tokens")

        def pick(name: str, library_default: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, library_default)

        return SamplingParams(
            n=n or self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0), min_p=pick("min_p", 0.0), seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            repetition_penalty=pick("repetition_penalty", 1.0),
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=logit_bias_ids(self.logit_bias, vocab_size),
            prompt_logprobs=prompt_logprobs, diffusion=self.diffusion_params())


DIFFUSION_FIELDS = tuple(DiffusionParams.__struct_fields__)
_TOKEN_ID = re.compile(r"^[0-9]{1,19}$")


def logit_bias_ids(bias: dict[str, Any] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's `logit_bias` ({"50256": -100}) as SamplingParams takes it ({50256: -100.0});
    a key that is not a token id of this model, or a value outside [-100, 100], is a 400."""
    if not bias:
        return None
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequest(f"logit_bias may list at most {MAX_LOGIT_BIAS_ENTRIES} tokens, "
                             f"got {len(bias)}", param="logit_bias")
    out = {}
    for key, value in bias.items():
        if not _TOKEN_ID.match(key) or int(key) >= vocab_size:
            raise InvalidRequest(f"logit_bias keys must be token ids in [0, {vocab_size}), "
                                 f"got {key[:24]!r}", param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise InvalidRequest(f"logit_bias values must be numbers in [-100, 100], got "
                                 f"{str(value)[:24]} for token {key}", param="logit_bias")
        out[int(key)] = float(value)
    return out


class CompletionRequest(_GenerationRequest, kw_only=True):
    _UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"suffix": ("",)}

    # str | list[str] | list[int] | list[list[int]]; msgspec allows one array type in a
    # union, so the list's contents are checked by `prompts()`.
    prompt: str | list[Any]
    max_tokens: int | None = 16  # 0 with `echo`: the prompt only
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None  # sample this many per prompt, return the n most likely
    suffix: str | None = None

    def check_fields(self) -> None:
        super().check_fields()
        if self.best_of is not None:
            if not self.n <= self.best_of <= MAX_N:
                raise InvalidRequest(f"best_of must be in [n, {MAX_N}] (n is {self.n}), got "
                                     f"{self.best_of}", param="best_of")
            if self.stream and self.best_of > 1:
                raise InvalidRequest("best_of cannot be streamed; send stream=false",
                                     param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest("max_tokens must be at least 1 (0 needs echo=true)",
                                 param="max_tokens")

    @property
    def samples(self) -> int:
        """Sequences generated per prompt."""
        return self.best_of or self.n

    @property
    def prompt_only(self) -> bool:
        """`echo` with `max_tokens: 0`: return the prompt (and its logprobs), generate none."""
        return self.echo and self.max_tokens == 0

    def completion_params(self, vocab_size: int, defaults: dict[str, Any]) -> SamplingParams:
        """The params of each prompt's fan-out (`samples` sequences). `best_of` ranks samples
        by their cumulative logprob, so it asks for the sampled tokens' logprobs; `echo` with
        `logprobs` asks for the prompt's."""
        echo_logprobs = self.logprobs if self.echo else None
        wanted = [v for v in (self.prompt_logprobs, echo_logprobs) if v is not None]
        logprobs = self.logprobs
        if logprobs is None and self.samples > self.n:
            logprobs = 0
        # A prompt-only request still runs one step: that computes the prompt's logprobs.
        return self.sampling_params(vocab_size, defaults,
                                    1 if self.prompt_only else self.max_tokens, logprobs,
                                    n=self.samples,
                                    prompt_logprobs=max(wanted) if wanted else None)

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(_is_int(t) for t in p):
            return [p]
        if p and all(isinstance(x, str) for x in p):
            return list(p)
        if p and all(isinstance(x, list) and x and all(_is_int(t) for t in x) for x in p):
            return list(p)
        raise InvalidRequest("prompt must be a string, a list of strings, a list of token ids "
                             "or a list of non-empty token-id lists", param="prompt")


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template sees it: content flattened to one string."""
        if self.role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidRequest(f"unknown message role {self.role!r}", param="messages")
        content = self.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise InvalidRequest("only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in content)
        msg = msgspec.structs.asdict(self)
        msg["content"] = content or ""
        return {k: v for k, v in msg.items() if v is not None}


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    # Tool calling and structured output are not implemented yet: "none" / plain text is what
    # zomni does anyway.
    _UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "tools": (), "tool_choice": ("none",), "functions": (), "function_call": ("none",),
        "response_format": ({"type": "text"},)}

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise InvalidRequest(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                 param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def decode_body(body: bytes, cls: type[msgspec.Struct]) -> Any:
    """Decode a JSON body into `cls`; a clear 400 (naming the field) on bad JSON or types,
    nesting too deep for the decoder, or an integer the wire's int64 cannot carry."""
    try:
        decoded = msgspec.json.decode(body, type=cls)
    except RecursionError:  # even in an ignored field: msgspec parses what it skips
        raise InvalidRequest("the request body is nested too deeply") from None
    except msgspec.ValidationError as e:
        msg = str(e)
        found = _AT_PATH.search(msg) or _MISSING.search(msg)
        raise InvalidRequest(f"invalid request: {msg}",
                             param=found.group(1) if found else None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    _check_int64(decoded)
    return decoded


_INT64_LO, _INT64_HI = -(2**63), 2**63


def _check_int64(struct: msgspec.Struct) -> None:
    """A 400 naming the field for an int of a struct field, or in a (nested) list of them,
    outside int64: msgspec decodes any size, and encoding one for the engine would fail."""
    for name in struct.__struct_fields__:
        items = [getattr(struct, name)]
        while items:  # a stack, not recursion: a list may be nested deep
            v = items.pop()
            if isinstance(v, msgspec.Struct):
                _check_int64(v)
            elif isinstance(v, list) and v:
                try:  # all numbers, all in range (the common case), found in C
                    if min(v) >= _INT64_LO and max(v) < _INT64_HI:
                        continue
                except TypeError:  # it holds more than numbers
                    pass
                items.extend(x for x in v if isinstance(x, (int, list, msgspec.Struct)))
            elif type(v) is int and not _INT64_LO <= v < _INT64_HI:
                raise InvalidRequest(f"{name} has an integer outside the signed 64-bit range",
                                     param=name)


# ---- response pieces ----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def top_logprobs(entry: PositionLogprobs, num: int) -> list[tuple[int, Any]]:
    """The `num` most likely tokens of one position (the sampled one is first in `entry`)."""
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:num]


def prompt_logprobs_json(entries: list[PositionLogprobs | None] | None
                         ) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt position, None (position 0) or
    {token id: {"logprob", "rank", "decoded_token"}}, the prompt token first."""
    if entries is None:
        return None
    return [None if entry is None else {
        str(token_id): {"logprob": lp.logprob, "rank": lp.rank,
                        "decoded_token": lp.decoded_token}
        for token_id, lp in entry.items()} for entry in entries]


def model_card(name: str, root: str,
               details: TokenModelInfo | ImageModelInfo | DiffusionLMModelInfo, created: int
               ) -> dict[str, Any]:
    """/v1/models's entry: OpenAI's fields, vLLM's `root` and `max_model_len` (LLMs only), and
    zomni's `zomni_kind` ("ar", "dllm" or "image"); a masked-diffusion LM's `zomni_diffusion`
    holds its decoding defaults; an image model's `zomni_image` says what its requests take (a
    prompt or `class_labels`) and its default size."""
    card: dict[str, Any] = {"id": name, "object": "model", "created": created,
                            "owned_by": "zomni", "root": root, "parent": None,
                            "permission": []}
    if isinstance(details, TokenModelInfo):
        return {**card, "max_model_len": details.max_model_len, "zomni_kind": "ar"}
    if isinstance(details, DiffusionLMModelInfo):
        return {**card, "max_model_len": details.max_model_len, "zomni_kind": "dllm",
                "zomni_diffusion": {"remasking": details.remasking,
                                    "block_length": details.block_length}}
    return {**card, "zomni_kind": "image", "zomni_image": {
        "conditioning": details.conditioning, "num_classes": details.num_classes,
        "default_size": f"{details.default_width}x{details.default_height}"}}


def error_body(message: str, type_: str, status: int, param: str | None = None
               ) -> dict[str, Any]:
    """OpenAI's error object; `code` is the HTTP status, as vLLM sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
