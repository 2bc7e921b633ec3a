"""The OpenAI-compatible request bodies, decoded with msgspec, and the pieces of responses.

Field names and defaults follow OpenAI's API plus vLLM's extensions (`top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`, ...), so clients and tools
written for either work unchanged. Unknown fields are ignored, as both servers do.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from zomni.proto import InvalidRequest, SamplingParams

from .outputs import Logprob


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _GenerationRequest(msgspec.Struct, kw_only=True):
    """What completions and chat completions share: the model and the sampling fields."""

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
    user: str | None = None
    # vLLM extensions
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Validated `SamplingParams` (its checks raise `InvalidRequest` naming the field)."""
        if max_tokens is not None and max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}",
                                 param="max_tokens")
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p, seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)


class CompletionRequest(_GenerationRequest, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]; msgspec allows one array type in a
    # union, so the list's contents are checked by `prompts()`.
    prompt: str | list[Any]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

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
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM extensions
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
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
    """Decode a JSON body into `cls`; a clear 400 (naming the field) on bad JSON or types."""
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as e:
        msg = str(e)
        found = _AT_PATH.search(msg) or _MISSING.search(msg)
        raise InvalidRequest(f"invalid request: {msg}",
                             param=found.group(1) if found else None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None


# ---- response pieces ----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _top(entry: dict[int, Logprob], num: int) -> list[tuple[int, Logprob]]:
    """The `num` most likely tokens of one position (the sampled one is first in `entry`)."""
    return sorted(entry.items(), key=lambda kv: kv[1].rank)[:num]


def completion_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], num: int,
                        text_offset: int) -> dict[str, list]:
    """The legacy completions `logprobs` object for generated tokens `token_ids`."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        text = sampled.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(sampled.logprob)
        top = {lp.decoded_token or "": lp.logprob for _, lp in _top(entry, num)}
        top.setdefault(text, sampled.logprob)  # vLLM lists the sampled token too
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def _chat_token(text: str | None, logprob: float) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int],
                  num: int) -> dict[str, list]:
    """The chat `logprobs` object ({"content": [...]}) for generated tokens `token_ids`."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry[token_id]
        item = _chat_token(sampled.decoded_token, sampled.logprob)
        item["top_logprobs"] = [_chat_token(lp.decoded_token, lp.logprob)
                                for _, lp in _top(entry, num)]
        content.append(item)
    return {"content": content}


def model_card(name: str, root: str, max_model_len: int | None, created: int
               ) -> dict[str, Any]:
    """/v1/models's entry; image models have no `max_model_len`."""
    card = {"id": name, "object": "model", "created": created, "owned_by": "zomni",
            "root": root, "parent": None, "max_model_len": max_model_len, "permission": []}
    if max_model_len is None:
        del card["max_model_len"]
    return card


def error_body(message: str, type_: str, status: int, param: str | None = None
               ) -> dict[str, Any]:
    """OpenAI's error object; `code` is the HTTP status, as vLLM sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}
