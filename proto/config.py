"""Process configurations: plain validated structs, filled from flags and `ZOMNI_*` variables.

They are msgspec structs so a parent can hand a child process its configuration as JSON on the
command line (no pickle), and so a process started by hand reads the same fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec

from .errors import InvalidRequest


class EngineConfig(msgspec.Struct, kw_only=True):
    """Everything the engine core and its workers need; printed once at start."""

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None
    block_size: int | None = None  # None: `default_block_size`
    kv_cache_memory_gb: float = 2.0  # per worker; the number of blocks follows from it
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_gb (tests use it)
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None  # None: `default_max_num_batched_tokens`
    max_waiting_requests: int = 4096
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # plan step N+1 while the workers run step N
    online: bool = False  # requests arrive over time (serve, AsyncLLM): defaults favour latency
    seed: int = 0
    listen: str = ""  # ROUTER address for clients; a fresh ipc:// path when empty
    num_threads: int | None = None  # torch threads per worker; all cores when None

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "block_size", "max_num_seqs",
                     "max_num_batched_tokens", "max_waiting_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1", param=name)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequest(f"unknown dtype {self.dtype!r}", param="dtype")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidRequest(f"unknown device {self.device!r}", param="device")
        if not (Path(self.model) / "config.json").is_file():
            raise InvalidRequest(f"no config.json in model directory {self.model!r}",
                                 param="model")

    @classmethod
    def from_env(cls, **overrides) -> EngineConfig:
        return from_env(cls, **overrides)

    def hf_config(self) -> dict:
        with open(Path(self.model) / "config.json") as f:
            return json.load(f)


def default_max_num_batched_tokens(device_type: str, online: bool) -> int:
    """The step token budget when none is given, for the device the workers run on.

    A step's matmuls stay compute-bound from ~128 tokens on a CPU, so there the budget trades
    TTFT against per-step overhead. Online, small steps let arriving prompts start sooner and
    keep decodes moving, but a step should still hold the running decodes and a whole typical
    prompt: split over two steps, a prompt costs an extra step for every request waiting on it.
    Workload W (128-token prompts) at concurrency 16 on 2 cores, fresh servers, two runs each:
    128 tokens gave 861-883 tok/s and TTFT p50 183-189 ms, 192 gave 956-994 and 199-205 ms, 256
    918-1002 and 221-254 ms, 512 985-998 and 321 ms; inter-token latency p50 fell from 12.6-13.1
    to 11.4-12.1 ms from 128 to 192. 1024-token prompts at concurrency 4: TTFT p50 533-547 ms at
    128, 537 at 192. Offline, where only throughput counts, 256 was ~15% slower than 1024. GPUs
    take vLLM's defaults.
    """
    if device_type != "cpu":
        return 2048 if online else 8192
    return 192 if online else 1024


def default_block_size(device_type: str) -> int:
    """Tokens per KV-cache block when none is given, for the device the workers run on.

    On a CPU, decode attention streams each request's blocks from memory, and short runs
    stream slowly (see workers/csrc/paged_attention.c): 64-token blocks read ~1.5x faster than
    16-token ones at batch 64 (`small` shape), ~1.9x on the Qwen3-0.6B shape; 128 was no
    faster than 64. Prefix-cache hits come in whole blocks, so smaller stays better elsewhere.
    GPUs take vLLM's 16.
    """
    return 64 if device_type == "cpu" else 16


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
