"""Device, dtype, memory and CPU-thread policy of the workers: one place for what depends on
the machine rather than on the model.

    worker_env()                   the environment a worker process starts with (OpenMP, malloc)
    resolve_device / set_threads   which device a rank runs on; torch threads on the CPU
    resolve_dtype                  what "auto" means on this machine, for this checkpoint
    setup_rank                     all three for a runner, as every kind's runner starts
    default_* budgets              step budget and KV block size when the user gives none
    kv_cache_blocks                how many KV blocks a rank allocates
    zeros / populate               large CPU buffers that fault in cheaply, off the step path

torch is imported inside the functions that use it: the engine core imports this module for
`worker_env` (it starts the workers) and must stay free of torch.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from zomni.proto import WorkerConfig

logger = logging.getLogger("zomni.worker")

# glibc malloc for workers: transparent huge pages, and freed memory kept for reuse
_MALLOC_TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_threshold": str(32 * 2**20),  # the most glibc allows
    "glibc.malloc.trim_threshold": str(2**40),
}


def worker_env() -> dict[str, str]:
    """The workers' environment: OpenMP threads that spin only briefly when idle, and a malloc
    that keeps activations for reuse (on huge pages). The user's own settings win.

    A spinning OpenMP thread holds its core while it waits. With more threads than free cores
    (the engine core, a frontend, or another job awake) a long-spinning team collapses: on a
    shared 2-core machine W ran at 94 tok/s with GOMP's default spin, 289 with passive waits.
    Passive waits cost the quiet case instead (W: 624 vs 708 tok/s); a short spin keeps the
    quiet speed (711) and bounds what an idle worker steals.

    Huge pages (glibc >= 2.35 madvises its heap and mmaps; kernels in THP "madvise" mode honour
    it, older glibc ignores the tunables) paid ~14% on W while the KV cache came from malloc.
    It now has its own mmap (`zeros` below), and the setting measures neutral (W 1826 /
    1454 / 1472 tok/s with it, 1693 / 1488 / 1546 without, paired).

    By default glibc serves each step's large activations (up to tens of MB) with fresh mmaps
    or trims them back to the kernel, which then clears new pages every step (clear_page was
    the top kernel symbol): a 2048-token prefill step took ~480 instead of ~390 ms, and W ran
    at 1211-1361 instead of 1447-1689 tok/s. Allocations under 32 MiB now stay in the heap,
    which is never trimmed.
    """
    env = dict(os.environ)
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", "10000")
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    given = {t.split("=")[0] for t in tunables}
    tunables += [f"{k}={v}" for k, v in _MALLOC_TUNABLES.items() if k not in given]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def resolve_device(device: str, rank: int, world_size: int = 1) -> torch.device:
    """This rank's device: CUDA device `rank` (one device per worker, as nccl requires), or
    the CPU, whose cores the ranks share."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        if world_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={world_size} needs one CUDA device per "
                             f"worker, but torch sees {torch.cuda.device_count()}")
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it and bf16 matmuls run slower than fp32."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line for line in lines if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype a checkpoint's weights are stored in, if it says: an HF config.json's
    `torch_dtype`; for a diffusers pipeline folder (no such field) the dtype of the first
    tensor in its denoiser's safetensors header."""
    path = Path(model_dir)
    try:
        if (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
            return cfg.get("torch_dtype") or cfg.get("dtype")
        for file in sorted((path / "transformer").glob("*.safetensors")):
            with open(file, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            dtypes = [v["dtype"] for k, v in header.items() if k != "__metadata__"]
            return _SAFETENSORS_DTYPES.get(dtypes[0]) if dtypes else None
    except (OSError, ValueError, KeyError, struct.error):
        return None
    return None


def resolve_dtype(dtype: str, device: torch.device, model_dir: str = "") -> tuple[str, str]:
    """(dtype, why) for `dtype` as asked; "auto" picks the fastest that keeps the weights:

    - CUDA: bfloat16.
    - CPU: bfloat16 when the CPU has native bf16 matmul (~4x fp32 on AVX512-BF16) and the
      checkpoint is stored in 16 bits anyway; otherwise float32 (an fp32 checkpoint stays
      exact, and emulated bf16 is slower than fp32).
    """
    if dtype != "auto":
        return dtype, "asked for"
    if device.type != "cpu":
        return "bfloat16", f"auto on {device.type}"
    stored = checkpoint_dtype(model_dir)
    native = cpu_has_native_bf16()
    if native and stored in ("bfloat16", "float16"):
        return "bfloat16", f"auto: {stored} checkpoint, CPU has native bf16 matmul"
    why = "no native bf16 matmul on this CPU" if not native else f"checkpoint is {stored}"
    return "float32", f"auto: {why}"


def setup_rank(config: WorkerConfig) -> tuple[torch.device, str, torch.dtype]:
    """(device, dtype name, torch dtype) of this rank, its torch threads set, its dtype logged:
    how every runner starts."""
    import torch

    engine = config.engine
    world = engine.tensor_parallel_size
    device = resolve_device(engine.device, config.rank, world)
    set_threads(device, world, engine.num_threads)
    dtype, why = resolve_dtype(engine.dtype, device, engine.model)
    logger.info("rank %d: dtype %s (%s)", config.rank, dtype, why)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    return device, dtype, torch_dtype


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU its memory is an anonymous mmap, which the kernel zeroes as
    its pages fault in: writing zeros into a 2 GiB KV cache took 2-3 s of start-up.

    No huge pages here, unlike the workers' malloc: Python's anonymous mmap is shared memory,
    which transparent huge pages do not back by default. A private, THP-backed cache measured
    slower, since its 2 MiB pages are zeroed (and, on a fragmented machine, compacted) on first
    touch in the middle of steps: W ran at 1422-1510 against 1590-1816 tok/s in paired runs,
    and pre-faulting 2 GiB of it took 0.1 to 5.2 s. The decode kernel read it no faster.
    """
    import torch

    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, max(1, math.prod(shape)) * dtype.itemsize)
    return torch.frombuffer(buffer, dtype=dtype)[: math.prod(shape)].view(shape)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_POPULATE_CHUNK = 64 << 20


def populate(tensor: torch.Tensor) -> threading.Thread:
    """Fault in the pages of a CPU tensor on a thread (ctypes releases the GIL for madvise).

    A KV page first written mid-step costs a fault of ~5 us per 4 KiB: on the Qwen3-0.6B shape
    at batch 16 the K/V writes took 12.6 ms of a 150 ms decode step, 2.0 ms with the pages in.
    Faulting in 2 GiB takes ~1.2 s; the first step waits for it (`execute_model`), so it
    overlaps the rest of start-up rather than forward passes. Where the kernel lacks the advice,
    pages fault in on first use, as before.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()

    def run() -> None:
        for offset in range(0, size, _POPULATE_CHUNK):
            length = min(_POPULATE_CHUNK, size - offset)
            if libc.madvise(start + offset, length, _MADV_POPULATE_WRITE) != 0:
                return

    thread = threading.Thread(target=run, name="kv-populate", daemon=True)
    thread.start()
    return thread

def set_threads(device: torch.device, world_size: int, num_threads: int | None) -> None:
    """torch threads of this rank: ranks on one machine share the cores it may run on."""
    import torch

    if device.type != "cpu":
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(num_threads or max(1, (cores or os.cpu_count() or 1) // world_size))


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


DEFAULT_KV_CACHE_MEMORY_GB = 2.0  # per worker, when neither it nor num_kv_blocks is given


def kv_cache_blocks(num_kv_blocks: int | None, memory_gb: float | None,
                    bytes_per_block: int) -> int:
    """`num_kv_blocks` when given, else as many blocks of `bytes_per_block` as `memory_gb` GiB
    hold (DEFAULT_KV_CACHE_MEMORY_GB when that is not given either); at least one."""
    memory_gb = memory_gb or DEFAULT_KV_CACHE_MEMORY_GB
    blocks = num_kv_blocks if num_kv_blocks is not None else \
        int(memory_gb * 2**30 // bytes_per_block)
    if blocks < 1:
        raise ValueError(f"KV cache of {memory_gb} GiB holds no block of {bytes_per_block} "
                         "bytes; raise kv_cache_memory_gb")
    return blocks


def default_block_size(device_type: str) -> int:
    """Tokens per KV-cache block when none is given, for the device the workers run on.

    On a CPU, decode attention streams each request's blocks from memory, and short runs
    stream slowly (see workers/csrc/paged_attention.c): 64-token blocks read ~1.5x faster than
    16-token ones at batch 64 (`small` shape), ~1.9x on the Qwen3-0.6B shape; 128 was no
    faster than 64. Prefix-cache hits come in whole blocks, so smaller stays better elsewhere.
    GPUs take vLLM's 16.
    """
    return 64 if device_type == "cpu" else 16
