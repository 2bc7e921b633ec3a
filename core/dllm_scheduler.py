"""`DiffusionLMScheduler`: continuous batching of masked-diffusion LM requests (LLaDA, Dream).

One rule, as for tokens and images: each request's `num_committed_blocks` catches up with its
`num_blocks`. Every engine step runs ONE denoising step for every running request, each at its
own block and its own step within the block; the workers decide which masked positions a step
commits, and report a block's tokens once its last masked position is committed. A request
that arrives while a step runs joins at the next step.

    waiting ──admit: KV blocks for its whole sequence──► running ──► finished: its last block,
       │                                                  │          a stop token, max_tokens
       └──────────────── abort ─────────────────────────┴──► finished (KV blocks freed now)

    step k:    r1 (block 2/4, step 5/8)   r2 (block 0/1, step 30/32)   r3 (block 0/2, step 0)
    step k+1:  r1 (block 2, step 6)       r2 commits block 0: done     r3 (block 0, step 1)

Invariants:
- A request's sequence has one length for its whole life: prompt + `gen_length` (max_tokens
  rounded up to whole blocks). A request that decodes with a KV cache ("prefix" / "dual")
  holds paged KV blocks for all of it from admission to its end, so nothing grows and nothing
  is preempted: a request waits until its blocks are free (no overtaking). One without a
  cache computes every K/V each step and holds none; `max_num_seqs` bounds the batch.
- Plans go out one at a time (`max_plans_in_flight = 1`): whether a request takes another
  step depends on the last one (a threshold block ends when its confidences allow, and a
  committed stop token ends the request), and a step, one forward over whole sequences,
  dwarfs the engine's own millisecond.
- A request id is in a plan's `finished_request_ids` exactly when the workers hold its state
  and must drop it: it stopped before its last block, or was aborted while running. A request
  whose last block a step commits is dropped by the workers themselves.
- Outputs are committed blocks only: text a later step could change is never sent. At most
  `max_tokens` tokens go out, cut after the first stop token (EOS unless `ignore_eos`, or a
  `stop_token_ids` hit, once `min_tokens` are out); the request then ends at once.

No KV is shared across requests (the KV cache manager runs without its prefix cache). In a
bidirectional model the K/V of a prompt position depends on every position of the sequence,
the masked answer included: two requests with a common prompt prefix, or the same prompt and
another max_tokens, compute different K/V for it, so AR-style prefix reuse would change their
answers. Reuse is exact only between sequences identical as a whole (the same prompt and
length, and the same committed blocks), which holds for the first refresh of block 0 alone
(n samples of one prompt): one forward of a request's many, and it would need copy-on-write
at the next refresh; not worth a second block-table mechanism.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from zomni.proto import (
    DiffusionLMModelInfo,
    DiffusionLMRequestData,
    DiffusionLMRunnerInfo,
    DiffusionLMRunnerOutput,
    DiffusionLMSchedulerOutput,
    DiffusionLMStats,
    EngineConfig,
    EngineOutput,
    EngineRequest,
    FinishReason,
    InvalidRequest,
    SamplingParams,
    ZomniError,
)
from zomni.proto.diffusion import resolve_diffusion

from .kv_cache_manager import KVCacheManager
from .request import RequestStatus
from .request_queue import RequestQueue
from .scheduler_common import RecentRate, check_can_queue, take_out
from .scheduler_interface import Outputs
from .token_scheduler import engine_error_output, is_stop_token  # the AR rules


@dataclass(eq=False)
class DLLMRequest:
    """One masked-diffusion request as the scheduler tracks it (never on the wire)."""

    request_id: str
    client_id: bytes  # ZMQ identity of the frontend that sent it
    prompt_token_ids: list[int]
    sampling: SamplingParams  # resolved: `diffusion` complete, `max_tokens` and `seed` set
    gen_length: int
    priority: int = 0
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_committed_blocks: int = 0
    status: RequestStatus = RequestStatus.WAITING

    # what the KV cache manager reads: no position has K/V before admission
    num_computed_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.sampling.diffusion.block_length

    @property
    def num_positions(self) -> int:
        return len(self.prompt_token_ids) + self.gen_length

    @property
    def uses_kv_cache(self) -> bool:
        return self.sampling.diffusion.cache != "none"

    def data(self, block_ids: list[int]) -> DiffusionLMRequestData:
        return DiffusionLMRequestData(self.request_id, self.prompt_token_ids, self.sampling,
                                      self.gen_length, block_ids)


class DiffusionLMScheduler:
    def __init__(self, config: EngineConfig, model: DiffusionLMModelInfo,
                 runner: DiffusionLMRunnerInfo):
        self.config = config
        self.model = model
        self.max_plans_in_flight = 1  # see the module docstring
        self.block_size = runner.block_size
        self.kv_cache_manager = KVCacheManager(runner.num_kv_blocks, runner.block_size,
                                               enable_prefix_caching=False)
        self.eos_token_ids = frozenset(model.eos_token_ids)
        self.requests: dict[str, DLLMRequest] = {}  # every unfinished request
        self.waiting = RequestQueue()
        self.running: list[DLLMRequest] = []  # admission order
        self.finished_req_ids: list[str] = []  # for the next plan's finished_request_ids
        self.step_id = 0
        self._seeds = random.Random(config.seed)  # for requests that bring no seed
        self._generated = RecentRate()  # committed output tokens
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.denoising_steps_total = 0

    # ---- requests in and out --------------------------------------------------------------

    def add_request(self, request: EngineRequest, client_id: bytes) -> None:
        if not isinstance(request, EngineRequest):
            raise InvalidRequest("this engine serves a masked-diffusion LM: send an "
                                 "EngineRequest (token ids and SamplingParams)", param="model")
        check_can_queue(request.request_id, self.requests, self.waiting,
                        self.config.max_waiting_requests)
        req = self._from_wire(request, client_id)
        kv = self.kv_cache_manager
        num_blocks = -(-req.num_positions // self.block_size)
        if req.uses_kv_cache and num_blocks > kv.num_blocks:
            raise InvalidRequest(
                f"with cache {req.sampling.diffusion.cache!r} the request's "
                f"{req.num_positions} positions need {num_blocks} KV blocks of "
                f"{self.block_size}; this engine has {kv.num_blocks}: lower max_tokens, or "
                'send cache "none"', param="max_tokens")
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def _from_wire(self, req: EngineRequest, client_id: bytes) -> DLLMRequest:
        """What only the engine can check (the vocabulary, the mask token, the model's
        defaults), then the runtime request with every default resolved."""
        m, sampling, prompt = self.model, req.sampling, req.prompt_token_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if not (min(prompt) >= 0 and max(prompt) < m.vocab_size):
            raise InvalidRequest(f"prompt token ids must be in [0, {m.vocab_size})",
                                 param="prompt")
        if m.mask_token_id in prompt:
            raise InvalidRequest(f"the prompt holds the mask token ({m.mask_token_id}), which "
                                 "marks the positions still to decode", param="prompt")
        sampling.check_diffusion_lm()
        if sampling.n != 1:
            raise InvalidRequest("the engine serves n=1 requests; the client fans out n > 1",
                                 param="n")
        sampling, gen_length = resolve_diffusion(sampling, len(prompt), m.max_model_len,
                                                 m.remasking, m.block_length)
        if sampling.seed is None:  # every rank must draw the same numbers
            sampling.seed = self._seeds.randrange(2**63)
        return DLLMRequest(req.request_id, client_id, list(prompt), sampling, gen_length,
                           req.priority, req.arrival_time or time.time())

    def abort_requests(self, request_ids: Sequence[str]) -> Outputs:
        outputs: Outputs = defaultdict(list)
        for request in take_out(request_ids, self.requests, self.running, self.waiting):
            first = not request.output_token_ids
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            output = EngineOutput(request.request_id, [], FinishReason.ABORT,
                                  num_prompt_tokens=len(request.prompt_token_ids) if first else 0)
            self.prompt_tokens_total += output.num_prompt_tokens
            outputs[request.client_id].append(output)
        return dict(outputs)

    def error_output(self, request_id: str, error: ZomniError) -> EngineOutput:
        return engine_error_output(request_id, error)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_stats(self) -> DiffusionLMStats:
        kv = self.kv_cache_manager
        return DiffusionLMStats(
            num_waiting=len(self.waiting), num_running=len(self.running), kv_usage=kv.usage,
            num_kv_blocks=kv.num_blocks, generation_tokens_per_s=self._generated.per_s(),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            denoising_steps_total=self.denoising_steps_total)

    # ---- schedule -------------------------------------------------------------------------

    def schedule(self) -> DiffusionLMSchedulerOutput | None:
        """Admit what fits, then one denoising step for every running request."""
        new_requests = self._admit()
        if not (self.running or self.finished_req_ids):
            return None
        self.step_id += 1
        finished, self.finished_req_ids = self.finished_req_ids, []
        return DiffusionLMSchedulerOutput(
            step_id=self.step_id, new_requests=new_requests,
            scheduled_request_ids=[r.request_id for r in self.running],
            finished_request_ids=finished)

    def _admit(self) -> list[DiffusionLMRequestData]:
        """Waiting requests in (priority, arrival) order while they fit: `max_num_seqs`, and
        KV blocks for the whole sequence of one that decodes with a cache. The head waits
        when it does not fit; nothing overtakes it."""
        kv = self.kv_cache_manager
        admitted = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.uses_kv_cache and \
                    kv.allocate_slots(request, request.num_positions) is None:
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request.data(kv.get_block_ids(request.request_id)))
        return admitted

    # ---- update ---------------------------------------------------------------------------

    def update_from_output(self, plan: DiffusionLMSchedulerOutput,
                           result: DiffusionLMRunnerOutput, frames: Sequence = ()) -> Outputs:
        """One output per committed block (the only loop over them); requests aborted since
        the plan was made are skipped."""
        self.denoising_steps_total += len(plan.scheduled_request_ids)
        outputs: Outputs = defaultdict(list)
        num_new = 0
        for request_id, block in zip(result.request_ids, result.block_token_ids):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            output = self._commit_block(request, block)
            outputs[request.client_id].append(output)
            num_new += len(output.new_token_ids)
        self.generation_tokens_total += num_new
        self._generated.add(num_new)
        return dict(outputs)

    def _commit_block(self, request: DLLMRequest, block: list[int]) -> EngineOutput:
        """The output of one committed block: its tokens up to max_tokens, cut after the first
        stop token; the request ends on a stop, at max_tokens or with its last block."""
        sampling = request.sampling
        first = not request.output_token_ids
        request.num_committed_blocks += 1
        new = block[: sampling.max_tokens - len(request.output_token_ids)]
        status = None
        for i, token_id in enumerate(new):
            if is_stop_token(token_id, len(request.output_token_ids) + i + 1, sampling,
                             self.eos_token_ids):
                new, status = new[: i + 1], RequestStatus.FINISHED_STOPPED
                break
        request.output_token_ids.extend(new)
        if status is None and (len(request.output_token_ids) >= sampling.max_tokens
                               or request.num_committed_blocks == request.num_blocks):
            status = RequestStatus.FINISHED_LENGTH
        output = EngineOutput(request.request_id, new,
                              num_prompt_tokens=len(request.prompt_token_ids) if first else 0)
        if status is not None:
            self.running.remove(request)
            self._finish(request, status)
            output.finish_reason = RequestStatus.finish_reason(status)
        self.prompt_tokens_total += output.num_prompt_tokens
        return output

    def _finish(self, request: DLLMRequest, status: RequestStatus) -> None:
        """Common end of a request already out of `running` / `waiting`: its KV blocks are
        free now; the workers drop its state in the next plan unless they already did."""
        if request.status == RequestStatus.RUNNING and \
                request.num_committed_blocks < request.num_blocks:
            self.finished_req_ids.append(request.request_id)
        self.kv_cache_manager.free(request)
        request.status = status
        del self.requests[request.request_id]
