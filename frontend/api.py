"""The Python API: `LLM` (offline, blocking) and `AsyncLLM` (streaming), shaped like vLLM's.

    with LLM(model="path/to/hf-model") as llm:
        outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
    with LLM(model="path/to/diffusers-pipeline") as llm:
        outs = llm.generate_images(["a red circle"], ImageParams(seed=0))
        outs[0].images[0].save("circle.png")

    with LLM(model="path/to/llada-or-dream") as llm:      # a masked-diffusion LM
        outs = llm.generate(["Hello"], SamplingParams(
            max_tokens=64, temperature=0, diffusion=DiffusionParams(cache="dual")))

Both start a real engine-core process (which starts the workers) and talk to it over ZMQ. The
model folder decides what they serve: an LLM or a masked-diffusion LM (`generate`, `chat`; its
tokenizer is loaded here) or an image model (`generate_images`; no tokenizer here, the workers
encode prompts). Calling the other kind's method is an `InvalidRequest`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from zomni.proto import (
    DiffusionParams,
    EngineDead,
    EngineRequest,
    ImageParams,
    ImageRequest,
    InvalidRequest,
    ModelKind,
    Ready,
    SamplingParams,
    Stats,
)
from zomni.proto.client import AsyncEngineClient, EngineClient, output_error
from zomni.proto.model_info import architecture_of, model_kind

from .generation_config import diffusion_lm_defaults, generation_defaults
from .images import (
    ImageGenerationOutput,
    image_requests,
    run_image_requests,
)
from .launch import EngineProcess, make_config
from .outputs import CompletionOutput, RequestOutput, RequestState, child_requests
from .tokenizer import (
    Prompt,
    apply_chat_template,
    encode_prompt,
    encode_prompt_async,
    load_tokenizer,
    off_loop,
)

__all__ = ["LLM", "AsyncLLM", "RequestOutput", "CompletionOutput", "SamplingParams",
           "DiffusionParams", "ImageParams", "ImageGenerationOutput"]
_KINDS = {ModelKind.AR: "an LLM", ModelKind.IMAGE: "an image model",
          ModelKind.DLLM: "a masked-diffusion LM"}
_METHODS = {ModelKind.AR: "generate() / chat()", ModelKind.IMAGE: "generate_images()",
            ModelKind.DLLM: "generate() / chat()"}
_TEXT_KINDS = (ModelKind.AR, ModelKind.DLLM)  # the kinds generate() and chat() serve


class _Base:
    """What LLM and AsyncLLM share: config, engine process, tokenizer, request fan-out."""

    online = False  # AsyncLLM: requests arrive over time (see EngineConfig.online)

    def __init__(self, model: str | None, tensor_parallel_size: int, dtype: str,
                 max_model_len: int | None, seed: int, kwargs: dict[str, Any]):
        self.config = make_config(model, self.online, tensor_parallel_size=tensor_parallel_size,
                                  dtype=dtype, max_model_len=max_model_len, seed=seed, **kwargs)
        self.kind = model_kind(self.config.model)
        # An image pipeline's tokenizers are the workers' business (they encode prompts).
        self.tokenizer = load_tokenizer(self.config.model) if self.kind in _TEXT_KINDS \
            else None
        # the model's sampling defaults (generation_config.json), for calls without params
        self.generation_defaults = generation_defaults(self.config.model) \
            if self.kind in _TEXT_KINDS else {}
        if self.kind == ModelKind.DLLM:
            self.generation_defaults = diffusion_lm_defaults(
                self.generation_defaults,
                architecture_of(self.config.model)[1].default_remasking)
        self.ready: Ready | None = None
        self.engine: EngineProcess | None = EngineProcess(self.config)

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without `SamplingParams` samples with: the library's defaults, less
        what the model's generation_config.json sets (vLLM's `--generation-config auto`)."""
        return SamplingParams(**self.generation_defaults)

    def _require(self, kind: ModelKind, method: str) -> None:
        """`kind` AR: a text method, which masked-diffusion LMs serve too."""
        if self.kind != kind and not (kind == ModelKind.AR and self.kind in _TEXT_KINDS):
            raise InvalidRequest(f"{method}() needs {_KINDS[kind]}; {self.config.model!r} is "
                                 f"{_KINDS[self.kind]}: use {_METHODS[self.kind]}",
                                 param="model")

    def _image_requests(self, prompts, class_labels, params, priority,
                        new_id) -> list[ImageRequest]:
        """Requests as the engine takes them; it checks them against the model."""
        self._require(ModelKind.IMAGE, "generate_images")
        return image_requests(prompts, class_labels, params, priority, new_id)

    def _states(self, children: list[EngineRequest]) -> list[RequestState]:
        eos = self.model_info.details.eos_token_ids
        return [RequestState(c.request_id, i, c.prompt_token_ids, c.sampling, self.tokenizer, eos)
                for i, c in enumerate(children)]

    def _chat_prompts(self, messages, chat_kwargs) -> list[dict[str, Any]]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return [{"prompt_token_ids": apply_chat_template(self.tokenizer, conv, **chat_kwargs)}
                for conv in conversations]


class LLM(_Base):
    """Offline generation: submit many prompts, get all results back."""

    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 **kwargs: Any):
        super().__init__(model, tensor_parallel_size, dtype, max_model_len, seed, kwargs)
        self.client = EngineClient(self.engine.address, alive=self.engine.alive)
        try:
            self.ready = self.client.connect(client_name="LLM")
            self.model_info = self.ready.model
        except BaseException:
            self.shutdown()
            raise

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: list[int] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order.

        A bad request raises its typed error after the others have finished.
        """
        self._require(ModelKind.AR, "generate")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise InvalidRequest("need one SamplingParams per prompt", param="sampling_params")
        results: list[RequestOutput] = []
        states: dict[str, tuple[RequestState, RequestOutput]] = {}
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            text, ids = encode_prompt(self.tokenizer, prompt)
            request_id = uuid.uuid4().hex
            children = child_requests(request_id, ids, sp, priority[i] if priority else 0)
            child_states = self._states(children)
            results.append(RequestOutput(request_id, text, ids, [s.output for s in child_states]))
            for child, state in zip(children, child_states):
                states[child.request_id] = (state, results[-1])
                self.client.add_request(child)
        self._run(states, use_tqdm)
        return results

    def _run(self, states: dict[str, tuple[RequestState, RequestOutput]],
             use_tqdm: bool) -> None:
        """The only loop over engine outputs: fold each into its request until all finish."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(states), desc="Generating", disable=not use_tqdm or len(states) < 2)
        remaining, error = len(states), None
        while remaining:
            got = self.client.recv(timeout_ms=1000)
            if got is None:
                continue
            for out in getattr(got[1], "outputs", ()):
                state, result = states.get(out.request_id, (None, None))
                if state is None or state.finished:
                    continue
                if (err := output_error(out)) is not None:
                    error, state.output.finish_reason = err, "error"
                elif state.update(out).stop_hit:  # a stop string ended it: stop the engine
                    self.client.abort([state.request_id])
                result.num_cached_tokens = state.num_cached_tokens
                if state.prompt_logprobs is not None:  # child 0's, the only one asking
                    result.prompt_logprobs = state.prompt_logprobs
                if state.finished:
                    remaining -= 1
                    bar.update(1)
                    result.finished = all(o.finish_reason for o in result.outputs)
        bar.close()
        if error is not None:
            raise error

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, **chat_template_kwargs: Any
             ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the chat template."""
        self._require(ModelKind.AR, "chat")
        prompts = self._chat_prompts(messages, dict(chat_template_kwargs,
                                                    add_generation_prompt=add_generation_prompt))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate_images(self, prompts: str | Sequence[str] | None = None,
                        params: ImageParams | Sequence[ImageParams] | None = None, *,
                        class_labels: Sequence[int] | Sequence[Sequence[int]] | None = None,
                        use_tqdm: bool = True, priority: int | Sequence[int] | None = None
                        ) -> list[ImageGenerationOutput]:
        """Generate images for every prompt (text-conditioned models) or every list of class
        labels (class-conditional ones: `class_labels=[1, 3]` is one request, as diffusers'
        `DiTPipeline(class_labels=[1, 3])`; `[[1], [3]]` two). Outputs come back in request
        order, each with its `images` (PIL); all requests are batched together by the engine.

        A request the model cannot serve raises `InvalidRequest` before any is sent; an error
        from the engine is raised after the others have finished.
        """
        requests = self._image_requests(prompts, class_labels, params, priority,
                                        lambda: uuid.uuid4().hex)
        return run_image_requests(self.client, requests, use_tqdm)

    def get_tokenizer(self):
        """The LLM's tokenizer (None for an image model)."""
        return self.tokenizer

    def get_stats(self) -> Stats:
        """Queue sizes, KV usage, prefix-cache hit rate, preemptions and token rates."""
        return self.client.get_stats()

    def shutdown(self) -> None:
        """Stop the engine core and its workers; safe to call twice."""
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()


class AsyncLLM(_Base):
    """Streaming generation on asyncio: `async for out in llm.generate(...)`."""

    online = True

    def __init__(self, model: str | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None, seed: int = 0,
                 **kwargs: Any):
        super().__init__(model, tensor_parallel_size, dtype, max_model_len, seed, kwargs)
        self.client: AsyncEngineClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._children: dict[str, list[str]] = {}

    async def start(self) -> None:
        """Connect to the engine (waits until it is ready); generate() calls it as needed."""
        if self.client is not None:
            return
        if self.engine is None:
            raise EngineDead("this AsyncLLM was shut down")
        self._connect_lock = self._connect_lock or asyncio.Lock()
        async with self._connect_lock:
            if self.client is None:
                client = AsyncEngineClient(self.engine.address, alive=self.engine.alive)
                self.ready = await client.connect(client_name="AsyncLLM")
                self.model_info = self.ready.model
                self.client = client

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0
                       ) -> AsyncIterator[RequestOutput]:
        """Yield a cumulative `RequestOutput` each time any of its samples gets new tokens."""
        self._require(ModelKind.AR, "generate")
        await self.start()
        params = sampling_params or self.get_default_sampling_params()
        request_id = request_id or uuid.uuid4().hex
        text, ids = await encode_prompt_async(self.tokenizer, prompt)  # off the event loop
        children = child_requests(request_id, ids, params, priority)
        states = self._states(children)
        result = RequestOutput(request_id, text, ids, [s.output for s in states])
        self._children[request_id] = [c.request_id for c in children]
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(c, s, queue)) for c, s in zip(children, states)]
        try:
            remaining, num_finished = len(tasks), 0
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    remaining -= 1
                    continue
                state, delta = item
                result.num_cached_tokens = state.num_cached_tokens
                if state.prompt_logprobs is not None:  # child 0's, the only one asking
                    result.prompt_logprobs = state.prompt_logprobs
                # Counted from the deltas, not the states (a pump may have folded a later
                # output already): `finished` is True on the last output yielded, once.
                num_finished += delta.finish_reason is not None
                result.finished = num_finished == len(states)
                yield result
        finally:
            self._children.pop(request_id, None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _pump(self, child: EngineRequest, state: RequestState, queue: asyncio.Queue):
        try:
            stream = self.client.generate(child)
            async for out, _ in stream:
                delta = state.update(out)
                queue.put_nowait((state, delta))
                if delta.stop_hit:
                    await stream.aclose()  # aborts the request in the engine
                    break
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            queue.put_nowait(e)

    async def generate_images(self, prompt: str | None = None,
                              params: ImageParams | None = None, *,
                              class_labels: Sequence[int] | None = None,
                              request_id: str | None = None, priority: int = 0
                              ) -> ImageGenerationOutput:
        """The images of one request (`params.n` of them, or n per class label), returned once
        all are done, with any partial images it asked for. Cancelling the awaiting task, or
        `abort(request_id)`, aborts the request in the engine."""
        async with contextlib.aclosing(self.stream_images(
                prompt, params, class_labels=class_labels, request_id=request_id,
                priority=priority)) as stream:
            async for result in stream:  # noqa: B007 (the last one is the answer)
                pass
        return result

    async def stream_images(self, prompt: str | None = None,
                            params: ImageParams | None = None, *,
                            class_labels: Sequence[int] | None = None,
                            request_id: str | None = None, priority: int = 0
                            ) -> AsyncIterator[ImageGenerationOutput]:
        """One request's output as it grows: once per partial image (`params.partial_images`,
        newest last in `partial_images`), then finished with its images. Leaving the loop
        early aborts the request."""
        self._require(ModelKind.IMAGE, "generate_images")
        await self.start()
        if prompt is not None and not isinstance(prompt, str):
            raise InvalidRequest("AsyncLLM.generate_images takes one prompt; send several "
                                 "requests concurrently to batch them", param="prompt")
        if class_labels is not None and not all(isinstance(c, int) for c in class_labels):
            raise InvalidRequest("class_labels must be a list of integers", param="class_labels")
        [request] = self._image_requests(prompt, class_labels, params, priority,
                                         lambda: request_id or uuid.uuid4().hex)
        result = ImageGenerationOutput(request.request_id, request.prompt, request.class_labels)
        async with contextlib.aclosing(self.client.generate(request)) as stream:
            async for out, frames in stream:
                result.add(out, frames)
                yield result

    async def abort(self, request_id: str) -> None:
        if self.client is not None:
            await self.client.abort(self._children.get(request_id, [request_id]))

    async def chat(self, messages: list[dict[str, Any]],
                   sampling_params: SamplingParams | None = None,
                   request_id: str | None = None, **chat_template_kwargs: Any
                   ) -> AsyncIterator[RequestOutput]:
        self._require(ModelKind.AR, "chat")
        prompts = await off_loop(self._chat_prompts, messages, chat_template_kwargs)
        async for out in self.generate(prompts[0], sampling_params, request_id):
            yield out

    def shutdown(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def __aenter__(self) -> AsyncLLM:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
