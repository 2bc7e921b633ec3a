"""Every message that crosses a process boundary.

All structs are `array_like`: on the wire a struct is a msgpack array of its fields in the order
written here, so **field order is the ABI**. Fields are only ever appended, with defaults.
`omit_defaults` drops trailing fields that still hold their default. See `SCHEMA.md` for the
framing and a field-by-field description for writers of clients in other languages.

Two channels:

    client (DEALER) <-> engine core (ROUTER)       HELLO/READY, REQUEST, ABORT, OUTPUTS, ...
    engine core (ROUTER) <-> worker rank r (DEALER) WORKER_READY, STEP, STEP_RESULT, SHUTDOWN
"""

from __future__ import annotations

import enum

import msgspec

from .sampling import SamplingParams

PROTOCOL_VERSION = 1


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


class FinishReason(enum.IntEnum):
    STOP = 0  # EOS or a stop token id (stop strings are found by the frontend)
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client
    ERROR = 3  # the engine could not serve it; `error` says why

    def __str__(self) -> str:
        return self.name.lower()


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    pass


# ---- client <-> engine core -------------------------------------------------------------------


class Hello(_Msg):
    protocol_version: int
    schema_hash: str
    client_name: str = ""


class ModelInfo(_Msg):
    model: str
    architecture: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    tensor_parallel_size: int = 1


class Ready(_Msg):
    protocol_version: int
    schema_hash: str
    model: ModelInfo
    num_kv_blocks: int
    block_size: int


class EngineRequest(_Msg):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0  # lower value is served first, as in vLLM
    arrival_time: float = 0.0


class Abort(_Msg):
    request_ids: list[str]


class TokenLogprobs(_Msg):
    """Logprobs of one generated token: the sampled token first, then the top-N."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]  # rank of each token in the full distribution (1 = most likely)


class EngineOutput(_Msg):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str = ""  # set when finish_reason is ERROR; the class name of the error is `error_kind`
    error_kind: str = ""


class EngineOutputs(_Msg):
    """One message per engine step per client: every output for that client's requests."""

    outputs: list[EngineOutput]
    timestamp: float = 0.0


class Stats(_Msg):
    num_waiting: int
    num_running: int
    kv_usage: float
    num_kv_blocks: int
    prefix_cache_hit_rate: float
    generation_tokens_per_s: float
    prompt_tokens_total: int
    generation_tokens_total: int
    num_preemptions: int = 0


class ErrorMsg(_Msg):
    """An error that is not tied to one request (bad HELLO, undecodable message)."""

    kind: str
    message: str
    request_id: str = ""


class EngineDeadMsg(_Msg):
    reason: str


# ---- engine core <-> workers ------------------------------------------------------------------


class WorkerReady(_Msg):
    rank: int
    num_kv_blocks: int
    weight_bytes: int  # bytes of this rank's parameters (about 1/N of the model under TP)
    dtype: str  # the dtype the worker resolved "auto" to
    max_num_batched_tokens: int  # the step budget it resolved (default per device)
    block_size: int = 16  # tokens per KV-cache block it resolved (default per device)


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


class SchedulerOutput(_Msg):
    """The step plan: what every worker computes this step.

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


class ModelRunnerOutput(_Msg):
    """What rank 0 returns for a step: one sampled token per request that sampled."""

    step_id: int
    request_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    error: str = ""  # a worker-side failure; the engine core fails cleanly on it


class Shutdown(_Msg):
    reason: str = ""


class Empty(_Msg):
    """The body of PING, PONG and GET_STATS."""


CLIENT_MESSAGES: dict[MsgType, type] = {
    MsgType.HELLO: Hello,
    MsgType.READY: Ready,
    MsgType.REQUEST: EngineRequest,
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
    MsgType.STEP: SchedulerOutput,
    MsgType.STEP_RESULT: ModelRunnerOutput,
    MsgType.SHUTDOWN: Shutdown,
}
