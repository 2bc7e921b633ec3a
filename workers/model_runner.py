"""ModelRunner: executes one step plan (`SchedulerOutput`) on this rank's model and KV cache.

The worker decides nothing. Per step, in this order:

    (a) drop finished (and preempted) requests
    (b) add new requests (an existing id is replaced)
    (c) cached requests: extend block tables, take num_computed_tokens from the plan
    (d) flatten token_ids[num_computed : num_computed + n] of every scheduled request, plan order
    (e) one forward over the flat batch (prefill chunks and decodes mixed)
    (f) requests whose tokens now all have KV sample one token (LM head on those rows only);
        the token is appended to the worker's copy of token_ids, num_computed advances by n

Rank 0 samples and returns the `ModelRunnerOutput`; under tensor parallelism the sampled ids are
broadcast so every rank's token_ids stay identical, and other ranks return None.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from zomni.proto import (
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
    WorkerConfig,
)
from zomni.proto.config import default_block_size, default_max_num_batched_tokens
from zomni.proto.model_info import read_model_info
from zomni.workers import native
from zomni.workers.context import AttentionMetadata, build_attention_metadata, set_context
from zomni.workers.loader import load_model
from zomni.workers.parallel_state import broadcast
from zomni.workers.sampler import Sampler, SamplingMetadata

logger = logging.getLogger("zomni.worker")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RequestState:
    request_id: str
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None  # only for seeded requests


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the flat batch that sample
    sampling_requests: list[RequestState]  # [S], plan order


def resolve_device(device: str, rank: int, world_size: int = 1) -> torch.device:
    """This rank's device: CUDA device `rank` (one device per worker, as nccl requires), or
    the CPU, whose cores the ranks share."""
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


def checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype the checkpoint's config.json says its weights are stored in, if any."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("torch_dtype") or cfg.get("dtype")


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


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU its memory is an anonymous mmap, which the kernel zeroes as
    its pages fault in: writing zeros into a 2 GiB KV cache took 2-3 s of start-up.

    No huge pages here, unlike the workers' malloc: Python's anonymous mmap is shared memory,
    which transparent huge pages do not back by default. A private, THP-backed cache measured
    slower, since its 2 MiB pages are zeroed (and, on a fragmented machine, compacted) on first
    touch in the middle of steps: W ran at 1422-1510 against 1590-1816 tok/s in paired runs,
    and pre-faulting 2 GiB of it took 0.1 to 5.2 s. The decode kernel read it no faster.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, max(1, math.prod(shape)) * dtype.itemsize)
    return torch.frombuffer(buffer, dtype=dtype)[: math.prod(shape)].view(shape)


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_POPULATE_CHUNK = 64 << 20


def _populate(tensor: torch.Tensor) -> threading.Thread:
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


class ModelRunner:
    def __init__(self, config: WorkerConfig):
        engine = config.engine
        self.rank = config.rank
        world = engine.tensor_parallel_size
        self.device = resolve_device(engine.device, config.rank, world)
        if self.device.type == "cpu":  # ranks on one machine share the cores it may run on
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            torch.set_num_threads(engine.num_threads
                                  or max(1, (cores or os.cpu_count() or 1) // world))
        self.dtype, why = resolve_dtype(engine.dtype, self.device, engine.model)
        logger.info("rank %d: dtype %s (%s)", self.rank, self.dtype, why)
        if self.device.type == "cpu" and self.dtype == "float32":  # built now, not mid-step
            logger.info("rank %d: native paged attention %s", self.rank,
                        "on" if native.has_paged_attention() else "off")
        self.torch_dtype = _DTYPES[self.dtype]
        self.max_num_batched_tokens = engine.max_num_batched_tokens or \
            default_max_num_batched_tokens(self.device.type, engine.online)

        start = time.perf_counter()
        self.model, self.hf_config = load_model(engine.model, self.torch_dtype, self.device)
        self.load_time_s = time.perf_counter() - start
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for module in self.model.modules():  # CPU: repacked weights (see cpu_gemm)
            if hasattr(module, "pack"):
                module.pack(batch_hint=engine.max_num_seqs)
        self.vocab_size = self.hf_config.vocab_size
        self.eos_token_ids = read_model_info(engine.model).eos_token_ids

        self.block_size = engine.block_size or default_block_size(self.device.type)
        self.num_kv_blocks = self._num_kv_blocks(engine.num_kv_blocks, engine.kv_cache_memory_gb)
        self._allocate_kv_cache()
        self.sampler = Sampler(engine.seed, self.device)
        self._warm_up(min(self.max_num_batched_tokens, self.num_kv_blocks * self.block_size,
                          getattr(self.hf_config, "max_position_embeddings", 2**31)))
        self.requests: dict[str, RequestState] = {}

    # ---- setup ---------------------------------------------------------------------------

    def _bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        per_layer = 2 * self.block_size * layers[0].num_kv_heads * layers[0].head_dim
        return per_layer * len(layers) * torch.empty(0, dtype=self.torch_dtype).element_size()

    def _num_kv_blocks(self, fixed: int | None, memory_gb: float) -> int:
        blocks = fixed if fixed is not None else int(memory_gb * 2**30 // self._bytes_per_block())
        if blocks < 1:
            raise ValueError(f"KV cache of {memory_gb} GiB holds no block of "
                             f"{self._bytes_per_block()} bytes; raise kv_cache_memory_gb")
        return blocks

    def _allocate_kv_cache(self) -> None:
        """One tensor for all layers; each Attention module gets views of its K and V.

            kv_cache: [2 (K, V), num_layers, num_blocks, num_kv_heads, block_size, head_dim]

        Zeroed once: padded reads of never-written slots are masked, but must not be NaN.
        """
        layers = self.model.attention_layers()
        self.kv_cache = _zeros((2, len(layers), self.num_kv_blocks, layers[0].num_kv_heads,
                                self.block_size, layers[0].head_dim), self.torch_dtype,
                               self.device)
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self._populating = _populate(self.kv_cache) if self.device.type == "cpu" else None

    @torch.inference_mode()
    def _warm_up(self, num_tokens: int) -> None:
        """One forward of a full-budget dummy prompt before READY, so that oneDNN creates its
        kernels and malloc grows its heap now rather than in the first requests' step (that
        step took ~1.5x a later one). It writes blocks no request owns yet."""
        blocks = list(range(-(-num_tokens // self.block_size)))
        attn = build_attention_metadata([num_tokens], [0], [blocks], self.block_size,
                                        self.device)
        set_context(attn)
        try:
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=self.device),
                                attn.positions)
            self.model.compute_logits(hidden[-1:])
        finally:
            set_context(None)

    # ---- one step ------------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, plan: SchedulerOutput) -> ModelRunnerOutput | None:
        if self._populating is not None:
            self._populating.join()
            self._populating = None
        self._update_states(plan)
        if not plan.num_scheduled_tokens:
            return ModelRunnerOutput(plan.step_id, [], []) if self.rank == 0 else None
        inputs = self._prepare_inputs(plan)
        set_context(inputs.attn)
        try:
            hidden = self.model(inputs.input_ids, inputs.attn.positions)
            logits = None
            if inputs.sampling_requests:  # same on every rank: the head all-gathers logits
                logits = self.model.compute_logits(hidden[inputs.logits_indices])
        finally:
            set_context(None)
        sampled, logprobs = self._sample(logits, inputs.sampling_requests)

        for request_id, n in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += n
        for req, token in zip(inputs.sampling_requests, sampled):
            req.token_ids.append(token)
        if self.rank != 0:
            return None
        return ModelRunnerOutput(plan.step_id,
                                 [r.request_id for r in inputs.sampling_requests],
                                 sampled, logprobs)

    def _update_states(self, plan: SchedulerOutput) -> None:
        for request_id in plan.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in plan.new_requests:
            self._check_blocks(new.request_id, new.block_ids)
            token_ids = list(new.token_ids)
            num_prompt = new.num_prompt_tokens or len(token_ids)
            self.requests[new.request_id] = RequestState(
                request_id=new.request_id, token_ids=token_ids, num_prompt_tokens=num_prompt,
                block_ids=list(new.block_ids), num_computed_tokens=new.num_computed_tokens,
                sampling=new.sampling,
                generator=self._new_generator(new.sampling, len(token_ids) - num_prompt))
        for cached in plan.cached_requests:
            req = self._get(cached.request_id)
            self._check_blocks(cached.request_id, cached.new_block_ids)
            req.block_ids.extend(cached.new_block_ids)
            req.num_computed_tokens = cached.num_computed_tokens

    def _new_generator(self, sampling: SamplingParams, num_output_tokens: int):
        """A generator per seeded request, advanced past the draws of tokens it already made
        (a preempted request comes back as new), so its samples stay those of its seed."""
        if sampling.seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(sampling.seed)
        if not sampling.greedy:
            for _ in range(num_output_tokens):  # one draw of vocab_size per sampled token
                torch.empty(self.vocab_size, device=self.device).exponential_(generator=generator)
        return generator

    def _get(self, request_id: str) -> RequestState:
        try:
            return self.requests[request_id]
        except KeyError:
            raise ValueError(f"step plan refers to unknown request {request_id!r}") from None

    def _check_blocks(self, request_id: str, block_ids: list[int]) -> None:
        bad = [b for b in block_ids if not 0 <= b < self.num_kv_blocks]
        if bad:
            raise ValueError(f"request {request_id!r}: block ids {bad[:4]} outside "
                             f"[0, {self.num_kv_blocks})")

    def _prepare_inputs(self, plan: SchedulerOutput) -> StepInputs:
        input_ids: list[int] = []
        query_lens, starts, tables = [], [], []
        logits_indices: list[int] = []
        sampling_requests: list[RequestState] = []
        for request_id, n in plan.num_scheduled_tokens.items():
            req = self._get(request_id)
            start = req.num_computed_tokens
            if n < 1 or start + n > len(req.token_ids):
                raise ValueError(f"request {request_id!r}: {n} tokens scheduled from "
                                 f"{start}, but it has {len(req.token_ids)} tokens")
            input_ids.extend(req.token_ids[start:start + n])
            query_lens.append(n)
            starts.append(start)
            tables.append(req.block_ids)
            if start + n == len(req.token_ids):  # a partial prefill chunk does not sample
                logits_indices.append(len(input_ids) - 1)
                sampling_requests.append(req)
        attn = build_attention_metadata(query_lens, starts, tables, self.block_size, self.device)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            attn=attn,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=self.device),
            sampling_requests=sampling_requests)

    def _sample(self, logits: torch.Tensor | None, requests: list[RequestState]
                ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """(sampled ids, logprobs) on rank 0; the ids are broadcast to the other ranks."""
        if not requests:
            return [], None
        logprobs = None
        if self.rank == 0:
            meta = SamplingMetadata(params=[r.sampling for r in requests],
                                    generators=[r.generator for r in requests],
                                    token_ids=[r.token_ids for r in requests],
                                    num_prompt_tokens=[r.num_prompt_tokens for r in requests],
                                    eos_token_ids=self.eos_token_ids)
            out = self.sampler(logits, meta)
            sampled, logprobs = out.sampled_token_ids, out.logprobs
        else:
            sampled = torch.empty(len(requests), dtype=torch.int64, device=self.device)
        return broadcast(sampled, src=0).tolist(), logprobs
