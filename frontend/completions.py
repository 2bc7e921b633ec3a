"""/v1/completions' response bodies: choices, SSE chunks and the legacy `logprobs` object.

    logprobs = {"tokens": [text, ...], "token_logprobs": [lp, ...],
                "top_logprobs": [{text: lp, ...}, ...], "text_offset": [offset, ...]}

With `echo` the text starts with the prompt, and `logprobs` covers the prompt's tokens first:
position 0 has no context, so its `token_logprobs` and `top_logprobs` are null (as OpenAI's
legacy API had it); prompt offsets count from 0, the completion's from the end of the prompt
text. `best_of` samples are ranked here; a prompt-only sequence (`echo`, `max_tokens: 0`) shows
the prompt, never its one generated token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from . import openai_protocol as oai
from .outputs import PositionLogprobs, SequenceDelta
from .sequences import Item, Sequence, usage_counts

# (token text, its logprob or None, the top-N {text: logprob} or None)
Position = tuple[str, float | None, dict[str, float] | None]


def _positions(token_ids: list[int], entries: list[PositionLogprobs | None], num: int,
               tokenizer) -> list[Position]:
    out = []
    for token_id, entry in zip(token_ids, entries):
        if entry is None:  # prompt position 0
            out.append((tokenizer.decode([token_id]), None, None))
            continue
        chosen = entry[token_id]
        text = chosen.decoded_token or ""
        top = {lp.decoded_token or "": lp.logprob for _, lp in oai.top_logprobs(entry, num)}
        top.setdefault(text, chosen.logprob)  # vLLM lists the chosen token too
        out.append((text, chosen.logprob, top))
    return out


def legacy_logprobs(parts: list[tuple[list[Position], int]]) -> dict[str, list]:
    """The `logprobs` object of runs of positions, each run's offsets from its own start."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for positions, offset in parts:
        for text, logprob, top in positions:
            tokens.append(text)
            token_logprobs.append(logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def _prompt_positions(seq: Sequence, entries: list[PositionLogprobs | None] | None,
                      num: int, tokenizer) -> list[Position]:
    if entries is None:  # the engine sent none: a request that failed before its first step
        return []
    return _positions(seq.request.prompt_token_ids, entries, num, tokenizer)


def best_of(seqs: list[Sequence], n: int) -> list[Sequence]:
    """The n samples of each prompt with the highest cumulative logprob, renumbered as OpenAI
    numbers choices (prompt i's are i*n .. i*n+n-1, the most likely first)."""
    chosen = []
    for i in sorted({s.prompt_index for s in seqs}):
        ranked = sorted((s for s in seqs if s.prompt_index == i), reverse=True,
                        key=lambda s: s.state.output.cumulative_logprob)
        for j, seq in enumerate(ranked[:n]):
            seq.state.output.index = i * n + j
            chosen.append(seq)
    return chosen


def completion_response(seqs: list[Sequence], body: oai.CompletionRequest,
                        head: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The whole response, once every sequence has finished."""
    # Only the first sample of each prompt asked for prompt logprobs (the same for all).
    prompt_lps = {s.prompt_index: s.state.prompt_logprobs for s in seqs
                  if s.state.prompt_logprobs is not None}
    shown = best_of(seqs, body.n) if body.samples > body.n else seqs
    choices = []
    for seq in shown:
        out, prompt_lp = seq.state.output, prompt_lps.get(seq.prompt_index)
        text = seq.prompt_text if seq.prompt_only else seq.prompt_text + out.text
        logprobs = None
        if body.logprobs is not None:
            parts = [] if not body.echo else [
                (_prompt_positions(seq, prompt_lp, body.logprobs, tokenizer), 0)]
            if not seq.prompt_only:
                parts.append((_positions(out.token_ids, out.logprobs, body.logprobs,
                                         tokenizer), len(seq.prompt_text)))
            logprobs = legacy_logprobs(parts)
        choices.append({
            "index": out.index, "text": text, "logprobs": logprobs,
            "finish_reason": "length" if seq.prompt_only else out.finish_reason,
            "stop_reason": None if seq.prompt_only else out.stop_reason,
            "prompt_logprobs": oai.prompt_logprobs_json(prompt_lp)
            if body.prompt_logprobs is not None else None})
    choices.sort(key=lambda c: c["index"])
    return {**head, "choices": choices, "usage": oai.usage(*usage_counts(seqs))}


def _chunk_choice(seq: Sequence, delta: SequenceDelta, body: oai.CompletionRequest,
                  tokenizer) -> dict[str, Any]:
    text, parts = ("" if seq.prompt_only else delta.text), []
    if not seq.started:  # echo: the prompt comes first
        seq.started = True
        text = seq.prompt_text + text
        seq.text_offset = len(seq.prompt_text)
        if body.echo and body.logprobs is not None:
            parts.append((_prompt_positions(seq, seq.state.prompt_logprobs, body.logprobs,
                                            tokenizer), 0))
    logprobs = None
    if body.logprobs is not None:
        if not seq.prompt_only:
            generated = _positions(delta.token_ids, delta.logprobs, body.logprobs, tokenizer)
            parts.append((generated, seq.text_offset))
            seq.text_offset += sum(len(p[0]) for p in generated)
        logprobs = legacy_logprobs(parts)
    finish, stop = delta.finish_reason, delta.stop_reason
    if seq.prompt_only:
        finish, stop = ("length" if finish is not None else None), None
    return {"index": seq.state.output.index, "text": text, "logprobs": logprobs,
            "finish_reason": finish, "stop_reason": stop}


async def completion_chunks(items: AsyncIterator[Item], seqs: list[Sequence],
                            body: oai.CompletionRequest, head: dict[str, Any], tokenizer
                            ) -> AsyncIterator[dict[str, Any]]:
    """One chunk per engine output of any choice, from that output's delta alone. Streams
    never use best_of (refused), and with echo + logprobs every sample asked for the prompt's
    logprobs, so each choice's first chunk has them."""
    async with aclosing(items):  # closing the chunks closes the engine streams
        async for seq, delta in items:
            yield {**head, "choices": [_chunk_choice(seq, delta, body, tokenizer)]}
    if body.include_usage:
        yield {**head, "choices": [], "usage": oai.usage(*usage_counts(seqs))}
