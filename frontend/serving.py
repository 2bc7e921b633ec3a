"""From a decoded OpenAI request to engine requests and back: the generation endpoints.

    HTTP body ─► checks on the body alone (n, best_of, unsupported fields: no work yet)
    ─► prompts (chat template / tokenizer) ─► SamplingParams (the model's generation_config
    defaults where the request is silent) ─► Sequences (one per prompt × n, each an engine
    request with its RequestState) ─► generate(): every sequence's engine stream merged into
    one stream of (sequence, delta) (sequences.py) ─► a JSON response, or SSE chunks written
    as they come (completions.py, chat.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import msgspec
from aiohttp import web

from zomni.proto import (
    ContextLengthExceeded,
    EngineOverloaded,
    InvalidRequest,
    ModelInfo,
    ModelKind,
    SamplingParams,
    ZomniError,
)
from zomni.proto.client import AsyncEngineClient

from . import openai_protocol as oai
from .chat import chat_chunks, chat_response
from .completions import completion_chunks, completion_response
from .generation_config import diffusion_lm_defaults, generation_defaults
from .metrics import ModelMetrics, SequenceTimer
from .outputs import RequestState, child_requests
from .sequences import Item, Sequence, merge_sequences
from .tokenizer import apply_chat_template_async, encode_prompt_async

logger = logging.getLogger("zomni.frontend")

_encode = msgspec.json.Encoder().encode


class OpenAIServing:
    """The completions and chat endpoints over one engine client: an autoregressive LLM's, or
    a masked-diffusion LM's (the same requests and outputs; its diffusion fields checked and
    its unsupported options refused here, before any work)."""

    def __init__(self, client: AsyncEngineClient, tokenizer, info: ModelInfo,
                 model_names: list[str], metrics: ModelMetrics, max_inflight: int):
        self.client = client
        self.tokenizer = tokenizer
        self.info = info
        self.model_names = model_names
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.inflight = 0  # engine requests of this frontend not finished yet
        # The engine's path may not exist here (a remote engine): then the tokenizer's folder.
        self.defaults = generation_defaults(info.model, getattr(tokenizer, "name_or_path", None))

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return name or self.model_names[0]
        raise InvalidRequest(f"the model {name!r} does not exist; this server serves "
                             f"{', '.join(map(repr, self.model_names))}", param="model")

    # ---- requests in ----------------------------------------------------------------------

    def _defaults(self, body: oai._GenerationRequest) -> dict[str, Any]:
        """The model's sampling defaults this request takes (a masked-diffusion LM's: those
        its remasking honours)."""
        if self.info.kind != ModelKind.DLLM:
            return self.defaults
        return diffusion_lm_defaults(self.defaults,
                                     body.remasking or self.info.details.remasking)

    def _check_params(self, params: SamplingParams, name: str) -> None:
        """A masked-diffusion LM refuses what it cannot honour (the engine would too), before
        any work."""
        if self.info.kind == ModelKind.DLLM:
            params.check_diffusion_lm(repr(name))

    def _check_fanout(self, num_prompts: int, samples: int, samples_param: str) -> None:
        """A request of more sequences than may ever be in flight can never be served: a 400
        before its sequences are built (not a 429 "retry later")."""
        total = num_prompts * samples
        if total > self.max_inflight:
            raise InvalidRequest(
                f"this request asks for {total} sequences ({num_prompts} prompt(s) x "
                f"{samples_param}={samples}); this server runs at most {self.max_inflight} at "
                "once (--max-inflight-requests)",
                param=samples_param if samples > self.max_inflight else "prompt")

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
                  params: SamplingParams, priority: int, param: str, echo: bool = False,
                  prompt_only: bool = False, all_prompt_logprobs: bool = False
                  ) -> list[Sequence]:
        """Prompt i's n samples become choices i*n .. i*n+n-1, as OpenAI numbers them."""
        seqs = []
        for i, (text, ids) in enumerate(prompts):
            self._check_prompt(ids, params.max_tokens, param)
            prompt_text = "" if not echo else text if text is not None \
                else self.tokenizer.decode(ids)
            children = child_requests(f"{base_id}-{i}", ids, params, priority,
                                      all_prompt_logprobs=all_prompt_logprobs)
            for j, child in enumerate(children):
                state = RequestState(child.request_id, i * params.n + j, ids, child.sampling,
                                     self.tokenizer, self.info.details.eos_token_ids)
                seqs.append(Sequence(state, child, SequenceTimer(self.metrics), prompt_text,
                                     counts_prompt=j == 0, prompt_index=i,
                                     prompt_only=prompt_only))
        return seqs

    # ---- engine streams -------------------------------------------------------------------

    async def generate(self, seqs: list[Sequence]) -> AsyncIterator[Item]:
        """(sequence, delta) for every engine output of any of `seqs`, as they arrive."""
        if self.inflight + len(seqs) > self.max_inflight:
            raise EngineOverloaded(f"this frontend already has {self.inflight} requests in "
                                   f"flight (--max-inflight-requests {self.max_inflight}); "
                                   "retry later")
        self.inflight += len(seqs)
        self.metrics.inflight.set(self.inflight)
        try:
            async with aclosing(merge_sequences(self.client, seqs)) as merged:
                async for item in merged:
                    yield item
        finally:
            self.inflight -= len(seqs)
            self.metrics.inflight.set(self.inflight)
            for s in seqs:
                s.timer.finish(s.state.num_prompt_tokens if s.counts_prompt else 0,
                               s.state.output.finish_reason)

    async def _drain(self, seqs: list[Sequence]) -> None:
        async with aclosing(self.generate(seqs)) as outs:
            async for _ in outs:
                pass

    # ---- /v1/completions ------------------------------------------------------------------

    async def completions(self, body: oai.CompletionRequest, request_id: str,
                          http_request: web.Request) -> web.StreamResponse:
        name = self.check_model(body.model)
        body.check_fields()
        body.check_kind(self.info.kind, name)
        raw_prompts = body.prompts()
        self._check_fanout(len(raw_prompts), body.samples,
                           "best_of" if body.best_of else "n")
        params = body.completion_params(self.info.details.vocab_size, self._defaults(body))
        self._check_params(params, name)
        limit = self.info.details.max_model_len
        prompts = [await encode_prompt_async(self.tokenizer, p, limit) for p in raw_prompts]
        response_id = f"cmpl-{request_id}"
        # A stream sends each choice's prompt logprobs in its first chunk: every sample needs
        # them then, not only the first of its prompt.
        seqs = self.sequences(f"{response_id}-{uuid.uuid4().hex[:8]}", prompts, params,
                              body.priority, "prompt", echo=body.echo,
                              prompt_only=body.prompt_only, all_prompt_logprobs=body.stream)
        head = {"id": response_id, "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            return await stream_sse(http_request, completion_chunks(
                self.generate(seqs), seqs, body, head, self.tokenizer))
        await self._drain(seqs)
        return json_response(completion_response(seqs, body, head, self.tokenizer))

    # ---- /v1/chat/completions -------------------------------------------------------------

    async def chat(self, body: oai.ChatCompletionRequest, request_id: str,
                   http_request: web.Request) -> web.StreamResponse:
        name = self.check_model(body.model)
        body.check_fields()
        body.check_kind(self.info.kind, name)
        self._check_fanout(1, body.n, "n")
        num_top = body.requested_logprobs()
        params = body.sampling_params(self.info.details.vocab_size, self._defaults(body),
                                      body.requested_max_tokens(), num_top,
                                      prompt_logprobs=body.prompt_logprobs)
        self._check_params(params, name)
        ids = await apply_chat_template_async(
            self.tokenizer, [m.for_template() for m in body.messages],
            body.add_generation_prompt, body.chat_template_kwargs,
            self.info.details.max_model_len)
        response_id = f"chatcmpl-{request_id}"
        seqs = self.sequences(f"{response_id}-{uuid.uuid4().hex[:8]}", [(None, ids)], params,
                              body.priority, "messages")
        head = {"id": response_id, "created": int(time.time()), "model": name}
        if body.stream:
            return await stream_sse(http_request, chat_chunks(self.generate(seqs), seqs, body,
                                                              num_top, head))
        await self._drain(seqs)
        return json_response(chat_response(seqs, body, num_top, head))


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def error_response(e: ZomniError) -> web.Response:
    return json_response(oai.error_body(e.message, e.type, e.status, e.param), e.status)


async def stream_sse(http_request: web.Request, chunks: AsyncIterator[dict[str, Any]],
                     named_events: bool = False) -> web.StreamResponse:
    """Send `chunks` as server-sent events: `data: [DONE]` last (completions, chat), or with
    `named_events` an `event:` line per chunk naming its `type` and no [DONE] (OpenAI's image
    streams).

    The first chunk is awaited before the response starts, so an error the engine reports at
    once (429 queue full, 400 prompt too long for the KV cache) still gets its HTTP status.
    Later errors become an error event. A write to a closed connection ends the stream like a
    disconnect: leaving `aclosing` aborts the engine requests.
    """

    def event(chunk: dict[str, Any], name: str | None) -> bytes:
        head = f"event: {name}\n".encode() if named_events and name else b""
        return head + b"data: " + _encode(chunk) + b"\n\n"

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
                await resp.write(event(first, first.get("type")))
                try:
                    async for chunk in chunks:
                        await resp.write(event(chunk, chunk.get("type")))
                except ZomniError as e:
                    error = oai.error_body(e.message, e.type, e.status, e.param)
                    await resp.write(event(error, "error"))
            if not named_events:
                await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            logger.info("client went away mid-stream; aborting its requests")
    return resp
