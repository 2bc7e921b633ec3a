"""Denoising schedules per request, applied to a batch whose rows are at different steps.

A diffusers scheduler holds one timestep array and a hidden `_step_index`, so one object serves one
request. With continuous batching the denoiser runs once per engine step over rows that belong to
different requests, each at its own step of its own schedule (a new request joins at step 0):

    row  request  num_steps  step_index  timestep fed   update coefficients
    ───  ───────  ─────────  ──────────  ────────────   ───────────────────
     0   req-a        28         27      t_a[27]        c_a[27]      <- its last step
     1   req-b        50          3      t_b[3]         c_b[3]
     2   req-c         5          0      t_c[0]         c_c[0]       <- joined this step

A `Schedule` is one request's column of that table for all its steps, computed once when it joins
by diffusers' own `set_timesteps` (shift, dynamic shifting, karras/exponential/beta sigmas, DDIM
spacing... are never re-derived here). `step()` gathers the rows' coefficients into
[B, 1, ..., 1] tensors and applies one elementwise update to the whole batch.

Invariant: each row's result equals what diffusers' scheduler `step` returns for that request
alone; bit-exact in float32 on the CPU. diffusers multiplies by 0-d CPU tensors, whose rounding
PyTorch handles per device and dtype (a reduced-precision operand rounds the coefficient on the
CPU, CUDA may turn a division into a multiply by the reciprocal), so elsewhere expect a few ulps.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from zomni.proto.errors import InvalidRequest


@dataclass(frozen=True)
class Schedule:
    """Everything one request needs for all its steps, as CPU tensors (never written after).

    timesteps: [num_steps], what the denoiser is fed at each step (dtype set by the scheduler).
    coefs:     [num_steps, K] float32, the update's coefficients at each step; their meaning is
               documented by the scheduler class that made them.
    """

    timesteps: torch.Tensor
    coefs: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


class BatchedScheduler(ABC):
    """One diffusers scheduler class made batchable; subclasses name it and what they support."""

    diffusers_class: ClassVar[type[SchedulerMixin]]
    # Options whose other values would change the update in ways we do not implement.
    supported_values: ClassVar[dict[str, tuple[Any, ...]]]

    def __init__(self, config: dict[str, Any]):
        name = self.diffusers_class.__name__
        # diffusers ignores unknown options with a warning; an option from a newer diffusers
        # would then be a silent difference, so refuse it.
        known = set(inspect.signature(self.diffusers_class.__init__).parameters) - {"self"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{name} options {unknown} are unknown to this diffusers version")
        # One instance per model, reused: each request only calls its `set_timesteps`.
        self._diffusers = self.diffusers_class.from_config(config)
        self.config = self._diffusers.config  # every option, defaults filled in
        for option, values in self.supported_values.items():
            if self.config[option] not in values:
                raise ValueError(f"{name} option {option}={self.config[option]!r} is not "
                                 f"supported (supported: {list(values)})")

    @abstractmethod
    def schedule(self, num_steps: int, image_seq_len: int) -> Schedule:
        """The schedule of a request with `num_steps` steps over `image_seq_len` latent tokens."""

    @abstractmethod
    def step(self, sample: torch.Tensor, model_output: torch.Tensor,
             schedules: Sequence[Schedule], step_indices: Sequence[int]) -> torch.Tensor:
        """The samples after this step: row b is at step `step_indices[b]` of `schedules[b]`.

        `model_output` has `sample`'s shape: guidance is applied and learned-sigma channels are
        split off by the caller.
        """

    @abstractmethod
    def predict_x0(self, sample: torch.Tensor, model_output: torch.Tensor,
                   schedules: Sequence[Schedule], step_indices: Sequence[int]) -> torch.Tensor:
        """float32: the clean sample the model predicts at this step, row by row (what a
        partial image shows: the denoised estimate, decoded as the final latents are)."""

    def timesteps(self, schedules: Sequence[Schedule], step_indices: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
        """[B]: the timestep row b feeds the denoiser this step (dtype as the class documents)."""
        rows = [s.timesteps[i] for s, i in _checked(schedules, step_indices)]
        return torch.stack(rows).to(device)

    def _gather(self, schedules: Sequence[Schedule], step_indices: Sequence[int],
                like: torch.Tensor) -> torch.Tensor:
        """[K, B, 1, ..., 1] on `like`'s device: coefficient k of row b, broadcastable on `like`."""
        rows = torch.stack([s.coefs[i] for s, i in _checked(schedules, step_indices)])  # [B, K]
        if rows.shape[0] != like.shape[0]:
            raise ValueError(f"{rows.shape[0]} schedules for a batch of {like.shape[0]} rows")
        shape = (rows.shape[1], rows.shape[0]) + (1,) * (like.dim() - 1)
        return rows.T.reshape(shape).to(like.device)  # one host-to-device copy per step


class BatchedFlowMatchEuler(BatchedScheduler):
    """FlowMatchEulerDiscreteScheduler (SD3 family): x_next = x + (sigma_next - sigma) * v.

    timesteps: float32 sigma * num_train_timesteps, as StableDiffusion3Pipeline feeds them.
    coefs[:, 0]: dt = sigma_next - sigma in float32, with the terminal sigma 0 after the last step.
    coefs[:, 1]: sigma. The model predicts v = noise - x0 on x = (1 - sigma) x0 + sigma noise,
    so its x0 is x - sigma v.
    """

    diffusers_class = FlowMatchEulerDiscreteScheduler
    supported_values = {"invert_sigmas": (False,), "stochastic_sampling": (False,)}

    def schedule(self, num_steps: int, image_seq_len: int) -> Schedule:
        _check_num_steps(num_steps, None)
        kwargs = {}
        if self.config.use_dynamic_shifting:
            kwargs["mu"] = calculate_shift(
                image_seq_len, self.config.base_image_seq_len, self.config.max_image_seq_len,
                self.config.base_shift, self.config.max_shift)
        self._diffusers.set_timesteps(num_steps, **kwargs)
        sigmas = self._diffusers.sigmas  # [num_steps + 1]
        dt = sigmas[1:] - sigmas[:-1]
        coefs = torch.stack([dt, sigmas[:-1]], dim=1).float()
        return Schedule(self._diffusers.timesteps.clone(), coefs)

    def step(self, sample: torch.Tensor, model_output: torch.Tensor,
             schedules: Sequence[Schedule], step_indices: Sequence[int]) -> torch.Tensor:
        """Returns model_output's dtype. diffusers upcasts the sample to float32 and casts back
        to model_output's dtype; the product dt * v is also float32 here (diffusers rounds it to
        a reduced-precision model_output's dtype first)."""
        dt, _ = self._gather(schedules, step_indices, sample)
        prev = sample.float() + dt * model_output.float()
        return prev.to(model_output.dtype)

    def predict_x0(self, sample, model_output, schedules, step_indices):
        _, sigma = self._gather(schedules, step_indices, sample)
        return sample.float() - sigma * model_output.float()


class BatchedDDIM(BatchedScheduler):
    """DDIMScheduler with eta = 0 (deterministic DDIM), as DiTPipeline calls `step`.

    timesteps: int64, as diffusers' (DiT's transformer embeds them as floats anyway).
    coefs[:, 0..3]: sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev), a = alphas_cumprod,
    prev = t - num_train_timesteps // num_steps and a_prev = final_alpha_cumprod when prev < 0:
    diffusers' rule, even where prev is not the next timestep (e.g. "trailing" spacing). With
    eta = 0 the variance term of diffusers' direction sqrt(1 - a_prev - std**2) is exactly 0.
    """

    diffusers_class = DDIMScheduler
    supported_values = {
        "thresholding": (False,),
        "prediction_type": ("epsilon", "v_prediction", "sample"),
        "timestep_spacing": ("leading", "trailing", "linspace"),
    }

    def schedule(self, num_steps: int, image_seq_len: int) -> Schedule:
        num_train = self.config.num_train_timesteps
        _check_num_steps(num_steps, num_train)
        self._diffusers.set_timesteps(num_steps)
        t = self._diffusers.timesteps.clone()
        if int(t.max()) >= num_train:  # steps_offset pushed a step past the alphas table
            raise InvalidRequest(f"num_steps={num_steps} with steps_offset="
                                 f"{self.config.steps_offset} exceeds {num_train} train timesteps",
                                 param="num_steps")
        alphas_cumprod = self._diffusers.alphas_cumprod
        prev = t - num_train // num_steps
        a_t = alphas_cumprod[t]
        a_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)],
                             self._diffusers.final_alpha_cumprod)
        coefs = torch.stack([a_t**0.5, (1 - a_t) ** 0.5, a_prev**0.5, (1 - a_prev) ** 0.5], dim=1)
        return Schedule(t, coefs)

    def step(self, sample: torch.Tensor, model_output: torch.Tensor,
             schedules: Sequence[Schedule], step_indices: Sequence[int]) -> torch.Tensor:
        """Returns the promoted dtype of sample and model_output, as diffusers does. Computed
        in float32 (diffusers rounds each intermediate to a reduced-precision dtype)."""
        out_dtype = torch.promote_types(sample.dtype, model_output.dtype)
        x0, eps = self._x0_eps(sample, model_output, schedules, step_indices)
        _, _, sqrt_a_prev, sqrt_b_prev = self._gather(schedules, step_indices, sample)
        return (sqrt_a_prev * x0 + sqrt_b_prev * eps).to(out_dtype)

    def predict_x0(self, sample, model_output, schedules, step_indices):
        return self._x0_eps(sample, model_output, schedules, step_indices)[0]

    def _x0_eps(self, sample: torch.Tensor, model_output: torch.Tensor,
                schedules: Sequence[Schedule], step_indices: Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) in float32 as diffusers' step derives them, x0 clipped when configured."""
        sqrt_a, sqrt_b, _, _ = self._gather(schedules, step_indices, sample)
        x, m = sample.float(), model_output.float()
        if self.config.prediction_type == "epsilon":
            x0, eps = (x - sqrt_b * m) / sqrt_a, m
        elif self.config.prediction_type == "sample":
            x0, eps = m, (x - sqrt_a * m) / sqrt_b  # eps from x0 before clipping, as diffusers
        else:  # v_prediction
            x0, eps = sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = x0.clamp(-limit, limit)
        return x0, eps


_SCHEDULERS: dict[str, type[BatchedScheduler]] = {
    cls.diffusers_class.__name__: cls for cls in (BatchedFlowMatchEuler, BatchedDDIM)
}


def load_scheduler(scheduler_dir: str | Path) -> BatchedScheduler:
    """The batched scheduler of a diffusers `scheduler/` folder (its scheduler_config.json)."""
    config = json.loads((Path(scheduler_dir) / "scheduler_config.json").read_text())
    return scheduler_from_config(config)


def scheduler_from_config(config: dict[str, Any]) -> BatchedScheduler:
    """The batched scheduler for a diffusers scheduler config; `_class_name` picks the class."""
    name = config.get("_class_name")
    if name not in _SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is not supported (supported: {sorted(_SCHEDULERS)})")
    return _SCHEDULERS[name](config)


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int,
                    base_shift: float, max_shift: float) -> float:
    """mu of dynamic shifting, linear in the latent token count: StableDiffusion3Pipeline's
    `calculate_shift`, copied because importing that module pulls in transformers."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _check_num_steps(num_steps: int, most: int | None) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1 or (
            most is not None and num_steps > most):
        bound = f"1..{most}" if most is not None else ">= 1"
        raise InvalidRequest(f"num_steps must be an integer in {bound}, got {num_steps!r}",
                             param="num_steps")


def _checked(schedules: Sequence[Schedule],
             step_indices: Sequence[int]) -> zip[tuple[Schedule, int]]:
    """Pairs (schedule, step index), refusing what tensor indexing would wrap around or miss."""
    if len(schedules) != len(step_indices):
        raise ValueError(f"{len(schedules)} schedules but {len(step_indices)} step indices")
    for s, i in zip(schedules, step_indices):
        if not 0 <= i < s.num_steps:
            raise IndexError(f"step index {i} outside a schedule of {s.num_steps} steps")
    return zip(schedules, step_indices)
