"""`TokenScheduler`: continuous batching of LLM requests over paged KV blocks, one rule and no
phases.

Every step each request's `num_computed_tokens` catches up with its `num_tokens` as far as the
token budget allows. That one rule covers prefill (many tokens behind), chunked prefill (more
behind than the budget), decode (one token behind: the last sampled one) and prefix-cache hits
(admitted with `num_computed_tokens` already past the cached blocks).

    schedule()            -> SchedulerOutput   (sent to every worker)
    update_from_output()  <- ModelRunnerOutput (rank 0's sampled tokens) -> EngineOutputs per client

With async scheduling the engine calls `schedule()` for step N+1 before `update_from_output()`
of step N. A request that samples in N then has an output placeholder: N+1 already computes the
KV of that not-yet-known token (the worker has it by then) and samples the next one. When N's
token ends the request, N+1's token for it is dropped; a request whose placeholders reach
its length limit is not scheduled again.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

from zomni.proto import (
    CachedRequestData,
    ContextLengthExceeded,
    EngineConfig,
    EngineOutput,
    EngineRequest,
    FinishReason,
    InvalidRequest,
    ModelRunnerOutput,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
    TokenModelInfo,
    TokenRunnerInfo,
    TokenStats,
    ZomniError,
)

from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus
from .request_queue import RequestQueue
from .scheduler_common import RecentRate, check_can_queue, take_out
from .scheduler_interface import Outputs

logger = logging.getLogger("zomni.scheduler")


class _StepPlan:
    """The step being built: what each request computes and the budget left."""

    def __init__(self, budget: int):
        self.budget = budget
        self.new_requests: list[NewRequestData] = []
        self.cached_requests: dict[str, CachedRequestData] = {}
        self.num_scheduled_tokens: dict[str, int] = {}  # schedule order

    def add(self, request_id: str, num_tokens: int) -> None:
        self.num_scheduled_tokens[request_id] = num_tokens
        self.budget -= num_tokens

    def unschedule(self, request_id: str) -> None:
        """Undo a running request's entry (it was preempted later in the same step)."""
        num_tokens = self.num_scheduled_tokens.pop(request_id, 0)
        self.budget += num_tokens
        self.cached_requests.pop(request_id, None)


class TokenScheduler:
    """Decides, each step, which tokens of which requests the workers compute.

    Invariants:
    - `running` holds at most `max_num_seqs` requests, each with a block table in the KV cache
      manager, in admission order. `waiting` holds WAITING and PREEMPTED requests, which hold no
      blocks and have `num_computed_tokens == 0`.
    - No step schedules more than `max_num_batched_tokens` tokens, and no request ever reaches
      more than `max_num_tokens = min(max_model_len, KV cache capacity)` positions:
      `num_computed_tokens <= num_tokens <= max_num_tokens`, because generation stops (LENGTH)
      at `num_tokens == max_num_tokens`. So a request always fits the KV cache once alone.
    - A request id is in some plan's `finished_request_ids` exactly when the worker holds state
      for it that it must drop: after it finished, was aborted while running, or was preempted.
      Workers drop those before adding the plan's new requests.
    """

    def __init__(self, config: EngineConfig, model: TokenModelInfo, runner: TokenRunnerInfo):
        num_kv_blocks, block_size = runner.num_kv_blocks, runner.block_size
        max_model_len = model.max_model_len
        kv_capacity = num_kv_blocks * block_size
        if kv_capacity < max_model_len:
            logger.warning("%d KV blocks of %d tokens hold %d tokens, less than max_model_len "
                           "(%d): requests stop at %d tokens", num_kv_blocks, block_size,
                           kv_capacity, max_model_len, kv_capacity)
        self.config = config
        self.model = model
        # ~2 ms of engine work a step hides behind the workers' next step (5-15% of a decode)
        self.max_plans_in_flight = 1 if config.async_scheduling is False else 2
        self.block_size = block_size
        self.max_num_batched_tokens = runner.max_num_batched_tokens  # as the workers resolved
        self.max_model_len = max_model_len
        # A request must fit the KV cache alone, or it would preempt itself forever.
        self.max_num_tokens = min(max_model_len, kv_capacity)
        self.eos_token_ids = frozenset(model.eos_token_ids)
        prefix_caching = config.enable_prefix_caching is not False  # on unless turned off
        self.kv_cache_manager = KVCacheManager(num_kv_blocks, block_size, prefix_caching)
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting = RequestQueue()
        self.running: list[Request] = []
        self.finished_req_ids: list[str] = []  # for the next plan's finished_request_ids
        self.step_id = 0
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._generated = RecentRate()  # generated tokens

    # ---- requests in and out --------------------------------------------------------------

    def add_request(self, request: EngineRequest | Request, client_id: bytes = b"") -> None:
        """Queue a request; `EngineOverloaded` when the waiting queue is full.

        A wire request is checked for what only the engine can check (token ids the model
        can embed, n == 1) and becomes a runtime `Request`; tests may queue a `Request`.
        """
        if not isinstance(request, Request):
            request = self._from_wire(request, client_id)
        check_can_queue(request.request_id, self.requests, self.waiting,
                        self.config.max_waiting_requests)
        if not 0 < request.num_prompt_tokens < self.max_num_tokens:
            # The engine checks max_model_len first; the KV cache may hold fewer tokens.
            raise ContextLengthExceeded(
                f"the prompt has {request.num_prompt_tokens} tokens; this engine serves at most "
                f"{self.max_num_tokens - 1} (max_model_len {self.max_model_len}, KV cache "
                f"{self.kv_cache_manager.num_blocks * self.block_size} tokens, "
                "and one token must be generated)", param="prompt")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def _from_wire(self, req: EngineRequest, client_id: bytes) -> Request:
        if not isinstance(req, EngineRequest):
            raise InvalidRequest("this engine serves an LLM: send an EngineRequest (token ids "
                                 "and SamplingParams)", param="model")
        if req.sampling.diffusion is not None:
            raise InvalidRequest("diffusion (steps, block_length, remasking, threshold, cache, "
                                 "cfg_scale) applies to masked-diffusion LMs; this engine "
                                 "serves an autoregressive LLM", param="diffusion")
        vocab = self.model.vocab_size
        if req.prompt_token_ids and not (min(req.prompt_token_ids) >= 0
                                         and max(req.prompt_token_ids) < vocab):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        bias = req.sampling.logit_bias
        if bias and max(bias) >= vocab:  # keys are non-negative (SamplingParams checks)
            raise InvalidRequest(f"logit_bias token ids must be in [0, {vocab}), got "
                                 f"{max(bias)}", param="logit_bias")
        if req.sampling.n != 1:
            raise InvalidRequest("the engine serves n=1 requests; the client fans out n > 1",
                                 param="n")
        return Request.from_engine_request(req, client_id, self.max_model_len)

    def error_output(self, request_id: str, error: ZomniError) -> EngineOutput:
        return engine_error_output(request_id, error)

    def abort_requests(self, request_ids: Sequence[str]) -> Outputs:
        """Finish the given requests as aborted; the final outputs of those that existed and
        were unfinished. Their blocks are freed now; ids the worker holds go into the next
        plan's `finished_request_ids`."""
        aborted = take_out(request_ids, self.requests, self.running, self.waiting)
        for request in aborted:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        outputs = finished_outputs(aborted)
        self.prompt_tokens_total += sum(o.num_prompt_tokens for outs in outputs.values()
                                        for o in outs)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_request(self, request_id: str) -> bool:
        """True while the request is unfinished (waiting, running or preempted)."""
        return request_id in self.requests

    def get_stats(self) -> TokenStats:
        kv = self.kv_cache_manager
        return TokenStats(num_waiting=len(self.waiting), num_running=len(self.running),
                          kv_usage=kv.usage, num_kv_blocks=kv.num_blocks,
                          prefix_cache_hit_rate=kv.hit_rate,
                          generation_tokens_per_s=self._generated.per_s(),
                          prompt_tokens_total=self.prompt_tokens_total,
                          generation_tokens_total=self.generation_tokens_total,
                          num_preemptions=self.num_preemptions)

    # ---- schedule -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput | None:
        """Build the next step plan and advance the scheduled requests' `num_computed_tokens`.

        Running requests come first, in admission order, each getting
        `min(num_tokens - num_computed_tokens, budget left)` tokens; when blocks run out the
        lowest-priority running request is preempted (possibly the one asking). Waiting
        requests are admitted, in `(priority, arrival)` order, only if nothing was preempted
        this step, and only while the head of the queue fits (no overtaking).

        `NewRequestData.num_computed_tokens` and `CachedRequestData.num_computed_tokens` carry
        the value BEFORE this step (for a new request: its prefix-cache hit tokens, a multiple
        of block_size). The worker computes `token_ids[num_computed : num_computed + n]` with
        `n = num_scheduled_tokens[request_id]`; the request samples when `num_computed + n` equals
        its token count. Once the plan is built, `request.num_computed_tokens` already includes
        `n` (as in vLLM v1), so the scheduler state runs one step ahead of the worker.
        """
        plan = _StepPlan(self.max_num_batched_tokens)
        if not self._schedule_running(plan):
            self._schedule_waiting(plan)
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            request = self.requests[request_id]
            request.num_computed_tokens += num_tokens
            if (request.num_computed_tokens
                    == request.num_tokens + request.num_output_placeholders):
                request.num_output_placeholders += 1  # samples in this step
        if not plan.num_scheduled_tokens and not self.finished_req_ids:
            return None  # nothing to compute, nothing to drop
        self.step_id += 1
        finished, self.finished_req_ids = self.finished_req_ids, []
        return SchedulerOutput(
            step_id=self.step_id, new_requests=plan.new_requests,
            cached_requests=list(plan.cached_requests.values()),
            num_scheduled_tokens=plan.num_scheduled_tokens, finished_request_ids=finished,
            total_num_scheduled_tokens=self.max_num_batched_tokens - plan.budget)

    def _schedule_running(self, plan: _StepPlan) -> bool:
        """Schedule running requests; True when any request was preempted."""
        preempted = False
        i = 0
        while i < len(self.running) and plan.budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens + request.num_output_placeholders
                          - request.num_computed_tokens, plan.budget)
            if num_new <= 0 or self._at_length_limit(request):
                i += 1
                continue
            new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            while new_block_ids is None:
                victim = max(self.running, key=lambda r: (r.priority, r.arrival_time))
                if self.running.index(victim) < i:
                    i -= 1
                self._preempt(victim, plan)
                preempted = True
                if victim is request:
                    break
                new_block_ids = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_block_ids is None:  # it preempted itself; running[i] is the next one now
                continue
            plan.cached_requests[request.request_id] = CachedRequestData(
                request_id=request.request_id, new_block_ids=new_block_ids,
                num_computed_tokens=request.num_computed_tokens)
            plan.add(request.request_id, num_new)
            i += 1
        return preempted

    def _at_length_limit(self, request: Request) -> bool:
        """True when the tokens in flight already reach the request's length limit: its last
        result will finish it (LENGTH), so nothing more is scheduled for it."""
        pending = request.num_output_placeholders
        return pending > 0 and (request.num_output_tokens + pending >= request.max_tokens
                                or request.num_tokens + pending >= self.max_num_tokens)

    def _schedule_waiting(self, plan: _StepPlan) -> None:
        kv = self.kv_cache_manager
        while self.waiting and plan.budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if request.needs_prompt_logits:
                # Every prompt position needs its logits, so nothing is read from the prefix
                # cache; as in vLLM the request is not counted in the hit rate (no lookup),
                # and its own full blocks are still cached for others.
                hit_block_ids, num_hit_tokens = None, 0
            else:
                hit_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, plan.budget)
            if kv.allocate_slots(request, num_new, hit_block_ids) is None:
                break  # the head waits for blocks; nothing behind it overtakes
            self.waiting.pop()
            if request.num_preemptions == 0:  # first scheduling
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            plan.new_requests.append(NewRequestData(
                request_id=request.request_id, token_ids=request.all_token_ids,
                sampling=request.sampling_for_workers(),
                block_ids=kv.get_block_ids(request.request_id),
                num_computed_tokens=num_hit_tokens, num_prompt_tokens=request.num_prompt_tokens))
            plan.add(request.request_id, num_new)

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        """Free a running request's blocks and queue it again to be recomputed from scratch."""
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        plan.unschedule(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.finished_req_ids.append(request.request_id)
        self.waiting.push(request)

    # ---- update ---------------------------------------------------------------------------

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput, frames: Sequence = ()) -> Outputs:
        """Apply one step's sampled tokens; returns each client's outputs for this step.

        This is the only place that loops over the sampled tokens. Blocks that became full in
        this step are registered in the prefix cache first (their KV is written now), prompt
        logprobs are filed, then each sampling request gets its token, is checked for a stop,
        and finishing ones free their blocks. Requests that did not sample (a partial prefill
        chunk) produce no output; requests aborted since the plan was made are skipped. A
        request's first output carries its prompt logprobs when it asked for them.
        """
        self._cache_computed_blocks(scheduler_output)
        if runner_output.prompt_logprobs:
            self._add_prompt_logprobs(scheduler_output, runner_output.prompt_logprobs)
        logprobs = runner_output.logprobs or [None] * len(runner_output.request_ids)
        outputs: dict[bytes, list[EngineOutput]] = defaultdict(list)
        num_new = 0
        for request_id, token_id, token_logprobs in zip(
                runner_output.request_ids, runner_output.sampled_token_ids, logprobs):
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            request.num_output_placeholders -= 1
            request.output_token_ids.append(token_id)
            status = self._check_stop(request)
            first = request.num_output_tokens == 1
            output = EngineOutput(
                request_id=request_id, new_token_ids=[token_id],
                new_logprobs=None if token_logprobs is None else [token_logprobs],
                num_prompt_tokens=request.num_prompt_tokens if first else 0,
                num_cached_tokens=request.num_cached_tokens if first else 0)
            if first and request.prompt_logprobs is not None:
                output.prompt_logprobs, request.prompt_logprobs = request.prompt_logprobs, None
            if status is not None:
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:  # preempted after this plan was made (engine scheduled ahead)
                    self.waiting.remove(request)
                self._finish(request, status)
                output.finish_reason = request.finish_reason
            outputs[request.client_id].append(output)
            self.prompt_tokens_total += output.num_prompt_tokens
            num_new += 1
        self.generation_tokens_total += num_new
        self._generated.add(num_new)
        return dict(outputs)

    def _add_prompt_logprobs(self, scheduler_output: SchedulerOutput,
                             found: dict[str, list[TokenLogprobs]]) -> None:
        """File this step's prompt logprobs: a request computed from `c` (the plan's value,
        as the worker saw it) reported prompt positions c + 1, c + 2, ..."""
        starts = {r.request_id: r.num_computed_tokens
                  for r in (*scheduler_output.new_requests, *scheduler_output.cached_requests)}
        for request_id, logprobs in found.items():
            request = self.requests.get(request_id)
            if request is not None and request_id in starts:  # else finished since
                request.add_prompt_logprobs(starts[request_id] + 1, logprobs)

    def _cache_computed_blocks(self, scheduler_output: SchedulerOutput) -> None:
        """Register full blocks of every request that computed tokens in this plan, using the
        plan's own `num_computed_tokens` so it stays right if the engine scheduled ahead."""
        scheduled = scheduler_output.num_scheduled_tokens
        starts = [(r.request_id, r.num_computed_tokens) for r in scheduler_output.new_requests]
        starts += [(r.request_id, r.num_computed_tokens)
                   for r in scheduler_output.cached_requests]
        for request_id, num_computed in starts:
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self.kv_cache_manager.cache_blocks(request, num_computed + scheduled[request_id])

    def _check_stop(self, request: Request) -> RequestStatus | None:
        """The finished status after the request's newest token, or None to go on.

        A stop token (EOS unless ignore_eos, or a stop_token_ids hit) wins over the length
        limit when both happen on the same token, since the model did end there; stops count
        only once `min_tokens` outputs exist, while the length limits always apply.
        """
        sampling = request.sampling
        token_id = request.output_token_ids[-1]
        if is_stop_token(token_id, request.num_output_tokens, sampling, self.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if (request.num_output_tokens >= request.max_tokens
                or request.num_tokens >= self.max_num_tokens):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Common end of a request that is already out of `running` / `waiting`."""
        if request.status == RequestStatus.RUNNING:
            self.finished_req_ids.append(request.request_id)
        self.kv_cache_manager.free(request)
        request.status = status
        del self.requests[request.request_id]


def is_stop_token(token_id: int, num_output_tokens: int, sampling: SamplingParams,
                  eos_token_ids: frozenset[int]) -> bool:
    """True when `token_id`, a request's `num_output_tokens`-th output, ends it: EOS unless
    ignore_eos, or a stop_token_ids hit, once `min_tokens` outputs exist."""
    return num_output_tokens >= sampling.min_tokens and bool(
        (token_id in eos_token_ids and not sampling.ignore_eos)
        or (sampling.stop_token_ids and token_id in sampling.stop_token_ids))


def engine_error_output(request_id: str, error: ZomniError) -> EngineOutput:
    """The output that ends a token request (AR or masked-diffusion) with `error`."""
    return EngineOutput(request_id, [], finish_reason=FinishReason.ERROR, error=error.message,
                        error_kind=type(error).__name__, error_param=error.param or "")


def finished_outputs(requests: list[Request], finish_reason: FinishReason = FinishReason.ABORT,
                     error: str = "", error_kind: str = "") -> dict[bytes, list[EngineOutput]]:
    """Final outputs, per client, for requests ended outside `update_from_output` (aborted,
    or failed with `error`). A request that produced nothing yet also gets its prompt counts."""
    outputs: dict[bytes, list[EngineOutput]] = defaultdict(list)
    for request in requests:
        first = request.num_output_tokens == 0
        outputs[request.client_id].append(EngineOutput(
            request_id=request.request_id, new_token_ids=[], finish_reason=finish_reason,
            num_prompt_tokens=request.num_prompt_tokens if first else 0,
            num_cached_tokens=request.num_cached_tokens if first else 0,
            error=error, error_kind=error_kind))
    return dict(outputs)
