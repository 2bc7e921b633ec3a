"""Every message that crosses a process boundary.

All structs are `array_like`: on the wire a struct is a msgpack array of its fields in the order
written here, so **field order is the ABI**. Fields are only ever appended, with defaults.
`omit_defaults` drops trailing fields that still hold their default. See `SCHEMA.md` for the
framing and a field-by-field description for writers of clients in other languages.

Two channels:

    client (DEALER) <-> engine core (ROUTER)       HELLO/READY, REQUEST, ABORT, OUTPUTS, ...
    engine core (ROUTER) <-> worker rank r (DEALER) WORKER_READY, STEP, STEP_RESULT, SHUTDOWN

One engine serves one model of one kind (`ModelKind`). What differs by kind is a struct per
kind in a tagged union (the tag, the kind's number, is the first element of its array):

    kind    request         output          step plan (STEP)             step result (STEP_RESULT)
    AR      EngineRequest   EngineOutput    SchedulerOutput              ModelRunnerOutput
    IMAGE   ImageRequest    ImageOutput     DenoiseSchedulerOutput       DenoiseRunnerOutput
    DLLM    EngineRequest   EngineOutput    DiffusionLMSchedulerOutput   DiffusionLMRunnerOutput

A masked-diffusion LM (DLLM) answers text requests as an LLM does: a client sends the same
`EngineRequest` (its `SamplingParams.diffusion` says how to decode) and reads the same
`EngineOutput`s (token ids; one output per committed block), so what serves LLMs serves it.

A kind's structs share the leading names every process reads without knowing the kind
(`request_id`, `priority`, `arrival_time`; `finish_reason`, `error`, `error_kind`; `step_id`).
Arrays (pixels; latents if ever asked for) are not lists of numbers: an `ArrayRef` names an
extra raw frame of the same message (see `arrays.py`).
"""

from __future__ import annotations

import enum

import msgspec

from .sampling import ImageParams, SamplingParams, StepCacheParams

PROTOCOL_VERSION = 3


class ModelKind(enum.IntEnum):
    """What an engine serves; also the tag of each kind's structs."""

    AR = 0  # autoregressive LM: an HF `config.json` with a causal-LM architecture
    IMAGE = 1  # DiT image model: a diffusers pipeline folder (`model_index.json`)
    DLLM = 2  # masked-diffusion LM (LLaDA, Dream): an HF `config.json` of such an architecture

    def __str__(self) -> str:
        return self.name.lower()


class MsgType(enum.IntEnum):
    """Frame 0 of every message: one byte that picks the decoder."""

    # client <-> engine core
    HELLO = 1
    READY = 2
    REQUEST = 3
    ABORT = 4
    OUTPUTS = 5
    PING = 6
    PONG = 7
    GET_STATS = 8
    STATS = 9
    ERROR = 10
    ENGINE_DEAD = 11
    # engine core <-> workers
    WORKER_READY = 20
    STEP = 21
    STEP_RESULT = 22
    SHUTDOWN = 23
    WORKER_ERROR = 24


class FinishReason(enum.IntEnum):
    STOP = 0  # AR: EOS or a stop token id (stop strings are found by the frontend); IMAGE: done
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client
    ERROR = 3  # the engine could not serve it; `error` says why

    def __str__(self) -> str:
        return self.name.lower()


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


_AR, _IMAGE, _DLLM = int(ModelKind.AR), int(ModelKind.IMAGE), int(ModelKind.DLLM)


class ArrayRef(_Msg):
    """An array sent as raw bytes: extra frame `frame` (0 = the first frame after the body),
    C-contiguous, `dtype` a numpy dtype name ("uint8", "float32", ...)."""

    dtype: str
    shape: list[int]
    frame: int


# ---- client <-> engine core -------------------------------------------------------------------


class Hello(_Msg):
    protocol_version: int
    schema_hash: str
    client_name: str = ""


class TokenModelInfo(_Msg, tag=_AR):
    """What a client of an LLM needs: context length, vocabulary, EOS ids."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


class ImageModelInfo(_Msg, tag=_IMAGE):
    """What a client of an image model needs to build a valid request.

    Sizes are in pixels; `size_multiple` = VAE scale factor x the denoiser's patch size.
    `conditioning` is "text" (prompts) or "class" (`class_labels` in [0, num_classes)).
    """

    conditioning: str
    default_height: int
    default_width: int
    size_multiple: int
    max_height: int
    max_width: int
    default_num_steps: int
    default_guidance_scale: float
    num_classes: int = 0
    fixed_size: bool = False  # the denoiser serves its native size only (DiT)


class DiffusionLMModelInfo(_Msg, tag=_DLLM):
    """What a client of a masked-diffusion LM needs: context length, vocabulary, EOS ids, the
    mask token the answer starts as (never a valid prompt token), and the defaults of its
    `DiffusionParams` (per architecture: LLaDA low_confidence, Dream entropy)."""

    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    mask_token_id: int
    remasking: str = "low_confidence"  # DiffusionParams.remasking when a request gives none
    block_length: int = 32  # DiffusionParams.block_length when a request gives none


class ModelInfo(_Msg):
    model: str  # the model path the engine loaded (frontends load tokenizers from it)
    architecture: str  # e.g. LlamaForCausalLM, StableDiffusion3Pipeline, DiTPipeline
    dtype: str
    tensor_parallel_size: int
    details: TokenModelInfo | ImageModelInfo | DiffusionLMModelInfo

    @property
    def kind(self) -> ModelKind:
        return ModelKind(type(self.details).__struct_config__.tag)


class TokenRunnerInfo(_Msg, tag=_AR):
    """What AR workers resolved at start (defaults follow the device)."""

    num_kv_blocks: int
    block_size: int  # tokens per KV-cache block
    max_num_batched_tokens: int  # the step budget


class ImageRunnerInfo(_Msg, tag=_IMAGE):
    """What image workers resolved at start."""

    max_num_seqs: int  # most images in one denoising batch


class DiffusionLMRunnerInfo(_Msg, tag=_DLLM):
    """What masked-diffusion LM workers resolved at start: the paged KV cache that holds the
    K/V of requests decoding with a cache ("prefix" / "dual")."""

    num_kv_blocks: int
    block_size: int  # positions per KV-cache block


RunnerInfo = TokenRunnerInfo | ImageRunnerInfo | DiffusionLMRunnerInfo


class Ready(_Msg):
    protocol_version: int
    schema_hash: str
    model: ModelInfo
    runner: RunnerInfo


class EngineRequest(_Msg, tag=_AR):
    """A generation request to an LLM."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0  # lower value is served first, as in vLLM
    arrival_time: float = 0.0


class ImageRequest(_Msg, tag=_IMAGE):
    """A request for `params.n` images (per class label, for class-conditional models).

    Text-conditioned models take `prompt` (tokenized by the workers with the pipeline's own
    tokenizers, as part of encoding); class-conditioned ones take `class_labels`.
    """

    request_id: str
    prompt: str | None = None
    class_labels: list[int] | None = None
    params: ImageParams = msgspec.field(default_factory=ImageParams)
    priority: int = 0
    arrival_time: float = 0.0


class Abort(_Msg):
    request_ids: list[str]


class TokenLogprobs(_Msg):
    """Logprobs of one generated token: the sampled token first, then the top-N."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # rank of each token in the full distribution (1 = most likely)


class EngineOutput(_Msg, tag=_AR):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str = ""  # set when finish_reason is ERROR; the class name of the error is `error_kind`
    error_kind: str = ""
    # on a request's first output when it asked for `prompt_logprobs`: one entry per prompt
    # position, vLLM's layout: entry 0 is None (the first token has no context), entry i holds
    # prompt token i first, then the top-N, from the model's raw logits at position i - 1
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error_param: str = ""  # the request field the error is about, when there is one


class ImageOutput(_Msg, tag=_IMAGE):
    """An image request's result: `pixels` uint8 [num_images, height, width, 3] (RGB), sent
    once the request is done, or `error`."""

    request_id: str
    finish_reason: FinishReason | None = None
    pixels: ArrayRef | None = None
    num_steps: int = 0  # denoising steps it ran
    error: str = ""
    error_kind: str = ""
    queue_time_s: float = 0.0  # from its arrival to the start of its first denoising step
    error_param: str = ""  # the request field the error is about, when there is one
    # per CFG branch (conditional, then unconditional with guidance): steps that ran the whole
    # denoiser; fewer than num_steps when the step cache skipped some. Empty: not reported.
    num_computed_steps: list[int] = msgspec.field(default_factory=list)
    # A partial image (ImageParams.partial_images): `pixels` hold the decoded denoised estimate
    # after step `num_steps`, finish_reason is None, and the request goes on. Its index counts
    # from 0; a preempted request restarts and sends the same indices again.
    partial_image_index: int | None = None
    # the prompt's tokens as the first text encoder's tokenizer splits them (class-conditional
    # models: the class labels); on finished outputs
    num_prompt_tokens: int = 0


class EngineOutputs(_Msg):
    """One message per engine step per client: every output for that client's requests."""

    outputs: list[EngineOutput | ImageOutput]
    timestamp: float = 0.0


class TokenStats(_Msg, tag=_AR):
    num_waiting: int
    num_running: int
    kv_usage: float
    num_kv_blocks: int
    prefix_cache_hit_rate: float
    generation_tokens_per_s: float  # over the last 10 s
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int = 0


class ImageStats(_Msg, tag=_IMAGE):
    num_waiting: int
    num_running: int
    images_per_s: float  # over the last 10 s
    images_total: int
    denoising_steps_total: int  # request-steps: one request advanced by one step
    num_preemptions: int = 0


class DiffusionLMStats(_Msg, tag=_DLLM):
    num_waiting: int
    num_running: int
    kv_usage: float
    num_kv_blocks: int
    generation_tokens_per_s: float  # committed tokens sent, over the last 10 s
    prompt_tokens_total: int
    generation_tokens_total: int
    denoising_steps_total: int  # request-steps: one request advanced by one step


class Stats(_Msg):
    """The scheduler's own figures, and the engine loop's step timing."""

    scheduler: TokenStats | ImageStats | DiffusionLMStats
    num_steps_total: int = 0
    step_time_s: float = 0.0  # mean time between step results while busy, last 10 s


class ErrorMsg(_Msg):
    """An error that is not tied to one request's outputs (bad HELLO, a message before HELLO,
    an undecodable message, PING while shutting down). `reply_to` is the type of the message
    it answers (0: unknown), so a client can hand it to whoever waits for that reply."""

    kind: str
    message: str
    request_id: str = ""
    reply_to: int = 0


class EngineDeadMsg(_Msg):
    reason: str


# ---- engine core <-> workers ------------------------------------------------------------------


class WorkerReady(_Msg):
    rank: int
    weight_bytes: int  # bytes of this rank's parameters (about 1/N of the model under TP)
    dtype: str  # the dtype the worker resolved "auto" to
    device: str  # e.g. "cpu", "cuda:0"
    runner: RunnerInfo


class NewRequestData(_Msg):
    """A request the worker has not seen (or sees again after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt, plus tokens generated before a preemption
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # tokens already in the KV cache (prefix-cache hits)
    num_prompt_tokens: int = 0


class CachedRequestData(_Msg):
    """A request the worker already holds: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(_Msg, tag=_AR):
    """The AR step plan: what every worker computes this step.

    For each scheduled request, `num_scheduled_tokens[request_id]` tokens starting at its
    `num_computed_tokens` are run through the model. A request whose tokens then all have KV
    (computed == len(token_ids)) samples one new token; a partial prefill chunk does not.
    """

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    finished_request_ids: list[str]
    total_num_scheduled_tokens: int = 0


class DenoiseRequestData(_Msg):
    """An image request as the workers run it: every default resolved by the engine core,
    the seed included, so that all ranks draw the same noise."""

    request_id: str
    prompt: str | None
    negative_prompt: str | None
    class_labels: list[int] | None
    num_images: int  # rows of latents: n per prompt, or n per class label
    height: int
    width: int
    num_steps: int
    guidance_scale: float  # classifier-free guidance runs when > 1, as in diffusers
    seed: int
    cache: StepCacheParams | None = None  # the step cache it runs with (the server default
    # resolved; never type "none")
    partial_images: int = 0  # ImageParams.partial_images: at `partial_image_steps`


class DenoiseSchedulerOutput(_Msg, tag=_IMAGE):
    """The IMAGE step plan: requests to admit (encode their prompt, draw their noise), then
    one denoising step for each of `scheduled_request_ids`, every request at its own step
    index (the worker counts them). All scheduled requests share a batch key (size, CFG on or
    off). A request that completes its last step is decoded by the VAE in the same step and
    dropped by the workers; `finished_request_ids` are requests to drop before anything else
    (aborted or preempted)."""

    step_id: int
    new_requests: list[DenoiseRequestData]
    scheduled_request_ids: list[str]
    finished_request_ids: list[str]


class DiffusionLMRequestData(_Msg):
    """A masked-diffusion request as the workers run it, sent once (later steps name it by
    id): every default resolved by the engine core (`sampling.diffusion` complete, the seed
    set, so that all ranks draw alike). `block_ids`: its paged KV blocks, which hold
    `len(prompt_token_ids) + gen_length` positions, when it decodes with a cache (else
    empty)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    gen_length: int  # masked positions after the prompt: whole blocks of the block length
    block_ids: list[int] = msgspec.field(default_factory=list)


class DiffusionLMSchedulerOutput(_Msg, tag=_DLLM):
    """The DLLM step plan: requests to admit, then ONE denoising step for each of
    `scheduled_request_ids`, every request at its own block and step (the workers count
    them). `finished_request_ids` are requests to drop before anything else (stopped early
    or aborted); a request whose last block the step commits is dropped by the workers."""

    step_id: int
    new_requests: list[DiffusionLMRequestData]
    scheduled_request_ids: list[str]
    finished_request_ids: list[str]


class ModelRunnerOutput(_Msg, tag=_AR):
    """What rank 0 returns for an AR step: one sampled token per request that sampled."""

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    # request id -> logprobs of the prompt positions whose logits this step computed, in order:
    # for a request scheduled from `num_computed_tokens` c (the plan's value), prompt positions
    # c + 1, c + 2, ... (< num_prompt_tokens); absent for requests that did not ask
    prompt_logprobs: dict[str, list[TokenLogprobs]] | None = None


class DenoiseRunnerOutput(_Msg, tag=_IMAGE):
    """What rank 0 returns for an IMAGE step: the pixels of every request that finished."""

    step_id: int
    request_ids: list[str]
    pixels: list[ArrayRef]  # one per finished request, uint8 [num_images, height, width, 3]
    denoise_started_at: float = 0.0  # wall clock when the step's denoiser forward began
    # one per finished request, same order: ImageOutput.num_computed_steps
    num_computed_steps: list[list[int]] = msgspec.field(default_factory=list)
    # Partial images taken this step, same order in each list: request, pixels (uint8
    # [num_images, height, width, 3]), partial image index
    partial_request_ids: list[str] = msgspec.field(default_factory=list)
    partial_pixels: list[ArrayRef] = msgspec.field(default_factory=list)
    partial_indices: list[int] = msgspec.field(default_factory=list)
    # one per finished request, same order: ImageOutput.num_prompt_tokens
    num_prompt_tokens: list[int] = msgspec.field(default_factory=list)


class DiffusionLMRunnerOutput(_Msg, tag=_DLLM):
    """What rank 0 returns for a DLLM step: the tokens of each block the step committed (at
    most one per request: a block is committed when its last masked position is), in the
    order of `request_ids`. A committed block never changes again."""

    step_id: int
    request_ids: list[str]
    block_token_ids: list[list[int]]


class WorkerError(_Msg):
    """A worker-side failure (at start: step_id -1); the engine core fails cleanly on it."""

    step_id: int
    error: str  # the traceback


class Shutdown(_Msg):
    reason: str = ""


class Empty(_Msg):
    """The body of PING, PONG and GET_STATS."""


CLIENT_MESSAGES: dict[MsgType, type] = {
    MsgType.HELLO: Hello,
    MsgType.READY: Ready,
    MsgType.REQUEST: EngineRequest | ImageRequest,
    MsgType.ABORT: Abort,
    MsgType.OUTPUTS: EngineOutputs,
    MsgType.PING: Empty,
    MsgType.PONG: Empty,
    MsgType.GET_STATS: Empty,
    MsgType.STATS: Stats,
    MsgType.ERROR: ErrorMsg,
    MsgType.ENGINE_DEAD: EngineDeadMsg,
}

WORKER_MESSAGES: dict[MsgType, type] = {
    MsgType.WORKER_READY: WorkerReady,
    MsgType.STEP: SchedulerOutput | DenoiseSchedulerOutput | DiffusionLMSchedulerOutput,
    MsgType.STEP_RESULT: ModelRunnerOutput | DenoiseRunnerOutput | DiffusionLMRunnerOutput,
    MsgType.SHUTDOWN: Shutdown,
    MsgType.WORKER_ERROR: WorkerError,
}

# The kinds' structs, by the role they play (the engine and worker loops never look inside).
Request = EngineRequest | ImageRequest
Output = EngineOutput | ImageOutput
StepPlan = SchedulerOutput | DenoiseSchedulerOutput | DiffusionLMSchedulerOutput
StepResult = ModelRunnerOutput | DenoiseRunnerOutput | DiffusionLMRunnerOutput
SchedulerStats = TokenStats | ImageStats | DiffusionLMStats
