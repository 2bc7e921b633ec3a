"""Prometheus metrics of one frontend, on a registry of its own (several apps per process work).

Names follow vLLM's (`vllm:` becomes `zomni:`) so existing dashboards need one substitution;
every series has a `model_name` label, one value per model the frontend serves. Latencies are
measured here, from the moment the request was accepted; the queue, KV, step-time and
images/s gauges are the engines', refreshed from their `Stats` on each scrape.

    Metrics (one registry, the metric families) ──model(name, kind)──► ModelMetrics
    (the children of one model_name: what a serving object and its timers update)
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from zomni.proto import DiffusionLMStats, ImageStats, ModelKind, Stats, TokenStats

from .ratelimit import charge_tokens, current_token_meter

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_IMAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_FINISH_REASONS = {ModelKind.AR: ("stop", "length", "abort", "error"),
                   ModelKind.DLLM: ("stop", "length", "abort", "error"),
                   ModelKind.IMAGE: ("stop", "abort", "error")}


class Metrics:
    """The metric families of this frontend; `model()` binds them to one model's name."""

    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def make(cls, name: str, doc: str, **kw):
            return cls(f"zomni:{name}", doc, labels, registry=self.registry, **kw)

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
        self.step_time = make(Gauge, "engine_step_time_seconds",
                              "Mean time of one engine step while busy, last 10 s.")
        self.image_latency = make(Histogram, "image_request_latency_seconds",
                                  "Time from image request arrival to its images.",
                                  buckets=_IMAGE_BUCKETS)
        self.images = make(Counter, "images_generated", "Images generated.")
        self.images_per_s = make(Gauge, "images_per_second",
                                 "Images the engine finished per second, last 10 s.")
        self.finished = Counter("zomni:request_success", "Requests finished, by reason.",
                                [*labels, "finished_reason"], registry=self.registry)
        self.models: list[ModelMetrics] = []

    def model(self, name: str, kind: ModelKind) -> ModelMetrics:
        self.models.append(ModelMetrics(self, name, kind))
        return self.models[-1]

    def render(self, stats: dict[str, Stats | None] | None = None) -> bytes:
        """The exposition text; `stats` (model name -> its engine's stats, None when it did not
        answer) refreshes the engine gauges first."""
        for model in self.models:
            if stats and stats.get(model.name) is not None:
                model.update(stats[model.name])
        return generate_latest(self.registry)


class ModelMetrics:
    """The series of one served model; LLM-only and image-only series exist for their kind."""

    def __init__(self, metrics: Metrics, name: str, kind: ModelKind):
        self.name = name
        self.kind = kind
        bind = {"model_name": name}
        self.running = metrics.running.labels(**bind)
        self.waiting = metrics.waiting.labels(**bind)
        self.inflight = metrics.inflight.labels(**bind)
        self.step_time = metrics.step_time.labels(**bind)
        self.finished = {reason: metrics.finished.labels(**bind, finished_reason=reason)
                         for reason in _FINISH_REASONS[kind]}
        if kind in (ModelKind.AR, ModelKind.DLLM):  # text: token series (a dLLM's per block)
            self.ttft = metrics.ttft.labels(**bind)
            self.itl = metrics.itl.labels(**bind)
            self.e2e = metrics.e2e.labels(**bind)
            self.prompt_tokens = metrics.prompt_tokens.labels(**bind)
            self.generation_tokens = metrics.generation_tokens.labels(**bind)
            self.kv_usage = metrics.kv_usage.labels(**bind)
        else:
            self.image_latency = metrics.image_latency.labels(**bind)
            self.images = metrics.images.labels(**bind)
            self.images_per_s = metrics.images_per_s.labels(**bind)

    def update(self, stats: Stats) -> None:
        sched = stats.scheduler
        self.running.set(sched.num_running)
        self.waiting.set(sched.num_waiting)
        self.step_time.set(stats.step_time_s)
        if isinstance(sched, (TokenStats, DiffusionLMStats)) and self.kind != ModelKind.IMAGE:
            self.kv_usage.set(sched.kv_usage)
        elif isinstance(sched, ImageStats) and self.kind == ModelKind.IMAGE:
            self.images_per_s.set(sched.images_per_s)

    def image_request_done(self, arrival: float, num_images: int,
                           finish_reason: str | None) -> None:
        """Count one image request once: finished (with its images), aborted or failed."""
        self.finished["abort" if finish_reason is None else finish_reason].inc()
        if num_images:
            self.images.inc(num_images)
            self.image_latency.observe(time.monotonic() - arrival)


class SequenceTimer:
    """Latencies of one generated sequence, fed to `ModelMetrics` as its outputs arrive; its
    tokens are charged to the client's rate limit (`ratelimit.py`) as they are computed."""

    __slots__ = ("metrics", "arrival", "last", "num_tokens", "meter")

    def __init__(self, metrics: ModelMetrics):
        self.metrics = metrics
        self.arrival = self.last = time.monotonic()
        self.num_tokens = 0
        self.meter = current_token_meter()  # the HTTP request's tokens bucket, if limited

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
        charge_tokens(self.meter, num_new_tokens)

    def finish(self, num_prompt_tokens: int, finish_reason: str | None) -> None:
        """Count the sequence once, whether it completed, was aborted or failed.

        `finish_reason` None means it never finished: the client left or an error ended it.
        """
        self.metrics.finished["abort" if finish_reason is None else finish_reason].inc()
        if self.num_tokens:  # a refused request computed nothing
            charge_tokens(self.meter, num_prompt_tokens)
            self.metrics.prompt_tokens.inc(num_prompt_tokens)
            self.metrics.generation_tokens.inc(self.num_tokens)
            self.metrics.e2e.observe(self.last - self.arrival)


def flat_stats(stats: Stats) -> dict[str, Any]:
    """/stats's JSON for one engine: the scheduler's figures (per model kind) beside the
    engine loop's."""
    return {"kind": str(ModelKind(type(stats.scheduler).__struct_config__.tag)),
            **msgspec.structs.asdict(stats.scheduler),
            "num_steps_total": stats.num_steps_total, "step_time_s": stats.step_time_s}
