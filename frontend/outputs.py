"""What users get back, and the per-request state that turns engine outputs into it.

`RequestOutput` / `CompletionOutput` mirror vLLM's so code written for it reads the same
fields. `RequestState` is the only place that folds `EngineOutput`s into text: the Python API
and the HTTP server both use it. Each fold returns a `SequenceDelta`, a copy of what that one
output added: a consumer that reads it later (a merged stream of several choices) must not read
the `CompletionOutput`, which later outputs may have changed by then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from zomni.proto import EngineOutput, EngineRequest, FinishReason, SamplingParams, TokenLogprobs

from .detokenizer import IncrementalDetokenizer


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


# one position: token id -> Logprob (the sampled or prompt token first, then the top-N)
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None  # one per generated token
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # vLLM's layout: entry 0 None, entry i prompt token i first, then the top-N (from child 0
    # when n > 1: the prompt is the same for every sample)
    prompt_logprobs: list[PositionLogprobs | None] | None = None


@dataclass(frozen=True)
class SequenceDelta:
    """What one engine output added to one sequence, as it was then."""

    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs]  # one per entry of `token_ids`; [] without logprobs
    finish_reason: str | None
    stop_reason: int | str | None
    stop_hit: bool  # a stop string ended it: the caller must abort it in the engine


def child_requests(request_id: str, prompt_ids: list[int], params: SamplingParams,
                   priority: int = 0, all_prompt_logprobs: bool = False
                   ) -> list[EngineRequest]:
    """One engine request per sample: n > 1 fans out here, seeds offset per child.

    The engine serves n=1 requests only; children are `{request_id}-{i}`. Only child 0 asks for
    prompt logprobs (they are the same for every sample, and a request that asks for them
    reads nothing from the prefix cache) unless `all_prompt_logprobs`.
    """
    now = time.time()
    if params.n == 1:
        return [EngineRequest(request_id, prompt_ids, params, priority, now)]
    return [EngineRequest(f"{request_id}-{i}", prompt_ids, msgspec.structs.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i,
                prompt_logprobs=params.prompt_logprobs if i == 0 or all_prompt_logprobs
                else None), priority, now) for i in range(params.n)]


class RequestState:
    """One generated sequence (one of `n`) on the client side."""

    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int],
                 sampling: SamplingParams, tokenizer, eos_token_ids: list[int]):
        self.request_id = request_id
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.output = CompletionOutput(index=index)
        if sampling.logprobs is not None:
            self.output.logprobs = []
            self.output.cumulative_logprob = 0.0
        # set once, by the first output, when the request asked for them
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, sampling.skip_special_tokens, sampling.stop,
            sampling.include_stop_str_in_output) if tokenizer is not None else None
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    def update(self, out: EngineOutput) -> SequenceDelta:
        """Fold one engine output in; returns what it added.

        A stop-string hit finishes the request here; the caller must abort it in the engine.
        """
        if out.num_prompt_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = [None if lp is None else self._entry(lp)
                                    for lp in out.prompt_logprobs]
        new_ids = list(out.new_token_ids)
        self.output.token_ids.extend(new_ids)
        new_logprobs = [self._entry(lp) for lp in out.new_logprobs or ()] \
            if self.output.logprobs is not None else []
        if new_logprobs:
            self.output.logprobs.extend(new_logprobs)
            self.output.cumulative_logprob += sum(lp.logprobs[0] for lp in out.new_logprobs)
        finished = out.finish_reason is not None
        delta = ""
        hit = False
        if self.detok is not None:
            self.detok.add_tokens(new_ids)
            if finished:
                self.detok.flush()
            hit = self.detok.stop_reason is not None
            delta = self.detok.take_delta(finished or hit)
            self.output.text += delta
        if hit:
            self.output.finish_reason, self.output.stop_reason = "stop", self.detok.stop_reason
        elif finished:
            self.output.finish_reason = str(FinishReason(out.finish_reason))
            if out.finish_reason == FinishReason.STOP and new_ids:
                last = new_ids[-1]
                self.output.stop_reason = None if last in self.eos_token_ids else last
        return SequenceDelta(delta, new_ids, new_logprobs, self.output.finish_reason,
                             self.output.stop_reason, stop_hit=hit and not finished)

    def _entry(self, lp: TokenLogprobs) -> PositionLogprobs:
        entry: PositionLogprobs = {}
        for token_id, logprob, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            if token_id not in entry:
                text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else None
                entry[token_id] = Logprob(logprob, rank, text)
        return entry
