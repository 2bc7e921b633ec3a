"""Prometheus metrics of one frontend, on a registry of its own (several apps per process work).

Names follow vLLM's (`vllm:` becomes `zomni:`) so existing dashboards need one substitution.
Latencies are measured here, per sequence, from the moment the request was accepted; the
queue and KV gauges are the engine's, refreshed from its `Stats` on each scrape.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from zomni.proto import ModelKind, Stats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def make(cls, name: str, doc: str, **kw):
            return cls(f"zomni:{name}", doc, list(labels), registry=self.registry,
                       **kw).labels(**labels)

        self.ttft = make(Histogram, "time_to_first_token_seconds",
                         "Time from request arrival to its first token.",
                         buckets=_LATENCY_BUCKETS)
        self.itl = make(Histogram, "inter_token_latency_seconds",
                        "Time between two outputs of one sequence.", buckets=_ITL_BUCKETS)
        self.e2e = make(Histogram, "e2e_request_latency_seconds",
                        "Time from request arrival to its last token.", buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens served.")
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated.")
        self.running = make(Gauge, "num_requests_running", "Requests the engine is running.")
        self.waiting = make(Gauge, "num_requests_waiting", "Requests waiting in the engine.")
        self.kv_usage = make(Gauge, "kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).")
        self.inflight = make(Gauge, "frontend_requests_in_flight",
                             "Engine requests this frontend is waiting on.")
        self._finished = Counter("zomni:request_success", "Sequences finished, by reason.",
                                 [*labels, "finished_reason"], registry=self.registry)
        self.finished = {reason: self._finished.labels(**labels, finished_reason=reason)
                         for reason in ("stop", "length", "abort", "error")}

    def render(self, stats: Stats | None) -> bytes:
        if stats is not None:
            self.running.set(stats.scheduler.num_running)
            self.waiting.set(stats.scheduler.num_waiting)
            self.kv_usage.set(stats.scheduler.kv_usage)
        return generate_latest(self.registry)


class SequenceTimer:
    """Latencies of one generated sequence, fed to `Metrics` as its outputs arrive."""

    __slots__ = ("metrics", "arrival", "last", "num_tokens")

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.arrival = self.last = time.monotonic()
        self.num_tokens = 0

    def on_output(self, num_new_tokens: int) -> None:
        if not num_new_tokens:
            return
        now = time.monotonic()
        if self.num_tokens == 0:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.num_tokens += num_new_tokens

    def finish(self, num_prompt_tokens: int, finish_reason: str | None) -> None:
        """Count the sequence once, whether it completed, was aborted or failed.

        `finish_reason` None means it never finished: the client left or an error ended it.
        """
        self.metrics.finished["abort" if finish_reason is None else finish_reason].inc()
        if self.num_tokens:  # a refused request computed nothing
            self.metrics.prompt_tokens.inc(num_prompt_tokens)
            self.metrics.generation_tokens.inc(self.num_tokens)
            self.metrics.e2e.observe(self.last - self.arrival)


def flat_stats(stats: Stats) -> dict[str, Any]:
    """/stats's JSON: the scheduler's figures (per model kind) beside the engine loop's."""
    return {"kind": str(ModelKind(type(stats.scheduler).__struct_config__.tag)),
            **msgspec.structs.asdict(stats.scheduler),
            "num_steps_total": stats.num_steps_total, "step_time_s": stats.step_time_s}
