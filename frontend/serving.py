"""From a decoded OpenAI request to engine requests and back: the generation endpoints.

    HTTP body ─► prompts (chat template / tokenizer) ─► SamplingParams ─► Sequences
    (one per prompt × n, each an engine request with its RequestState) ─► generate():
    every sequence's engine stream merged into one async stream of (sequence, new text)
    ─► a JSON response, or SSE chunks written as they come.

Closing the merged stream (client gone, handler cancelled, stop string hit) closes each engine
stream, and `AsyncEngineClient.generate` aborts an unfinished request in the engine then.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from zomni.proto import (
    ContextLengthExceeded,
    EngineOverloaded,
    EngineRequest,
    InvalidRequest,
    ModelInfo,
    SamplingParams,
    ZomniError,
)
from zomni.proto.client import AsyncEngineClient

from . import openai_protocol as oai
from .metrics import ModelMetrics, SequenceTimer
from .outputs import RequestState, child_requests
from .tokenizer import apply_chat_template, encode_prompt

logger = logging.getLogger("zomni.frontend")

_encode = msgspec.json.Encoder().encode


@dataclass(eq=False)
class Sequence:
    """One choice of an HTTP request: its engine request, text state and timing."""

    state: RequestState
    request: EngineRequest
    timer: SequenceTimer
    prompt_text: str  # what `echo` prepends ("" without echo)
    counts_prompt: bool  # the first sequence of its prompt: its prompt tokens go in usage
    num_logprobs_sent: int = 0
    text_offset: int = 0
    started: bool = False  # the first chunk (role / echo) was sent

    def new_logprobs(self) -> tuple[list, list[int]]:
        """Logprob entries and token ids not yet streamed."""
        out, start = self.state.output, self.num_logprobs_sent
        self.num_logprobs_sent = len(out.logprobs)
        return out.logprobs[start:], out.token_ids[start:len(out.logprobs)]


def usage_of(seqs: list[Sequence]) -> dict[str, int]:
    return oai.usage(sum(s.state.num_prompt_tokens for s in seqs if s.counts_prompt),
                     sum(len(s.state.output.token_ids) for s in seqs))


class OpenAIServing:
    """The completions and chat endpoints over one engine client."""

    def __init__(self, client: AsyncEngineClient, tokenizer, info: ModelInfo,
                 model_names: list[str], metrics: ModelMetrics, max_inflight: int):
        self.client = client
        self.tokenizer = tokenizer
        self.info = info
        self.model_names = model_names
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.inflight = 0  # engine requests of this frontend not finished yet

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise InvalidRequest(f"the model {name!r} does not exist; this server serves "
                             f"{', '.join(map(repr, self.model_names))}", param="model")

    # ---- requests in ----------------------------------------------------------------------

    def _check_prompt(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        n, limit, vocab = len(ids), self.info.details.max_model_len, self.info.details.vocab_size
        if n == 0:
            raise InvalidRequest("the prompt is empty", param=param)
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param=param)
        if max_tokens is None and n >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"prompt has {n} tokens. Please reduce the length of the prompt.", param=param)
        if max_tokens is not None and n + max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {n + max_tokens} tokens ({n} in the prompt, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or completion.",
                param=param)

    def sequences(self, base_id: str, prompts: list[tuple[str | None, list[int]]],
                  params: SamplingParams, priority: int, param: str,
                  echo: bool = False) -> list[Sequence]:
        """Prompt i's n samples become choices i*n .. i*n+n-1, as OpenAI numbers them."""
        seqs = []
        for i, (text, ids) in enumerate(prompts):
            self._check_prompt(ids, params.max_tokens, param)
            prompt_text = "" if not echo else text if text is not None \
                else self.tokenizer.decode(ids)
            for j, child in enumerate(child_requests(f"{base_id}-{i}", ids, params, priority)):
                state = RequestState(child.request_id, i * params.n + j, ids, child.sampling,
                                     self.tokenizer, self.info.details.eos_token_ids)
                seqs.append(Sequence(state, child, SequenceTimer(self.metrics), prompt_text,
                                     counts_prompt=j == 0))
        return seqs

    # ---- engine streams -------------------------------------------------------------------

    async def generate(self, seqs: list[Sequence]) -> AsyncIterator[tuple[Sequence, str]]:
        """(sequence, new text) for every engine output of any of `seqs`, as they arrive."""
        if self.inflight + len(seqs) > self.max_inflight:
            raise EngineOverloaded(f"this frontend already has {self.inflight} requests in "
                                   f"flight (--max-inflight-requests {self.max_inflight}); "
                                   "retry later")
        self.inflight += len(seqs)
        self.metrics.inflight.set(self.inflight)
        try:
            # One sequence (the common case) needs no task or queue in between.
            merged = self._run(seqs[0]) if len(seqs) == 1 else self._merge(seqs)
            async with aclosing(merged):
                async for item in merged:
                    yield item
        finally:
            self.inflight -= len(seqs)
            self.metrics.inflight.set(self.inflight)
            for s in seqs:
                s.timer.finish(s.state.num_prompt_tokens if s.counts_prompt else 0,
                               s.state.output.finish_reason)

    async def _run(self, seq: Sequence) -> AsyncIterator[tuple[Sequence, str]]:
        async with aclosing(self.client.generate(seq.request)) as stream:
            async for out, _ in stream:
                delta, new_ids, stop_hit = seq.state.update(out)
                seq.timer.on_output(len(new_ids))
                yield seq, delta
                if stop_hit:  # leaving the `aclosing` block aborts it in the engine
                    return

    async def _merge(self, seqs: list[Sequence]) -> AsyncIterator[tuple[Sequence, str]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(seq: Sequence) -> None:
            try:
                async with aclosing(self._run(seq)) as outs:
                    async for item in outs:
                        queue.put_nowait(item)
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait(e)
                return
            queue.put_nowait(None)

        tasks = [asyncio.create_task(pump(s)) for s in seqs]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, seqs: list[Sequence]) -> None:
        async with aclosing(self.generate(seqs)) as outs:
            async for _ in outs:
                pass

    # ---- /v1/completions ------------------------------------------------------------------

    async def completions(self, body: oai.CompletionRequest, request_id: str,
                          http_request: web.Request) -> web.StreamResponse:
        name = self.check_model(body.model)
        params = body.sampling_params(body.max_tokens, body.logprobs)
        prompts = [encode_prompt(self.tokenizer, p) for p in body.prompts()]
        response_id = f"cmpl-{request_id}"
        seqs = self.sequences(f"{response_id}-{uuid.uuid4().hex[:8]}", prompts, params,
                              body.priority, "prompt", echo=body.echo)
        head = {"id": response_id, "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            return await stream_sse(http_request, self._completion_chunks(seqs, body, head))
        await self._drain(seqs)
        choices = [self._completion_choice(s, body) for s in seqs]
        return json_response({**head, "choices": choices, "usage": usage_of(seqs)})

    def _completion_choice(self, seq: Sequence, body: oai.CompletionRequest) -> dict[str, Any]:
        out = seq.state.output
        prefix = seq.prompt_text
        logprobs = None
        if body.logprobs is not None:
            logprobs = oai.completion_logprobs(out.logprobs, out.token_ids, body.logprobs,
                                               len(prefix))
        return {"index": out.index, "text": prefix + out.text, "logprobs": logprobs,
                "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}

    async def _completion_chunks(self, seqs: list[Sequence], body: oai.CompletionRequest,
                                 head: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async with aclosing(self.generate(seqs)) as outs:
            async for seq, delta in outs:
                if not seq.started:  # echo: the prompt comes first
                    seq.started = True
                    delta = seq.prompt_text + delta
                    seq.text_offset = len(seq.prompt_text)
                out = seq.state.output
                logprobs = None
                if body.logprobs is not None:
                    entries, ids = seq.new_logprobs()
                    logprobs = oai.completion_logprobs(entries, ids, body.logprobs,
                                                       seq.text_offset)
                    seq.text_offset += sum(len(t) for t in logprobs["tokens"])
                yield {**head, "choices": [{
                    "index": out.index, "text": delta, "logprobs": logprobs,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
        if body.include_usage:
            yield {**head, "choices": [], "usage": usage_of(seqs)}

    # ---- /v1/chat/completions -------------------------------------------------------------

    async def chat(self, body: oai.ChatCompletionRequest, request_id: str,
                   http_request: web.Request) -> web.StreamResponse:
        name = self.check_model(body.model)
        num_top = body.requested_logprobs()
        params = body.sampling_params(body.requested_max_tokens(), num_top)
        kwargs = dict(body.chat_template_kwargs or {})
        if body.tools is not None:
            kwargs["tools"] = body.tools
        ids = apply_chat_template(self.tokenizer, [m.for_template() for m in body.messages],
                                  add_generation_prompt=body.add_generation_prompt, **kwargs)
        response_id = f"chatcmpl-{request_id}"
        seqs = self.sequences(f"{response_id}-{uuid.uuid4().hex[:8]}", [(None, ids)], params,
                              body.priority, "messages")
        head = {"id": response_id, "created": int(time.time()), "model": name}
        if body.stream:
            return await stream_sse(http_request, self._chat_chunks(seqs, body, num_top, head))
        await self._drain(seqs)
        choices = []
        for seq in seqs:
            out = seq.state.output
            logprobs = None if num_top is None else oai.chat_logprobs(
                out.logprobs, out.token_ids, num_top)
            choices.append({"index": out.index,
                            "message": {"role": "assistant", "content": out.text},
                            "logprobs": logprobs, "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason})
        return json_response({**head, "object": "chat.completion", "choices": choices,
                              "usage": usage_of(seqs)})

    async def _chat_chunks(self, seqs: list[Sequence], body: oai.ChatCompletionRequest,
                           num_top: int | None, head: dict[str, Any]
                           ) -> AsyncIterator[dict[str, Any]]:
        head = {**head, "object": "chat.completion.chunk"}
        async with aclosing(self.generate(seqs)) as outs:
            async for seq, text in outs:
                delta: dict[str, Any] = {"content": text}
                if not seq.started:  # the first chunk of a choice names the role
                    seq.started = True
                    delta = {"role": "assistant", **delta}
                out = seq.state.output
                logprobs = None
                if num_top is not None:
                    logprobs = oai.chat_logprobs(*seq.new_logprobs(), num_top)
                yield {**head, "choices": [{
                    "index": out.index, "delta": delta, "logprobs": logprobs,
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}]}
        if body.include_usage:
            yield {**head, "choices": [], "usage": usage_of(seqs)}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def error_response(e: ZomniError) -> web.Response:
    return json_response(oai.error_body(e.message, e.type, e.status, e.param), e.status)


async def stream_sse(http_request: web.Request,
                     chunks: AsyncIterator[dict[str, Any]]) -> web.StreamResponse:
    """Send `chunks` as server-sent events, then `data: [DONE]`.

    The first chunk is awaited before the response starts, so an error the engine reports at
    once (429 queue full, 400 prompt too long for the KV cache) still gets its HTTP status.
    Later errors become an error event. A write to a closed connection ends the stream like a
    disconnect: leaving `aclosing` aborts the engine requests.
    """
    async with aclosing(chunks):
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = None
        except ZomniError as e:
            return error_response(e)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(http_request)
        try:
            if first is not None:
                await resp.write(b"data: " + _encode(first) + b"\n\n")
                try:
                    async for chunk in chunks:
                        await resp.write(b"data: " + _encode(chunk) + b"\n\n")
                except ZomniError as e:
                    error = oai.error_body(e.message, e.type, e.status, e.param)
                    await resp.write(b"data: " + _encode(error) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            logger.info("client went away mid-stream; aborting its requests")
    return resp
