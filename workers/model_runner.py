"""ModelRunner: executes one step plan (`SchedulerOutput`) on this rank's model and KV cache.

The worker decides nothing. Per step, in this order:

    (a) drop finished (and preempted) requests
    (b) add new requests (an existing id is replaced)
    (c) cached requests: extend block tables, take num_computed_tokens from the plan
    (d) flatten token_ids[num_computed : num_computed + n] of every scheduled request, plan order
    (e) one forward over the flat batch (prefill chunks and decodes mixed)
    (f) requests whose tokens now all have KV sample one token (LM head on those rows only);
        the token is appended to the worker's copy of token_ids, num_computed advances by n
    (g) requests that asked for `prompt_logprobs` get the LM head on their prompt rows of this
        step too, a slice of rows at a time (a [rows, vocab] block, never [T, vocab]); the
        others pay nothing

Rank 0 samples and returns the `ModelRunnerOutput`; under tensor parallelism the sampled ids are
broadcast so every rank's token_ids stay identical, and other ranks return None.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from zomni.proto import (
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
    TokenRunnerInfo,
    WorkerConfig,
)
from zomni.proto.model_info import read_model_info
from zomni.workers import native
from zomni.workers.context import AttentionMetadata, build_attention_metadata, set_context
from zomni.workers.device import (
    default_block_size,
    default_max_num_batched_tokens,
    kv_cache_blocks,
    populate,
    setup_rank,
    zeros,
)
from zomni.workers.loader import load_model
from zomni.workers.parallel_state import broadcast
from zomni.workers.runner import planned_state
from zomni.workers.sampler import Sampler, SamplingMetadata, prompt_logprobs

logger = logging.getLogger("zomni.worker")

# Prompt logprobs: logits are computed for at most this many elements (rows x vocab) at once,
# 64 MiB in fp32, so a long prompt chunk never holds a [T, vocab] block.
_PROMPT_LOGITS_ELEMENTS = 2**24


@dataclass
class RequestState:
    request_id: str
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None  # only for seeded requests


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the flat batch that sample
    sampling_requests: list[RequestState]  # [S], plan order
    prompt_chunks: list[PromptChunk]  # requests that want logprobs of prompt positions


@dataclass
class PromptChunk:
    """Rows `first_row ...` of the flat batch are prompt positions c, c+1, ... of a request
    that asked for prompt logprobs; row i's logits score `target_ids[i]`, prompt token c+1+i.
    The prompt's last position is not among them: its logits sample the first output token."""

    request_id: str
    first_row: int
    target_ids: list[int]
    num_logprobs: int


class ModelRunner:
    def __init__(self, config: WorkerConfig):
        engine = config.engine
        self.rank = config.rank
        self.device, self.dtype, self.torch_dtype = setup_rank(config)
        if self.device.type == "cpu" and self.dtype == "float32":  # built now, not mid-step
            logger.info("rank %d: native paged attention %s", self.rank,
                        "on" if native.has_paged_attention() else "off")
        self.max_num_batched_tokens = engine.max_num_batched_tokens or \
            default_max_num_batched_tokens(self.device.type, engine.online)

        start = time.perf_counter()
        self.model, self.hf_config = load_model(engine.model, self.torch_dtype, self.device)
        self.load_time_s = time.perf_counter() - start
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for module in self.model.modules():  # CPU: repacked weights (see cpu_gemm)
            if hasattr(module, "pack"):
                module.pack(batch_hint=engine.max_num_seqs)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = read_model_info(engine.model).details.eos_token_ids

        self.block_size = engine.block_size or default_block_size(self.device.type)
        self.num_kv_blocks = kv_cache_blocks(engine.num_kv_blocks, engine.kv_cache_memory_gb,
                                             self._bytes_per_block())
        self._allocate_kv_cache()
        self.sampler = Sampler(engine.seed, self.device)
        self._warm_up(min(self.max_num_batched_tokens, self.num_kv_blocks * self.block_size,
                          getattr(self.hf_config, "max_position_embeddings", 2**31)))
        self.requests: dict[str, RequestState] = {}
        self.prompt_logits_rows = max(1, _PROMPT_LOGITS_ELEMENTS // self.vocab_size)

    # ---- setup ---------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        per_layer = 2 * self.block_size * layers[0].num_kv_heads * layers[0].head_dim
        return per_layer * len(layers) * torch.empty(0, dtype=self.torch_dtype).element_size()

    def _allocate_kv_cache(self) -> None:
        """One tensor for all layers; each Attention module gets views of its K and V.

            kv_cache: [2 (K, V), num_layers, num_blocks, num_kv_heads, block_size, head_dim]

        Zeroed once: padded reads of never-written slots are masked, but must not be NaN.
        """
        layers = self.model.attention_layers()
        self.kv_cache = zeros((2, len(layers), self.num_kv_blocks, layers[0].num_kv_heads,
                                self.block_size, layers[0].head_dim), self.torch_dtype,
                               self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self._populating = populate(self.kv_cache) if self.device.type == "cpu" else None

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One forward of a full-budget dummy prompt before READY, so that oneDNN creates its
        kernels and malloc grows its heap now rather than in the first requests' step (that
        step took ~1.5x a later one). It writes blocks no request owns yet."""
        blocks = list(range(-(-num_tokens // self.block_size)))
        attn = build_attention_metadata([num_tokens], [0], [blocks], self.block_size,
                                        self.device)
        set_context(attn)
        try:
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
                                attn.positions)
            self.model.compute_logits(hidden[-1:])
        finally:
            set_context(None)

    def runner_info(self) -> TokenRunnerInfo:
        """What this rank resolved, for WORKER_READY."""
        return TokenRunnerInfo(num_kv_blocks=self.num_kv_blocks, block_size=self.block_size,
                               max_num_batched_tokens=self.max_num_batched_tokens)

    # ---- one step ------------------------------------------------------------------------

    def execute(self, plan: SchedulerOutput) -> tuple[ModelRunnerOutput, list] | None:
        """The runner interface (`runner.py`): the result and its extra frames (none here)."""
        output = self.execute_model(plan)
        return None if output is None else (output, [])


    @torch.inference_mode()
    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput | None:
        if self._populating is not None:
            self._populating.join()
            self._populating = None
        self._update_states(plan)
        if not plan.num_scheduled_tokens:
            return ModelRunnerOutput(plan.step_id, [], []) if self.rank == 0 else None
        inputs = self._prepare_inputs(plan)
        set_context(inputs.attn)
        try:
            hidden = self.model(inputs.input_ids, inputs.attn.positions)
            logits = None
            if inputs.sampling_requests:  # same on every rank: the head all-gathers logits
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
        finally:
            set_context(None)
        prompt_lps = self._prompt_logprobs(hidden, inputs.prompt_chunks)
        sampled, logprobs = self._sample(logits, inputs.sampling_requests)

        for request_id, n in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += n
        for req, token in zip(inputs.sampling_requests, sampled):
            req.token_ids.append(token)
        if self.rank != 0:
            return None
        return ModelRunnerOutput(plan.step_id,
                                 [r.request_id for r in inputs.sampling_requests],
                                 sampled, logprobs, prompt_lps or None)

    def _update_states(self, plan: SchedulerOutput) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self._check_blocks(new.request_id, new.block_ids)
            token_ids = list(new.token_ids)
            num_prompt = new.num_prompt_tokens or len(token_ids)
            self.requests[new.request_id] = RequestState(
                request_id=new.request_id, token_ids=token_ids, num_prompt_tokens=num_prompt,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                sampling=new.sampling,
                generator=self._new_generator(new.sampling, len(token_ids) - num_prompt))
        for cached in plan.cached_requests:
            req = self._get(cached.request_id)
            self._check_blocks(cached.request_id, cached.new_block_ids)
            req.block_ids.extend(cached.new_block_ids)
            req.num_computed_tokens = cached.num_computed_tokens

    def _new_generator(self, sampling: SamplingParams, num_output_tokens: int):
        """A generator per seeded request, advanced past the draws of tokens it already made
        (a preempted request comes back as new), so its samples stay those of its seed."""
        if sampling.seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed)
        if not sampling.greedy:
            for _ in range(num_output_tokens):  # one draw of vocab_size per sampled token
                torch.empty(self.vocab_size, device=self.device).exponential_(generator=generator)
        return generator

    def _get(self, request_id: str) -> RequestState:
        return planned_state(self.requests, request_id)

    def _check_blocks(self, request_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_kv_blocks]
        if bad:
            raise ValueError(f"request {request_id!r}: block ids {bad[:4]} outside "
                             f"[0, {self.num_kv_blocks})")

    def _prepare_inputs(self, plan: SchedulerOutput) -> StepInputs:
        input_ids: list[int] = []
        query_lens, starts, tables = [], [], []
        logits_indices: list[int] = []
        sampling_requests: list[RequestState] = []
        prompt_chunks: list[PromptChunk] = []
        for request_id, n in plan.num_scheduled_tokens.items():
            req = self._get(request_id)
            start = req.num_computed_tokens
            if n < 1 or start + n > len(req.token_ids):
                raise ValueError(f"request {request_id!r}: {n} tokens scheduled from "
                                 f"{start}, but it has {len(req.token_ids)} tokens")
            if req.sampling.prompt_logprobs is not None:
                # positions whose next token is a prompt token: [start, num_prompt - 1)
                end = min(start + n, req.num_prompt_tokens - 1)
                if end > start:
                    prompt_chunks.append(PromptChunk(request_id, len(input_ids),
                                                     req.token_ids[start + 1:end + 1],
                                                     req.sampling.prompt_logprobs))
            input_ids.extend(req.token_ids[start:start + n])
            query_lens.append(n)
            starts.append(start)
            tables.append(req.block_ids)
            if start + n == len(req.token_ids):  # a partial prefill chunk does not sample
                logits_indices.append(len(input_ids) - 1)
                sampling_requests.append(req)
        attn = build_attention_metadata(query_lens, starts, tables, self.block_size, self.device)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            attn=attn,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=self.device),
            sampling_requests=sampling_requests, prompt_chunks=prompt_chunks)

    def _prompt_logprobs(self, hidden: torch.Tensor, chunks: list[PromptChunk]
                         ) -> dict[str, list[TokenLogprobs]]:
        """Logprobs of this step's prompt positions, per request that asked (rank 0; other
        ranks run the LM head too, for its all-gather, and return {})."""
        out: dict[str, list[TokenLogprobs]] = {}
        step = self.prompt_logits_rows
        for chunk in chunks:
            found: list[TokenLogprobs] = []
            for lo in range(0, len(chunk.target_ids), step):
                targets = chunk.target_ids[lo:lo + step]
                first = chunk.first_row + lo
                logits = self.model.compute_logits(hidden[first:first + len(targets)])
                if self.rank == 0:
                    found += prompt_logprobs(logits, torch.tensor(targets, device=self.device),
                                             chunk.num_logprobs)
            if self.rank == 0:
                out[chunk.request_id] = found
        return out

    def _sample(self, logits: torch.Tensor | None, requests: list[RequestState]
                ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """(sampled ids, logprobs) on rank 0; the ids are broadcast to the other ranks."""
        if not requests:
            return [], None
        logprobs = None
        if self.rank == 0:
            meta = SamplingMetadata(params=[r.sampling for r in requests],
                                    generators=[r.generator for r in requests],
                                    token_ids=[r.token_ids for r in requests],
                                    num_prompt_tokens=[r.num_prompt_tokens for r in requests],
                                    eos_token_ids=self.eos_token_ids)
            out = self.sampler(logits, meta)
            sampled, logprobs = out.sampled_token_ids, out.logprobs
        else:
            sampled = torch.empty(len(requests), dtype=torch.int64, device=self.device)
        return broadcast(sampled, src=0).tolist(), logprobs
