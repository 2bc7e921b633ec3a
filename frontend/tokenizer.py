"""Tokenizer loading, prompt normalisation and chat templates (frontend only).

The `*_async` variants are what the HTTP frontend and `AsyncLLM` call: they run the tokenizer
in a small thread pool (HF fast tokenizers release the GIL), so a long prompt never holds up
the event loop and the tokens of other streams; and, given the model's `max_model_len`, they
refuse a text that cannot fit it by its character count, before spending any time on it.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from zomni.proto import InvalidRequest

Prompt = str | dict[str, Any] | list[int]
T = TypeVar("T")

# No tokenizer we know has a token longer than 64 characters (long whitespace runs and
# repeated punctuation come closest), so a text over 64 x max_model_len characters is surely
# over max_model_len tokens. Generous on purpose: a bound too tight would refuse valid
# prompts, one too loose only costs tokenizer time, which is off the event loop.
MAX_CHARS_PER_TOKEN = 64
# Arguments of apply_chat_template that the request sets through its own fields, or that
# change what it returns; a `chat_template_kwargs` key among them is refused. `chat_template`
# too: a template is code, and vLLM refuses one from a request unless told to trust it.
_RESERVED_TEMPLATE_KWARGS = frozenset((
    "conversation", "messages", "tokenize", "add_generation_prompt", "tokenizer",
    "return_dict", "return_tensors", "return_assistant_tokens_mask", "padding",
    "truncation", "max_length", "chat_template"))

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    # Its own pool: tokenizing never waits behind asyncio.to_thread users (tokenizer loads),
    # and a few threads bound how much CPU a burst of long prompts takes.
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                   thread_name_prefix="zomni-tokenize")
    return _pool


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` in the tokenizer thread pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_executor(), functools.partial(fn, *args, **kwargs))


def prompt_char_limit(max_model_len: int) -> int:
    return MAX_CHARS_PER_TOKEN * max_model_len


def check_prompt_chars(num_chars: int, max_model_len: int | None, param: str) -> None:
    """A 400 for a text that cannot fit in `max_model_len` tokens (None: no limit)."""
    if max_model_len is not None and num_chars > prompt_char_limit(max_model_len):
        raise InvalidRequest(
            f"the {param} has {num_chars} characters, more than any text of at most "
            f"{max_model_len} tokens (this model's maximum context length) can have "
            f"({MAX_CHARS_PER_TOKEN} characters per token, {prompt_char_limit(max_model_len)} "
            "in all); shorten it", param=param)


def _prompt_chars(prompt: Prompt) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str) \
            and "prompt_token_ids" not in prompt:
        return len(prompt["prompt"])
    return 0  # token ids: checked against max_model_len once counted


def _messages_chars(messages: list[dict[str, Any]]) -> int:
    return sum(len(v) for m in messages for v in m.values() if isinstance(v, str))


async def encode_prompt_async(tokenizer, prompt: Prompt, max_model_len: int | None = None,
                              param: str = "prompt") -> tuple[str | None, list[int]]:
    """`encode_prompt` off the event loop, after the character limit of `max_model_len`."""
    check_prompt_chars(_prompt_chars(prompt), max_model_len, param)
    if isinstance(prompt, list):  # token ids: nothing to tokenize
        return encode_prompt(tokenizer, prompt)
    return await off_loop(encode_prompt, tokenizer, prompt)


async def encode_text_async(tokenizer, text: str, add_special_tokens: bool = True,
                            max_model_len: int | None = None, param: str = "prompt"
                            ) -> list[int]:
    check_prompt_chars(len(text), max_model_len, param)
    return await off_loop(tokenizer.encode, text, add_special_tokens=add_special_tokens)


async def apply_chat_template_async(tokenizer, messages: list[dict[str, Any]],
                                    add_generation_prompt: bool = True,
                                    template_kwargs: dict[str, Any] | None = None,
                                    max_model_len: int | None = None) -> list[int]:
    """`apply_chat_template` off the event loop. `template_kwargs` (a request's
    `chat_template_kwargs`, plus `tools`) may not set what the request's own fields set."""
    check_prompt_chars(_messages_chars(messages), max_model_len, "messages")
    return await off_loop(apply_chat_template, tokenizer, messages, add_generation_prompt,
                          **check_template_kwargs(template_kwargs))


def check_template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`kwargs` for the chat template; a key that names one of its fixed arguments is a 400."""
    kwargs = dict(kwargs or {})
    reserved = sorted(str(k) for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(reserved)}: the "
                             "request's own fields set them", param="chat_template_kwargs")
    return kwargs


async def decode_async(tokenizer, token_ids: list[int], **kwargs: Any) -> str:
    return await off_loop(tokenizer.decode, token_ids, **kwargs)


def load_tokenizer(model: str):
    from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (ValueError, OSError):
        # a config class transformers lacks (LLaDA's, Dream's remote code): the tokenizer
        # does not need it, and AutoTokenizer's own fallback warns at every start
        config = PretrainedConfig()
    return AutoTokenizer.from_pretrained(model, config=config)


def encode_prompt(tokenizer, prompt: Prompt) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) for a str, a token-id list or {"prompt_token_ids": …}."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_special_tokens=True)
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), _check_ids(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return encode_prompt(tokenizer, prompt["prompt"])
        raise InvalidRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'",
                             param="prompt")
    if isinstance(prompt, list):
        return None, _check_ids(prompt)
    raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}", param="prompt")


def _check_ids(ids) -> list[int]:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise InvalidRequest("prompt_token_ids must be a list of integers", param="prompt")
    return ids


def apply_chat_template(tokenizer, messages: list[dict[str, Any]],
                        add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of `messages` rendered by the model's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; use completions instead",
                             param="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except Exception as e:  # jinja errors on malformed messages are the caller's mistake
        raise InvalidRequest(f"could not apply the chat template: {e}",
                             param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)
