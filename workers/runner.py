"""One runner per model kind behind one interface: the worker process calls nothing else.

    kind    runner                          one step
    AR      model_runner.ModelRunner        one flat forward over prefill chunks and decodes,
                                            then sampling (paged KV cache)
    IMAGE   image_runner.ImageRunner        encode admitted prompts, one denoiser forward over
                                            requests at their own step index, VAE decode of
                                            the finished ones

A runner is built from the `WorkerConfig`, loads its model, and then executes step plans. It
never decides anything: the plan says what to compute.
"""

from __future__ import annotations

from typing import Protocol

from zomni.proto import ModelKind, WorkerConfig
from zomni.proto.messages import ImageRunnerInfo, StepPlan, StepResult, TokenRunnerInfo
from zomni.proto.model_info import model_kind


class Runner(Protocol):
    dtype: str  # what "auto" resolved to
    device: object  # torch.device
    weight_bytes: int  # this rank's parameters
    load_time_s: float

    def runner_info(self) -> TokenRunnerInfo | ImageRunnerInfo:
        """What this rank resolved at start (defaults follow the device), for WORKER_READY."""

    def execute(self, plan: StepPlan) -> tuple[StepResult, list] | None:
        """Run one step plan: rank 0 returns its result and the result's extra (array)
        frames; other ranks return None. Raises on a plan it cannot execute."""


def make_runner(config: WorkerConfig) -> Runner:
    """The runner for the kind of model in `config.engine.model`."""
    if model_kind(config.engine.model) == ModelKind.IMAGE:
        from zomni.workers.image_runner import ImageRunner

        return ImageRunner(config)
    from zomni.workers.model_runner import ModelRunner

    return ModelRunner(config)
