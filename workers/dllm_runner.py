"""DiffusionLMRunner: executes one DLLM step plan (`DiffusionLMSchedulerOutput`) on this rank.

The worker decides nothing but what the decoding rule decides. Per step, in this order:

    (a) drop finished requests (stopped early, aborted): their state goes; their KV blocks
        are the engine core's again already
    (b) admit new requests: the prompt followed by gen_length mask tokens, the decoding
        parameters the engine core resolved, a generator seeded with the request's seed, and
        (with a KV cache) a `PagedKV` over the blocks the plan gives it
    (c) ONE denoising step of every scheduled request, each at its own block and step, in one
        batched forward (`dllm_step.denoise_step`)
    (d) each request whose current block the step completed reports that block's tokens;
        requests with no block left are dropped

Rank 0 returns the `DiffusionLMRunnerOutput`; the others return None. Every rank runs the same
steps with the same seeds on the same (all-gathered) logits, so their choices agree under
tensor parallelism.

The paged KV cache holds the K/V of requests decoding with a cache (Fast-dLLM's "prefix" /
"dual"); requests without one recompute every K/V each step and hold no blocks:

    kv_cache: [2 (K, V), num_layers, kv_heads_per_rank, num_blocks, block_size, head_dim]
"""

from __future__ import annotations

import time

import torch

from zomni.proto import (
    DiffusionLMRequestData,
    DiffusionLMRunnerInfo,
    DiffusionLMRunnerOutput,
    DiffusionLMSchedulerOutput,
    WorkerConfig,
)
from zomni.workers.device import default_block_size, kv_cache_blocks, setup_rank, zeros
from zomni.workers.dllm_attention import PagedKV
from zomni.workers.dllm_decoding import DecodingParams, DiffusionLMState
from zomni.workers.dllm_step import DiffusionLMRequest, denoise_step
from zomni.workers.loader import load_model
from zomni.workers.runner import planned_state


class DiffusionLMRunner:
    def __init__(self, config: WorkerConfig):
        engine = config.engine
        self.rank = config.rank
        self.device, self.dtype, self.torch_dtype = setup_rank(config)
        start = time.perf_counter()
        self.model, self.model_config = load_model(engine.model, self.torch_dtype, self.device)
        self.load_time_s = time.perf_counter() - start
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # CPU: repacked weights (see cpu_gemm). They gain most on the few rows of a cached
        # step (a block of 32 positions per request); a refresh runs whole sequences.
        for module in self.model.modules():
            if hasattr(module, "pack"):
                module.pack(batch_hint=256)
        self.block_size = engine.block_size or default_block_size(self.device.type)
        attn = self.model.parts()[1][0].attention()
        per_block = (2 * self.model_config.num_hidden_layers * attn.num_kv_heads
                     * self.block_size * attn.head_dim
                     * torch.empty(0, dtype=self.torch_dtype).element_size())
        self.num_kv_blocks = kv_cache_blocks(engine.num_kv_blocks, engine.kv_cache_memory_gb,
                                             per_block)
        self.kv_cache = zeros((2, self.model_config.num_hidden_layers, attn.num_kv_heads,
                               self.num_kv_blocks, self.block_size, attn.head_dim),
                              self.torch_dtype, self.device)
        self.requests: dict[str, DiffusionLMRequest] = {}

    def runner_info(self) -> DiffusionLMRunnerInfo:
        """What this rank resolved, for WORKER_READY."""
        return DiffusionLMRunnerInfo(num_kv_blocks=self.num_kv_blocks,
                                     block_size=self.block_size)

    # ---- one step ------------------------------------------------------------------------

    def execute(self, plan: DiffusionLMSchedulerOutput
                ) -> tuple[DiffusionLMRunnerOutput, list] | None:
        """The runner interface (`runner.py`): the result and its extra frames (none)."""
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for data in plan.new_requests:
            if data.request_id in self.requests:
                raise ValueError(f"step plan admits request {data.request_id!r} twice")
            self.requests[data.request_id] = self._admit(data)
        scheduled = [self._get(request_id) for request_id in plan.scheduled_request_ids]
        completed = denoise_step(self.model, scheduled) if scheduled else []
        request_ids, blocks = [], []
        for request_id, request, done in zip(plan.scheduled_request_ids, scheduled, completed):
            if done:  # the block before the current one is the one just committed
                state = request.state
                request_ids.append(request_id)
                blocks.append(state.block_token_ids(state.num_committed_blocks - 1))
            if request.state.done:
                del self.requests[request_id]
        if self.rank != 0:
            return None
        return DiffusionLMRunnerOutput(plan.step_id, request_ids, blocks), []

    def _admit(self, data: DiffusionLMRequestData) -> DiffusionLMRequest:
        params = DecodingParams.from_request(data.sampling, data.gen_length)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(data.sampling.seed)
        state = DiffusionLMState(data.prompt_token_ids, params, self.model_config.mask_token_id,
                                 self.model.logits_shift, generator)
        request = DiffusionLMRequest(state)
        if params.cache != "none":
            need = -(-state.length // self.block_size)
            bad = [b for b in data.block_ids if not 0 <= b < self.num_kv_blocks]
            if len(data.block_ids) != need or bad:
                raise ValueError(f"request {data.request_id!r}: {len(data.block_ids)} KV blocks "
                                 f"(out of range: {bad[:4]}) for {state.length} positions in "
                                 f"blocks of {self.block_size}")
            block_ids = torch.tensor(data.block_ids, dtype=torch.long, device=self.device)
            request.kv = [PagedKV(self.kv_cache, block_ids, state.length)]
        return request

    def _get(self, request_id: str) -> DiffusionLMRequest:
        request = planned_state(self.requests, request_id)
        if request.state.done:
            raise ValueError(f"request {request_id!r} has no block left")
        return request
