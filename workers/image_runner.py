"""ImageRunner: executes one IMAGE step plan (`DenoiseSchedulerOutput`) on this rank.

The worker decides nothing. Per step, in this order:

    (a) drop finished (aborted, preempted) requests: their latents go
    (b) admit new requests: condition them (rank 0 encodes prompts, all ranks get the
        embeddings), draw their seeded noise, build their own schedule
    (c) one denoiser forward over the rows of every scheduled request, each at its own step:

            rows   [ r1 x n1 | r2 x n2 | ... ]            latents, one timestep per row
            input  [ rows (cond) | rows (uncond) ]        with guidance: both halves at once
            output  uncond + g_row * (cond - uncond)      each request's own guidance scale

        then one batched scheduler update (`denoise_schedulers`), rows back to their requests;
        requests with a step cache (`step_cache`) keep its state per CFG branch, and the
        forward runs the blocks only on the rows whose branch computes this step
    (d) requests whose last step this was: VAE decode (rank 0), pixels returned, state dropped;
        requests that asked for partial images and reached one of their `partial_image_steps`:
        the step's denoised estimate (x0 prediction) is decoded the same way and returned too

Rank 0 returns a `DenoiseRunnerOutput` whose pixels travel as raw frames; other ranks return
None. Every rank runs (b)-(c) identically, so their latents stay equal under tensor parallelism.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zomni.proto import (
    DenoiseRequestData,
    DenoiseRunnerOutput,
    DenoiseSchedulerOutput,
    ImageModelInfo,
    ImageRunnerInfo,
    WorkerConfig,
)
from zomni.proto.arrays import add_array
from zomni.proto.model_info import architecture_of, read_model_info
from zomni.proto.sampling import partial_image_steps
from zomni.workers.denoise_schedulers import Schedule, load_scheduler
from zomni.workers.denoiser_loader import load_denoiser
from zomni.workers.device import setup_rank
from zomni.workers.image_pipelines import PIPELINES, Conditioning
from zomni.workers.runner import planned_state
from zomni.workers.step_cache import BranchCache, CacheGroup, StepCache


@dataclass(eq=False)
class ImageState:
    """One admitted request on this rank: its latents and what it needs for every step."""

    data: DenoiseRequestData
    latents: torch.Tensor  # [n, C, h, w]
    conditioning: Conditioning
    schedule: Schedule
    step: int = 0  # denoising steps done
    cache: tuple[BranchCache, ...] = ()  # with a step cache: (cond, uncond with guidance)
    partial_steps: tuple[int, ...] = ()  # completed-step counts that send a partial image

    @property
    def guided(self) -> bool:
        return self.conditioning.uncond is not None

    @property
    def num_computed_steps(self) -> list[int]:
        """Per CFG branch: steps that ran the whole denoiser (ImageOutput's field)."""
        if self.cache:
            return [branch.num_computed_steps for branch in self.cache]
        return [self.step] * (2 if self.guided else 1)


class ImageRunner:
    def __init__(self, config: WorkerConfig):
        engine = config.engine
        self.rank = config.rank
        self.device, self.dtype, self.torch_dtype = setup_rank(config)
        self.max_num_seqs = engine.max_num_seqs

        start = time.perf_counter()
        model_dir = Path(engine.model)
        self.denoiser = load_denoiser(model_dir / "transformer", self.torch_dtype, self.device)
        self.weight_bytes = sum(p.numel() * p.element_size()
                                for p in self.denoiser.parameters())
        for module in self.denoiser.modules():  # CPU: repacked weights (see cpu_gemm)
            if hasattr(module, "pack"):
                module.pack(batch_hint=1024)
        name, _ = architecture_of(model_dir)
        self.pipeline = PIPELINES[name](str(model_dir), self.denoiser, self.torch_dtype,
                                        self.device)
        self.scheduler = load_scheduler(model_dir / "scheduler")
        self.load_time_s = time.perf_counter() - start
        self.patch_size = self.denoiser.config.patch_size
        self.requests: dict[str, ImageState] = {}
        self._warm_up(read_model_info(str(model_dir)).details)

    @torch.inference_mode()
    def _warm_up(self, model: ImageModelInfo) -> None:
        """One guided two-step request at the default size before READY, decoded too, so that
        the first real request does not pay for oneDNN's kernels and first-call set-up (the
        text encoders' first calls took 2-3 s on the bench model, 60 ms after)."""
        text = model.conditioning == "text"
        data = DenoiseRequestData("warm-up", "" if text else None, None,
                                  None if text else [0], 1, model.default_height,
                                  model.default_width, 2, 2.0, 0)
        for step in range(2):
            self.execute(DenoiseSchedulerOutput(-1, [data] if step == 0 else [],
                                                [data.request_id], []))

    def runner_info(self) -> ImageRunnerInfo:
        return ImageRunnerInfo(max_num_seqs=self.max_num_seqs)

    # ---- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: DenoiseSchedulerOutput) -> tuple[DenoiseRunnerOutput, list] | None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for data in plan.new_requests:
            self.requests[data.request_id] = self._admit(data)
        scheduled = [self._get(request_id) for request_id in plan.scheduled_request_ids]
        started = time.time()
        partials = self._denoise(scheduled) if scheduled else []
        done = [s for s in scheduled if s.step == s.data.num_steps]
        for state in done:
            del self.requests[state.data.request_id]
        if self.rank != 0:
            return None
        frames: list = []
        refs = [add_array(self.pipeline.decode(s.latents).numpy(), frames) for s in done]
        out = DenoiseRunnerOutput(plan.step_id, [s.data.request_id for s in done], refs,
                                  started, [s.num_computed_steps for s in done],
                                  num_prompt_tokens=[s.conditioning.num_prompt_tokens
                                                     for s in done])
        for state, x0 in partials:
            out.partial_request_ids.append(state.data.request_id)
            out.partial_pixels.append(add_array(self.pipeline.decode(x0).numpy(), frames))
            out.partial_indices.append(state.partial_steps.index(state.step))
        return out, frames

    def _admit(self, data: DenoiseRequestData) -> ImageState:
        if data.request_id in self.requests:
            raise ValueError(f"step plan admits request {data.request_id!r} twice")
        h = data.height // self.pipeline.vae_scale_factor // self.patch_size
        w = data.width // self.pipeline.vae_scale_factor // self.patch_size
        state = ImageState(data, self.pipeline.initial_latents(data),
                           self.pipeline.condition(data),
                           self.scheduler.schedule(data.num_steps, image_seq_len=h * w),
                           partial_steps=tuple(partial_image_steps(data.num_steps,
                                                                   data.partial_images)))
        if data.cache is not None and data.cache.enabled:
            state.cache = tuple(BranchCache.create(data.cache, data.num_steps,
                                                   self.denoiser.teacache_rescale)
                                for _ in range(2 if state.guided else 1))
        return state

    def _get(self, request_id: str) -> ImageState:
        state = planned_state(self.requests, request_id)
        if state.step >= state.data.num_steps:
            raise ValueError(f"request {request_id!r} has no step left")
        return state

    def _denoise(self, scheduled: list[ImageState]) -> list[tuple[ImageState, torch.Tensor]]:
        """One forward and one scheduler update for every row of `scheduled` (one batch key:
        same latent shape, all guided or none). Returns (request, its denoised estimate) for
        the requests whose step this was a partial image's."""
        guided = scheduled[0].guided
        if any(s.guided != guided for s in scheduled):
            raise ValueError("a step mixes guided and unguided requests")
        counts = [s.latents.shape[0] for s in scheduled]
        latents = torch.cat([s.latents for s in scheduled])
        schedules = [s.schedule for s, n in zip(scheduled, counts) for _ in range(n)]
        steps = [s.step for s, n in zip(scheduled, counts) for _ in range(n)]
        timesteps = self.scheduler.timesteps(schedules, steps, device=self.device)
        inputs = [torch.cat(parts) for parts in zip(*(s.conditioning.cond for s in scheduled))]
        if guided:  # conditional and unconditional rows in one forward
            uncond = zip(*(s.conditioning.uncond for s in scheduled))
            inputs = [torch.cat([c, *u]) for c, u in zip(inputs, uncond)]
            cond, free = self.pipeline.predict(
                torch.cat([latents, latents]), torch.cat([timesteps, timesteps]),
                tuple(inputs), self._step_cache(scheduled, counts, 2)).chunk(2)
            scale = torch.tensor([s.data.guidance_scale for s, n in zip(scheduled, counts)
                                  for _ in range(n)], dtype=cond.dtype, device=cond.device)
            output = free + scale.view(-1, 1, 1, 1) * (cond - free)
        else:
            output = self.pipeline.predict(latents, timesteps, tuple(inputs),
                                           self._step_cache(scheduled, counts, 1))
        partials, start = [], 0
        for state, n in zip(scheduled, counts):
            if self.rank == 0 and state.step + 1 in state.partial_steps:  # rank 0 decodes
                rows = slice(start, start + n)
                x0 = self.scheduler.predict_x0(latents[rows], output[rows], schedules[rows],
                                               steps[rows])
                partials.append((state, x0.to(latents.dtype)))
            start += n
        new = self.scheduler.step(latents, output, schedules, steps)
        for state, rows in zip(scheduled, new.split(counts)):
            state.latents = rows
            state.step += 1
        return partials

    @staticmethod
    def _step_cache(scheduled: list[ImageState], counts: list[int],
                    branches: int) -> StepCache | None:
        """The step cache's row groups for the forward's batch [cond rows | uncond rows]:
        one group per request and branch (None when no request uses the cache)."""
        if not any(s.cache for s in scheduled):
            return None
        groups, start = [], 0
        for branch in range(branches):
            for state, n in zip(scheduled, counts):
                groups.append(CacheGroup(start, start + n,
                                         state.cache[branch] if state.cache else None))
                start += n
        return StepCache(groups)
