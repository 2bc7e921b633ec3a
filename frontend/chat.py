"""/v1/chat/completions' response bodies: choices, SSE chunks and the chat `logprobs` object.

    logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{...}, ...]}, ...]}

vLLM's `prompt_logprobs` extension goes on the response, not on a choice, as vLLM puts it
(one conversation per request: every choice has the same prompt).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from . import openai_protocol as oai
from .outputs import PositionLogprobs
from .sequences import Item, Sequence, usage_counts


def _token(text: str | None, logprob: float) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[PositionLogprobs], token_ids: list[int],
                  num: int) -> dict[str, list]:
    """The chat `logprobs` object for generated tokens `token_ids`."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        item = _token(chosen.decoded_token, chosen.logprob)
        item["top_logprobs"] = [_token(lp.decoded_token, lp.logprob)
                                for _, lp in oai.top_logprobs(entry, num)]
        content.append(item)
    return {"content": content}


def chat_response(seqs: list[Sequence], body: oai.ChatCompletionRequest, num_top: int | None,
                  head: dict[str, Any]) -> dict[str, Any]:
    """The whole response, once every sequence has finished."""
    choices = []
    for seq in seqs:
        out = seq.state.output
        logprobs = None if num_top is None else chat_logprobs(out.logprobs, out.token_ids,
                                                              num_top)
        choices.append({"index": out.index,
                        "message": {"role": "assistant", "content": out.text},
                        "logprobs": logprobs, "finish_reason": out.finish_reason,
                        "stop_reason": out.stop_reason})
    response = {**head, "object": "chat.completion", "choices": choices,
                "usage": oai.usage(*usage_counts(seqs))}
    if body.prompt_logprobs is not None:  # only the first sample asked for them
        response["prompt_logprobs"] = oai.prompt_logprobs_json(seqs[0].state.prompt_logprobs)
    return response


async def chat_chunks(items: AsyncIterator[Item], seqs: list[Sequence],
                      body: oai.ChatCompletionRequest, num_top: int | None,
                      head: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """One chunk per engine output of any choice, from that output's delta alone."""
    head = {**head, "object": "chat.completion.chunk"}
    async with aclosing(items):  # closing the chunks closes the engine streams
        async for seq, delta in items:
            content: dict[str, Any] = {"content": delta.text}
            if not seq.started:  # the first chunk of a choice names the role
                seq.started = True
                content = {"role": "assistant", **content}
            logprobs = None if num_top is None else chat_logprobs(
                delta.logprobs, delta.token_ids, num_top)
            yield {**head, "choices": [{
                "index": seq.state.output.index, "delta": content, "logprobs": logprobs,
                "finish_reason": delta.finish_reason, "stop_reason": delta.stop_reason}]}
    if body.include_usage:
        yield {**head, "choices": [], "usage": oai.usage(*usage_counts(seqs))}
