"""Process configurations: plain validated structs, filled from flags and `ZOMNI_*` variables.

They are msgspec structs so a parent can hand a child process its configuration as JSON on the
command line (no pickle), and so a process started by hand reads the same fields.
"""

from __future__ import annotations

import math
import os

import msgspec

from .errors import InvalidRequest
from .keys import check_server_keys
from .messages import ModelKind
from .model_info import model_kind
from .sampling import StepCacheParams


class EngineConfig(msgspec.Struct, kw_only=True):
    """Everything the engine core and its workers need; printed once at start.

    Fields marked LLM apply to LLMs (AR, and masked-diffusion LMs unless marked AR): given for
    a model they do not apply to they are an error, not silently ignored. None means "the
    workers' default for their device" (`zomni.workers.device`), which they report in
    WORKER_READY.
    """

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # LLM
    block_size: int | None = None  # LLM: tokens per KV-cache block
    kv_cache_memory_gb: float | None = None  # LLM, per worker (2 GiB); sets the block count
    num_kv_blocks: int | None = None  # LLM: overrides kv_cache_memory_gb (tests use it)
    max_num_seqs: int = 128  # LLM: sequences running at once; image: images in one batch
    max_num_batched_tokens: int | None = None  # LLM (AR): the step's token budget
    max_waiting_requests: int = 4096
    enable_prefix_caching: bool | None = None  # LLM (AR; on by default)
    # plan step N+1 while the workers run step N; None: the kind's default (the scheduler's
    # `max_plans_in_flight`): on for LLMs, off for image models; masked-diffusion LMs refuse it
    async_scheduling: bool | None = None
    online: bool = False  # requests arrive over time (serve, AsyncLLM): defaults favour latency
    seed: int = 0
    listen: str = ""  # ROUTER address for clients; a fresh ipc:// path when empty
    num_threads: int | None = None  # torch threads per worker; all cores when None
    # Watchdog: a step whose result takes longer than this (from when the workers could start
    # it) means a hung worker; the engine fails every request with EngineDead and exits. As
    # SGLang's --watchdog-timeout and vLLM's execute-model timeout: 300 s, far above any
    # real step (an AR step is milliseconds; an image step on a CPU seconds, its first one,
    # which also encodes prompts and decodes with the VAE, tens of seconds). The AR runner
    # warms up before WORKER_READY, so no first step pays a compilation.
    step_timeout_s: float = 300.0
    # On SIGTERM / SIGINT: refuse new requests (EngineDead "shutting down"), let requests in
    # flight finish for up to this long, end the rest with EngineDead, exit. 5 s fits within
    # `docker stop`'s 10 s and Kubernetes' 30 s defaults; 0 ends them at once.
    drain_timeout_s: float = 5.0
    # ZMQ CURVE on the client socket: a directory from `zomni keys generate DIR` holding
    # server.key_secret (and optionally clients/*.key: then only those clients may connect).
    curve_keys_dir: str | None = None
    # Image models: the step cache of requests that bring no `cache` of their own, as the same
    # JSON, e.g. '{"type": "fbcache", "threshold": 0.08}' (see `StepCacheParams`); None: off.
    # LLMs ignore it, so one `zomni serve` flag set can start both kinds.
    step_cache: str | None = None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_waiting_requests", "num_kv_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1", param=name)
        if self.kv_cache_memory_gb is not None and not (
                math.isfinite(self.kv_cache_memory_gb) and self.kv_cache_memory_gb > 0):
            raise InvalidRequest("kv_cache_memory_gb must be positive", param="kv_cache_memory_gb")
        if not (math.isfinite(self.step_timeout_s) and self.step_timeout_s > 0):
            raise InvalidRequest("step_timeout_s must be a positive number of seconds, got "
                                 f"{self.step_timeout_s}", param="step_timeout_s")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise InvalidRequest("drain_timeout_s must be a non-negative number of seconds, "
                                 f"got {self.drain_timeout_s}", param="drain_timeout_s")
        if self.step_cache is not None:
            StepCacheParams.from_json(self.step_cache, param="step_cache")  # refused here, early
        if self.curve_keys_dir is not None:
            check_server_keys(self.curve_keys_dir)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequest(f"unknown dtype {self.dtype!r}", param="dtype")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidRequest(f"unknown device {self.device!r}", param="device")
        kind = model_kind(self.model)  # raises for a folder that is neither kind
        if kind == ModelKind.DLLM and self.async_scheduling:
            raise InvalidRequest("async_scheduling: a masked-diffusion LM plans one step at a "
                                 "time (whether a request takes another step depends on the "
                                 "last one)", param="async_scheduling")
        for name in refused_fields(kind):
            if getattr(self, name) is not None:
                what = "LLMs" if name not in AR_ONLY_FIELDS else "autoregressive LLMs"
                article = "an" if str(kind)[0] in "aei" else "a"
                raise InvalidRequest(f"{name} applies to {what}; {self.model!r} is {article} "
                                     f"{kind} model", param=name)

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        return from_env(cls, **overrides)


LLM_ONLY_FIELDS = ("max_model_len", "block_size", "kv_cache_memory_gb", "num_kv_blocks",
                   "max_num_batched_tokens", "enable_prefix_caching")
# A masked-diffusion step runs every request's window whole (no token budget to split it),
# and its K/V depends on every position after it too, so none is reused across requests.
AR_ONLY_FIELDS = ("max_num_batched_tokens", "enable_prefix_caching")


def refused_fields(kind: ModelKind) -> tuple[str, ...]:
    """The EngineConfig fields a model of `kind` refuses when they are set."""
    return {ModelKind.AR: (), ModelKind.IMAGE: LLM_ONLY_FIELDS,
            ModelKind.DLLM: AR_ONLY_FIELDS}[kind]


class WorkerConfig(msgspec.Struct, kw_only=True):
    """One worker's share of the engine config, plus where to find its peers."""

    engine: EngineConfig
    rank: int
    engine_address: str  # the engine core's worker ROUTER
    dist_init_method: str = ""  # torch.distributed rendezvous, e.g. tcp://127.0.0.1:PORT
    max_model_len: int = 0  # resolved by the engine core


def from_env(cls: type, **overrides):
    """A `cls` config from `ZOMNI_<FIELD>` environment variables, then explicit overrides."""
    values = {}
    for field in cls.__struct_fields__:
        raw = os.environ.get(f"ZOMNI_{field.upper()}")
        if raw is not None:
            values[field] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    return msgspec.convert(values, cls, strict=False)


def to_json(cfg: msgspec.Struct) -> str:
    return msgspec.json.encode(cfg).decode()


def from_json(data: str | bytes, cls: type):
    return msgspec.json.decode(data, type=cls)
