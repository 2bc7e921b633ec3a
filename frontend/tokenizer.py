"""Tokenizer loading, prompt normalisation and chat templates (frontend only)."""

from __future__ import annotations

from typing import Any

from zomni.proto import InvalidRequest

Prompt = str | dict[str, Any] | list[int]


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


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
