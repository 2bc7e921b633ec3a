"""`Request`: the engine core's runtime state of one generation request.

None of this rides the wire. The wire form is `proto.EngineRequest` (what a frontend sends);
the worker learns about a request through `NewRequestData` / `CachedRequestData` in the step
plan. Status transitions (vLLM v1 names):

    WAITING ──schedule──► RUNNING ──update_from_output──► FINISHED_STOPPED | FINISHED_LENGTH
       ▲                    │  │
       └──── PREEMPTED ◄────┘  └──abort──► FINISHED_ABORTED     (any unfinished state can abort)

A preempted request waits again with `num_computed_tokens == 0`; when it is scheduled again the
worker sees it as new, with `token_ids = prompt + outputs so far`, and recomputes their KV.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import msgspec

from zomni.proto import EngineRequest, FinishReason, SamplingParams, TokenLogprobs


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # Everything after PREEMPTED is finished; `is_finished` relies on this order.
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: RequestStatus) -> FinishReason | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(eq=False)
class Request:
    """One request as the scheduler tracks it.

    Invariants:
    - `all_token_ids = prompt_token_ids + output_token_ids` only grows (append-only), so block
      hashes computed from it stay valid for the request's whole life.
    - `0 <= num_computed_tokens <= num_tokens <= max_model_len`: the KV of the first
      `num_computed_tokens` tokens is (or, within the current step, will be) in the cache.
      The scheduler advances it when it schedules tokens, so between `schedule()` and
      `update_from_output()` it already counts the step's tokens (as in vLLM v1).
    - `num_output_placeholders` counts tokens sampled by plans still in flight (at most one
      with async scheduling): the scheduler may plan the next decode step before they arrive,
      since the worker keeps its own copy of the sampled tokens.
    - `len(output_token_ids) <= max_tokens`, where `max_tokens` is already capped by the context:
      `min(sampling.max_tokens or inf, max_model_len - len(prompt_token_ids))`.
    - `prompt_logprobs` is a list of `num_prompt_tokens` entries (filled by position as steps
      report them; entry 0 stays None) from admission of a request that asked for them until
      its first output carries it away; then it is None, and a recomputation after a
      preemption does not compute them again (`sampling_for_workers`).
    """

    request_id: str
    client_id: bytes  # ZMQ identity of the frontend that sent it; its outputs go back there
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    priority: int = 0  # lower value is served first
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_output_placeholders: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache when first scheduled
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    def __post_init__(self) -> None:
        if self.sampling.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * len(self.prompt_token_ids)

    @classmethod
    def from_engine_request(cls, req: EngineRequest, client_id: bytes,
                            max_model_len: int) -> Request:
        """Runtime state for a validated wire request (prompt length is checked by the engine)."""
        room = max_model_len - len(req.prompt_token_ids)
        max_tokens = room if req.sampling.max_tokens is None else min(req.sampling.max_tokens,
                                                                       room)
        return cls(request_id=req.request_id, client_id=client_id,
                   prompt_token_ids=list(req.prompt_token_ids), sampling=req.sampling,
                   max_tokens=max_tokens, priority=req.priority,
                   # A custom frontend may leave arrival_time unset; then arrival is now.
                   arrival_time=req.arrival_time or time.time())

    @property
    def needs_prompt_logits(self) -> bool:
        """True while its prompt logprobs are still to be computed: every prompt position
        then needs its logits, so none may be served from the prefix cache."""
        return self.prompt_logprobs is not None

    def add_prompt_logprobs(self, first_position: int, logprobs: list[TokenLogprobs]) -> None:
        """File logprobs of prompt positions `first_position, ...`, unless the first output
        already carried them away. Filed by position, so a recomputation after a preemption
        (the same values again) duplicates nothing."""
        slots = self.prompt_logprobs
        if slots is None:
            return
        end = min(first_position + len(logprobs), len(slots))
        if end > first_position:
            slots[first_position:end] = logprobs[:end - first_position]

    def sampling_for_workers(self) -> SamplingParams:
        """The parameters the workers get when it is (re)admitted: without `prompt_logprobs`
        once they were sent, so a recomputation after a preemption skips that work."""
        if self.sampling.prompt_logprobs is None or self.needs_prompt_logits:
            return self.sampling
        return msgspec.structs.replace(self.sampling, prompt_logprobs=None)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> FinishReason | None:
        return RequestStatus.finish_reason(self.status)
