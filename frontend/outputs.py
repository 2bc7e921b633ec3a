"""What users get back, and the per-request state that turns engine outputs into it.

`RequestOutput` / `CompletionOutput` mirror vLLM's so code written for it reads the same
fields. `RequestState` is the only place that folds `EngineOutput`s into text: the Python API
and the HTTP server both use it.
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


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    # one dict per generated token: token id -> Logprob (the sampled token and the top-N)
    logprobs: list[dict[int, Logprob]] | None = None
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


def child_requests(request_id: str, prompt_ids: list[int], params: SamplingParams,
                   priority: int = 0) -> list[EngineRequest]:
    """One engine request per sample: n > 1 fans out here, seeds offset per child.

    The engine serves n=1 requests only; children are `{request_id}-{i}`.
    """
    now = time.time()
    if params.n == 1:
        return [EngineRequest(request_id, prompt_ids, params, priority, now)]
    return [EngineRequest(f"{request_id}-{i}", prompt_ids, msgspec.structs.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i),
                priority, now) for i in range(params.n)]


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
        self.detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, sampling.skip_special_tokens, sampling.stop,
            sampling.include_stop_str_in_output) if tokenizer is not None else None
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    def update(self, out: EngineOutput) -> tuple[str, list[int], bool]:
        """Fold one engine output in; returns (new text, new token ids, hit a stop string).

        A stop-string hit finishes the request here; the caller must abort it in the engine.
        """
        if out.num_prompt_tokens:
            self.num_cached_tokens = out.num_cached_tokens
        new_ids = list(out.new_token_ids)
        self.output.token_ids.extend(new_ids)
        if out.new_logprobs and self.output.logprobs is not None:
            for lp in out.new_logprobs:
                self._add_logprobs(lp)
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
        stop_hit = hit and not finished
        return delta, new_ids, stop_hit

    def _add_logprobs(self, lp: TokenLogprobs) -> None:
        entry: dict[int, Logprob] = {}
        for token_id, logprob, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            if token_id not in entry:
                text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else None
                entry[token_id] = Logprob(logprob, rank, text)
        self.output.logprobs.append(entry)
        self.output.cumulative_logprob += lp.logprobs[0]
