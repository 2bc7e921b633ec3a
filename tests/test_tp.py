"""Tensor parallelism end to end: TP=2 over gloo on the CPU, through the real engine and workers.

- greedy tokens at TP=2 equal TP=1 and transformers (up to a near-tie) for every architecture,
  for a single prompt and for a mixed batch of chunked prefills and decodes;
- each rank holds about half of the weights, and two engines can start at the same moment;
- failures: a worker killed mid-run, a worker that cannot start, an impossible TP size: each
  raises an error naming the rank (or the config field), and no process is left behind.

One TP=2 `LLM` per architecture is shared by that architecture's checks (startup dominates).
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import zmq
from reference import assert_greedy_match

from zomni import LLM, SamplingParams
from zomni.core.executor import Executor
from zomni.proto import EngineConfig, EngineDead, InvalidRequest
from zomni.proto.model_info import read_model_info
from zomni.testing import ARCHS
from zomni.workers.loader import load_model


def random_prompts(n: int, lengths: list[int], seed: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# A 64-token budget splits the longer prompts into chunks that share steps with decodes.
CONFIG = dict(num_kv_blocks=256, block_size=16, max_num_batched_tokens=64)
SINGLE = random_prompts(1, [13], seed=11)
BATCH = random_prompts(8, [5, 17, 33, 2, 48, 9, 26, 71], seed=12)


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def engine_processes(llm: LLM) -> list[psutil.Process]:
    """The engine-core process of `llm` and its workers."""
    engine = psutil.Process(llm.engine.proc.pid)
    return [engine, *engine.children(recursive=True)]


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line contains `text` (a model path: engine and workers)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in c for c in cmdline):
            found.append(proc)
    return found


@pytest.fixture(scope="module", params=list(ARCHS))
def tp2(request, model_dirs):
    """(arch, model dir, a TP=2 LLM, that arch's TP=1 tokens for SINGLE and BATCH)."""
    model_dir = model_dirs[request.param]
    with LLM(model=str(model_dir), tensor_parallel_size=1, **CONFIG) as llm:
        tp1 = {"single": generate(llm, SINGLE), "batch": generate(llm, BATCH)}
    with LLM(model=str(model_dir), tensor_parallel_size=2, **CONFIG) as llm:
        yield request.param, model_dir, llm, tp1


@pytest.mark.parametrize("which", ["single", "batch"])
def test_tp2_greedy_matches_tp1_and_transformers(tp2, which):
    _arch, model_dir, llm, tp1 = tp2
    prompts = SINGLE if which == "single" else BATCH
    for prompt, ours, one in zip(prompts, generate(llm, prompts), tp1[which]):
        assert len(ours) == GREEDY.max_tokens
        matched_tp2 = assert_greedy_match(model_dir, prompt, ours)
        if ours != one:  # partial sums add up in another order: only a near-tie may flip
            matched_tp1 = assert_greedy_match(model_dir, prompt, one)
            first_diff = next(i for i, (a, b) in enumerate(zip(ours, one)) if a != b)
            assert first_diff >= min(matched_tp1, matched_tp2)


def test_tp2_prefix_cache_and_stats(tp2):
    _arch, model_dir, llm, _tp1 = tp2
    assert llm.model_info.tensor_parallel_size == 2
    shared = random_prompts(1, [40], seed=13)[0]
    generate(llm, [shared + [3]])
    out = llm.generate({"prompt_token_ids": shared + [4]}, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens >= 32  # two full 16-token blocks of `shared`, on both ranks
    assert_greedy_match(model_dir, shared + [4], out.outputs[0].token_ids)
    assert llm.get_stats().scheduler.num_kv_blocks == CONFIG["num_kv_blocks"]


def test_weights_and_kv_split_and_concurrent_rendezvous(llama_dir):
    """Two TP=2 executors started at the same moment both come up (the rendezvous is a private
    file store, no port to race for); each rank holds about half of the TP=1 weights, and with
    half the KV heads its KV budget holds twice the TP=1 number of blocks."""
    model, _ = load_model(llama_dir, torch.float32, "cpu")  # no process group here: TP=1
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = model.attention_layers()
    tp1_block_bytes = 2 * 16 * layers[0].num_kv_heads * layers[0].head_dim * len(layers) * 4
    budget_gb = 0.001
    config = EngineConfig(model=str(llama_dir), tensor_parallel_size=2, block_size=16,
                          kv_cache_memory_gb=budget_gb, num_threads=1)
    results: list[Executor | BaseException] = []

    def start() -> None:
        try:
            results.append(Executor(config, zmq.Context.instance()))
        except BaseException as e:  # re-raised below, in the test's thread
            results.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for result in results:
            if isinstance(result, BaseException):
                raise result
            assert len(result.weight_bytes) == 2
            expected_blocks = int(budget_gb * 2**30 // (tp1_block_bytes // 2))
            assert result.runner_info.num_kv_blocks == expected_blocks
            for per_rank in result.weight_bytes:  # replicated norms add a little
                assert 0.5 * full <= per_rank <= 0.55 * full, (per_rank, full)
    finally:
        for result in results:
            if isinstance(result, Executor):
                result.shutdown()


@pytest.mark.parametrize("rank", [1, 0])
def test_worker_killed_mid_run(llama_dir, rank):
    llm = LLM(model=str(llama_dir), tensor_parallel_size=2, **CONFIG)
    try:
        procs = engine_processes(llm)
        victim = next(p for p in procs[1:] if f'"rank":{rank},' in p.cmdline()[-1])
        threading.Timer(0.5, victim.send_signal, (signal.SIGKILL,)).start()
        long_run = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
        with pytest.raises(EngineDead, match=f"^worker rank {rank} was killed by SIGKILL"):
            llm.generate([{"prompt_token_ids": p} for p in random_prompts(4, [8], seed=14)],
                         long_run, use_tqdm=False)
        _gone, alive = psutil.wait_procs(procs, timeout=15)  # the engine cleans up by itself
        assert not alive, alive
    finally:
        llm.shutdown()


def test_worker_fails_to_start(llama_dir, tmp_path):
    model_dir = Path(shutil.copytree(llama_dir, tmp_path / "corrupt"))
    (model_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    start = time.monotonic()
    with pytest.raises(EngineDead, match=r"^worker rank \d failed to start: .*SafetensorError"):
        LLM(model=str(model_dir), tensor_parallel_size=2, **CONFIG)
    assert time.monotonic() - start < 120
    assert not processes_mentioning(str(model_dir))


def test_impossible_tp_size_fails_before_workers_start(llama_dir):
    """4 attention heads: TP=3 does not divide them; refused by the engine, no worker runs."""
    with pytest.raises(InvalidRequest, match="tensor_parallel_size=3 must divide the model's "
                                             "4 attention heads"):
        LLM(model=str(llama_dir), tensor_parallel_size=3, **CONFIG)
    assert not processes_mentioning(str(llama_dir) + '","tensor_parallel_size":3')
    for tp in (8, 6):
        with pytest.raises(InvalidRequest, match=f"tensor_parallel_size={tp} must divide"):
            read_model_info(str(llama_dir), tensor_parallel_size=tp)
    read_model_info(str(llama_dir), tensor_parallel_size=4)  # 2 KV heads, each on 2 ranks
