"""`DenoiseScheduler`: continuous batching of image requests across denoising steps.

One rule, as for tokens: each request's `num_completed_steps` catches up with its `num_steps`,
one step per engine step in which it is scheduled. A step runs ONE denoiser forward over a
batch of requests that share a batch key (height, width, CFG on or off), every request at its
own step index; a request that arrives while a step runs joins at the next step boundary.

    waiting ──admit──► running ──(its last step's result: pixels)──► finished
       ▲                  │
       └── PREEMPTED ◄────┘ (a higher-priority request needs its place; it restarts from its
                             seed, so its image is the same)

    step k:    key A: r1(step 12/28) r2(step 3/28) r4(step 0/28, joined now)
    step k+1:  key B: r3(step 7/50)                 keys with work take turns
    step k+2:  key A: r1(13) r2(4) r4(1)

Invariants:
- `running` holds at most `max_num_seqs` images (n per request), so any key's whole batch fits
  one forward; every running request has been sent to the workers in some plan's
  `new_requests`, and the workers hold its latents until it finishes, is aborted or preempted
  (then its id goes into the next plan's `finished_request_ids`).
- Like `num_computed_tokens`, `num_completed_steps` counts scheduled steps: it runs one step
  ahead of the workers. A request whose last step is in flight is not scheduled again, nor
  preempted; the result of that step carries its pixels.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from zomni.proto import (
    ArrayRef,
    DenoiseRequestData,
    DenoiseRunnerOutput,
    DenoiseSchedulerOutput,
    EngineConfig,
    FinishReason,
    ImageModelInfo,
    ImageOutput,
    ImageRequest,
    ImageRunnerInfo,
    ImageStats,
    InvalidRequest,
    StepCacheParams,
    ZomniError,
)
from zomni.proto.sampling import partial_image_steps

from .request import RequestStatus
from .request_queue import RequestQueue
from .scheduler_common import RecentRate, check_can_queue, take_out
from .scheduler_interface import Outputs


@dataclass(eq=False)
class DenoiseRequest:
    """One image request as the scheduler tracks it (never on the wire: `data` is)."""

    request_id: str
    client_id: bytes  # ZMQ identity of the frontend that sent it
    data: DenoiseRequestData  # every default resolved; what the workers run
    priority: int = 0
    arrival_time: float = 0.0
    num_completed_steps: int = 0  # scheduled steps, see the module docstring
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_step_time: float = 0.0  # wall clock when its first denoising step began

    @property
    def num_steps(self) -> int:
        return self.data.num_steps

    @property
    def num_images(self) -> int:
        return self.data.num_images

    @property
    def batch_key(self) -> tuple[int, int, bool]:
        """Requests batch together when their latents have one shape and their forward the
        same rows (conditional only, or conditional + unconditional)."""
        return self.data.height, self.data.width, self.data.guidance_scale > 1.0

    @property
    def schedulable(self) -> bool:
        return self.num_completed_steps < self.num_steps


class DenoiseScheduler:
    def __init__(self, config: EngineConfig, model: ImageModelInfo, runner: ImageRunnerInfo):
        self.config = config
        self.model = model
        # A step takes ~0.1-1 s, the engine's own work ~1 ms: planning one step ahead gains
        # nothing, and a request arriving mid-step would wait a whole extra step to join.
        self.max_plans_in_flight = 2 if config.async_scheduling else 1
        self.max_batch_images = runner.max_num_seqs
        self.requests: dict[str, DenoiseRequest] = {}  # every unfinished request
        self.waiting = RequestQueue()
        self.running: list[DenoiseRequest] = []  # admission order
        self.finished_req_ids: list[str] = []  # for the next plan's finished_request_ids
        self.step_id = 0
        self.num_preemptions = 0
        self._last_key: tuple[int, int, bool] | None = None
        self._seeds = random.Random(config.seed)  # for requests that bring no seed
        # for requests that bring no `cache` (checked when the config was built)
        self.default_cache = StepCacheParams.from_json(config.step_cache) \
            if config.step_cache else None
        self._finished_images = RecentRate()
        self.images_total = 0
        self.denoising_steps_total = 0

    # ---- requests in and out --------------------------------------------------------------

    def add_request(self, request: ImageRequest, client_id: bytes) -> None:
        if not isinstance(request, ImageRequest):
            raise InvalidRequest("this engine serves an image model: send an ImageRequest",
                                 param="model")
        check_can_queue(request.request_id, self.requests, self.waiting,
                        self.config.max_waiting_requests)
        data = self._resolve(request)
        if data.num_images > self.max_batch_images:
            raise InvalidRequest(f"the request asks for {data.num_images} images; this engine "
                                 f"batches at most {self.max_batch_images} (max_num_seqs)",
                                 param="n")
        req = DenoiseRequest(request.request_id, client_id, data, request.priority,
                             request.arrival_time or time.time())
        self.requests[req.request_id] = req
        self.waiting.push(req)

    def _resolve(self, req: ImageRequest) -> DenoiseRequestData:
        """The request with the model's defaults filled in, checked against the model."""
        m, p = self.model, req.params
        if m.conditioning == "class":
            if req.prompt is not None or p.negative_prompt is not None:
                raise InvalidRequest("this model is class-conditional: give class_labels, "
                                     "not a prompt", param="prompt")
            if not req.class_labels:
                raise InvalidRequest("class_labels is required for a class-conditional model",
                                     param="class_labels")
            if not all(0 <= c < m.num_classes for c in req.class_labels):
                raise InvalidRequest(f"class_labels must be in [0, {m.num_classes})",
                                     param="class_labels")
            num_images = p.n * len(req.class_labels)
        else:
            if req.class_labels is not None:
                raise InvalidRequest("this model is text-conditioned: give a prompt, not "
                                     "class_labels", param="class_labels")
            if req.prompt is None:
                raise InvalidRequest("prompt is required", param="prompt")
            num_images = p.n
        height = p.height or m.default_height
        width = p.width or m.default_width
        for name, value, largest in (("height", height, m.max_height),
                                     ("width", width, m.max_width)):
            if m.fixed_size and value != largest:
                raise InvalidRequest(f"this model generates {m.default_width}x"
                                     f"{m.default_height} images only", param="size")
            if value % m.size_multiple or not m.size_multiple <= value <= largest:
                raise InvalidRequest(
                    f"{name} {value} must be a multiple of {m.size_multiple} (the VAE's scale "
                    f"factor x the patch size) in [{m.size_multiple}, {largest}]", param="size")
        guidance = m.default_guidance_scale if p.guidance_scale is None else p.guidance_scale
        if p.negative_prompt is not None and guidance <= 1.0:
            raise InvalidRequest("negative_prompt needs classifier-free guidance "
                                 f"(guidance_scale > 1, got {guidance})", param="negative_prompt")
        seed = p.seed if p.seed is not None else self._seeds.randrange(2**63)
        cache = p.cache if p.cache is not None else self.default_cache
        return DenoiseRequestData(
            request_id=req.request_id, prompt=req.prompt, negative_prompt=p.negative_prompt,
            class_labels=req.class_labels, num_images=num_images, height=height, width=width,
            num_steps=p.num_inference_steps or m.default_num_steps, guidance_scale=guidance,
            seed=seed, cache=cache if cache is not None and cache.enabled else None,
            partial_images=p.partial_images)

    def abort_requests(self, request_ids: Sequence[str]) -> Outputs:
        outputs: Outputs = defaultdict(list)
        for request in take_out(request_ids, self.requests, self.running, self.waiting):
            if request.status == RequestStatus.RUNNING:  # the workers hold its latents
                self.finished_req_ids.append(request.request_id)
            del self.requests[request.request_id]
            request.status = RequestStatus.FINISHED_ABORTED
            outputs[request.client_id].append(ImageOutput(request.request_id,
                                                          FinishReason.ABORT))
        return dict(outputs)

    def error_output(self, request_id: str, error: ZomniError) -> ImageOutput:
        return ImageOutput(request_id, FinishReason.ERROR, error=error.message,
                           error_kind=type(error).__name__, error_param=error.param or "")

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_stats(self) -> ImageStats:
        return ImageStats(num_waiting=len(self.waiting), num_running=len(self.running),
                          images_per_s=self._finished_images.per_s(),
                          images_total=self.images_total,
                          denoising_steps_total=self.denoising_steps_total,
                          num_preemptions=self.num_preemptions)

    # ---- schedule -------------------------------------------------------------------------

    def schedule(self) -> DenoiseSchedulerOutput | None:
        """Admit what fits, then one step for every running request of the next batch key."""
        new_requests = self._admit()
        key = self._next_key()
        scheduled = [r for r in self.running if r.batch_key == key and r.schedulable]
        for request in scheduled:
            request.num_completed_steps += 1
        if not (new_requests or scheduled or self.finished_req_ids):
            return None
        self._last_key = key
        self.step_id += 1
        finished, self.finished_req_ids = self.finished_req_ids, []
        return DenoiseSchedulerOutput(
            step_id=self.step_id, new_requests=new_requests,
            scheduled_request_ids=[r.request_id for r in scheduled],
            finished_request_ids=finished)

    def _admit(self) -> list[DenoiseRequestData]:
        """Waiting requests in (priority, arrival) order while their images fit; the head
        waits when it does not (nothing overtakes it) unless it can preempt."""
        admitted: list[DenoiseRequestData] = []
        used = sum(r.num_images for r in self.running)
        while self.waiting:
            head = self.waiting.peek()
            if used + head.num_images > self.max_batch_images:
                victim = self._victim(head)
                if victim is None:
                    break
                used -= victim.num_images
                self._preempt(victim)
                continue
            self.waiting.pop()
            head.status = RequestStatus.RUNNING
            self.running.append(head)
            used += head.num_images
            admitted.append(head.data)
        return admitted

    def _victim(self, head: DenoiseRequest) -> DenoiseRequest | None:
        """The running request to preempt for `head`: of strictly lower priority, the latest
        of the lowest; never one whose last step is in flight."""
        candidates = [r for r in self.running if r.priority > head.priority and r.schedulable]
        return max(candidates, key=lambda r: (r.priority, r.arrival_time), default=None)

    def _preempt(self, request: DenoiseRequest) -> None:
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        request.num_completed_steps = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.finished_req_ids.append(request.request_id)
        self.waiting.push(request)

    def _next_key(self) -> tuple[int, int, bool] | None:
        """Batch keys with work take turns, in the order they first appeared."""
        keys = list(dict.fromkeys(r.batch_key for r in self.running if r.schedulable))
        if not keys:
            return None
        if self._last_key in keys:
            return keys[(keys.index(self._last_key) + 1) % len(keys)]
        return keys[0]

    # ---- update ---------------------------------------------------------------------------

    def update_from_output(self, plan: DenoiseSchedulerOutput, result: DenoiseRunnerOutput,
                           frames: Sequence = ()) -> Outputs:
        """Finish every request whose pixels came back; `ImageOutput.pixels` point at this
        result's `frames` (the engine renumbers them per client)."""
        self.denoising_steps_total += len(plan.scheduled_request_ids)
        for request_id in plan.scheduled_request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.first_step_time:
                request.first_step_time = result.denoise_started_at or time.time()
        outputs: Outputs = defaultdict(list)
        for request_id, pixels, index in zip(result.partial_request_ids, result.partial_pixels,
                                             result.partial_indices):
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                outputs[request.client_id].append(ImageOutput(
                    request_id, None, ArrayRef(pixels.dtype, list(pixels.shape), pixels.frame),
                    num_steps=partial_image_steps(request.num_steps,
                                                  request.data.partial_images)[index],
                    partial_image_index=index))
        computed = result.num_computed_steps or [[] for _ in result.request_ids]
        prompt_tokens = result.num_prompt_tokens or [0] * len(result.request_ids)
        for request_id, pixels, num_computed, num_prompt_tokens in zip(
                result.request_ids, result.pixels, computed, prompt_tokens):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted after the plan was made
            self.running.remove(request)
            del self.requests[request_id]
            request.status = RequestStatus.FINISHED_STOPPED
            outputs[request.client_id].append(ImageOutput(
                request_id, FinishReason.STOP,
                ArrayRef(pixels.dtype, list(pixels.shape), pixels.frame),
                num_steps=request.num_steps,
                queue_time_s=max(0.0, request.first_step_time - request.arrival_time),
                num_computed_steps=num_computed, num_prompt_tokens=num_prompt_tokens))
            self.images_total += request.num_images
            self._finished_images.add(request.num_images)
        return dict(outputs)
