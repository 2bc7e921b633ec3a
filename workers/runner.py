"""One runner per model kind behind one interface: the worker process calls nothing else.

    kind    runner                          one step
    AR      model_runner.ModelRunner        one flat forward over prefill chunks and decodes,
                                            then sampling (paged KV cache)
    IMAGE   image_runner.ImageRunner        encode admitted prompts, one denoiser forward over
                                            requests at their own step index, VAE decode of
                                            the finished ones
    DLLM    dllm_runner.DiffusionLMRunner   one bidirectional forward over requests at their
                                            own block and step, then each one's unmasking
                                            (paged KV cache for the prefix / dual caches)

A runner is built from the `WorkerConfig`, loads its model, and then executes step plans. It
never decides anything: the plan says what to compute.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from zomni.proto import ModelKind, WorkerConfig
from zomni.proto.messages import RunnerInfo, StepPlan, StepResult
from zomni.proto.model_info import model_kind

State = TypeVar("State")


class Runner(Protocol):
    dtype: str  # what "auto" resolved to
    device: object  # torch.device
    weight_bytes: int  # this rank's parameters
    load_time_s: float

    def runner_info(self) -> RunnerInfo:
        """What this rank resolved at start (defaults follow the device), for WORKER_READY."""

    def execute(self, plan: StepPlan) -> tuple[StepResult, list] | None:
        """Run one step plan: rank 0 returns its result and the result's extra (array)
        frames; other ranks return None. Raises on a plan it cannot execute."""


def planned_state(requests: dict[str, State], request_id: str) -> State:
    """A runner's state of a request a step plan names; ValueError when it holds none."""
    try:
        return requests[request_id]
    except KeyError:
        raise ValueError(f"step plan refers to unknown request {request_id!r}") from None


def make_runner(config: WorkerConfig) -> Runner:
    """The runner for the kind of model in `config.engine.model`."""
    kind = model_kind(config.engine.model)
    if kind == ModelKind.IMAGE:
        from zomni.workers.image_runner import ImageRunner

        return ImageRunner(config)
    if kind == ModelKind.DLLM:
        from zomni.workers.dllm_runner import DiffusionLMRunner

        return DiffusionLMRunner(config)
    from zomni.workers.model_runner import ModelRunner

    return ModelRunner(config)
