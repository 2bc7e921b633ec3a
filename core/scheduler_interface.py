"""The one interface every kind's scheduler has, and the table that picks one per kind.

    kind    scheduler                          progress counter catching up with its target
    AR      token_scheduler.TokenScheduler     num_computed_tokens -> num_tokens
    IMAGE   denoise_scheduler.DenoiseScheduler num_completed_steps -> num_steps
    DLLM    dllm_scheduler.DiffusionLMScheduler num_committed_blocks -> num_blocks

The engine loop (engine.py) only calls these methods; it never looks inside a request, a plan
or a result, so a new kind is a new scheduler (plus its runner and wire structs), not a change
to the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from zomni.proto import EngineConfig, ModelInfo, ModelKind, ZomniError
from zomni.proto.messages import (
    Output,
    Request,
    RunnerInfo,
    SchedulerStats,
    StepPlan,
    StepResult,
)

Outputs = dict[bytes, list[Output]]  # per client identity, in the order they were made


class SchedulerInterface(Protocol):
    # Plans the engine may have sent and not yet seen answered: 2 plans the next step while
    # the workers run this one (async scheduling), 1 waits for each result.
    max_plans_in_flight: int

    def add_request(self, request: Request, client_id: bytes) -> None:
        """Validate and queue a request from client `client_id`. Raises a `ZomniError`
        (InvalidRequest, ContextLengthExceeded, EngineOverloaded) to refuse it."""

    def abort_requests(self, request_ids: Sequence[str]) -> Outputs:
        """Finish these requests as aborted (unknown or finished ids are ignored); their final
        outputs. Workers holding their state are told in the next plan."""

    def schedule(self) -> StepPlan | None:
        """The next step plan, or None when there is nothing for the workers to do."""

    def update_from_output(self, plan: StepPlan, result: StepResult,
                           frames: Sequence = ()) -> Outputs:
        """Apply the workers' result of `plan` (with the result's extra array frames)."""

    def has_unfinished_requests(self) -> bool: ...

    def error_output(self, request_id: str, error: ZomniError) -> Output:
        """The output that tells a client its request was refused."""

    def get_stats(self) -> SchedulerStats: ...


def make_scheduler(config: EngineConfig, model: ModelInfo,
                   runner: RunnerInfo) -> SchedulerInterface:
    """The scheduler for `model`'s kind, sized by what the workers resolved (`runner`)."""
    if model.kind == ModelKind.IMAGE:
        from .denoise_scheduler import DenoiseScheduler

        return DenoiseScheduler(config, model.details, runner)
    if model.kind == ModelKind.DLLM:
        from .dllm_scheduler import DiffusionLMScheduler

        return DiffusionLMScheduler(config, model.details, runner)
    from .token_scheduler import TokenScheduler

    return TokenScheduler(config, model.details, runner)
