"""ModelRunner against transformers on tiny random models: logits, and greedy tokens driven by
hand-built step plans (single prompt; 8 prompts batched with chunked prefill; prefix-cache hits).

Tolerances: full-prefill logits allclose with atol 1e-4 (fp32; |logits| ~ 5). Greedy tokens
must be equal; where they differ, the two tokens must be within `reference.NEAR_TIE` (1e-3) in
the reference's logits, and that sequence is compared no further.
"""

from __future__ import annotations

import random

import pytest
import torch
from reference import assert_greedy_match

from zomni.proto import (
    CachedRequestData,
    EngineConfig,
    NewRequestData,
    SamplingParams,
    SchedulerOutput,
    WorkerConfig,
)
from zomni.testing import ARCHS, build_model
from zomni.workers import native
from zomni.workers.context import build_attention_metadata, set_context
from zomni.workers.loader import load_model
from zomni.workers.model_runner import ModelRunner

BLOCK_SIZE = 4
NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory) -> dict[str, object]:
    """Config corners the default tiny models do not cover."""
    root = tmp_path_factory.mktemp("worker-variants")
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
              "rope_theta": 10000.0}
    return {
        # tied embeddings, head_dim 32 != hidden / heads (16), q/k/v/o bias, llama3 RoPE
        "llama-tied-bias-llama3": build_model(root / "a", "llama", seed=7, head_dim=32,
                                              tie_word_embeddings=True, attention_bias=True,
                                              rope_parameters=llama3),
        "mistral-sliding-window": build_model(root / "b", "mistral", seed=8, sliding_window=8),
    }


def make_runner(model_dir, seed: int = 0) -> ModelRunner:
    engine = EngineConfig(model=str(model_dir), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS,
                          device="cpu", seed=seed)
    return ModelRunner(WorkerConfig(engine=engine, rank=0, engine_address=""))


class MiniScheduler:
    """Plans steps as the engine core does, minus what the worker never sees.

    Running requests first, then waiting ones, within a token budget (so long prompts are
    chunked); blocks come from a shuffled free list so block tables are not contiguous.
    Blocks are never freed, so later requests may share an earlier request's blocks.
    """

    def __init__(self, budget: int, seed: int = 0):
        self.budget = budget
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)
        self.reqs: dict[str, dict] = {}
        self.finished: list[str] = []
        self.step_id = 0

    def add(self, request_id: str, prompt: list[int], max_tokens: int,
            shared_blocks: list[int] = (), num_cached: int = 0, sampling=None) -> None:
        self.reqs[request_id] = dict(
            tokens=list(prompt), num_prompt=len(prompt), computed=num_cached,
            blocks=list(shared_blocks), out=[], max_tokens=max_tokens, new=True,
            sampling=sampling or SamplingParams(temperature=0.0, max_tokens=max_tokens))

    def has_work(self) -> bool:
        return any(len(r["out"]) < r["max_tokens"] for r in self.reqs.values())

    def schedule(self) -> SchedulerOutput:
        budget, new, cached, scheduled = self.budget, [], [], {}
        for request_id, r in self.reqs.items():
            if len(r["out"]) >= r["max_tokens"] or budget == 0:
                continue
            n = min(len(r["tokens"]) - r["computed"], budget)
            needed = -(-(r["computed"] + n) // BLOCK_SIZE) - len(r["blocks"])
            new_blocks = [self.free.pop() for _ in range(max(0, needed))]
            r["blocks"] += new_blocks
            if r["new"]:
                new.append(NewRequestData(request_id, list(r["tokens"]), r["sampling"],
                                          list(r["blocks"]), r["computed"], r["num_prompt"]))
                r["new"] = False
            else:
                cached.append(CachedRequestData(request_id, new_blocks, r["computed"]))
            scheduled[request_id] = n
            budget -= n
        self.step_id += 1
        plan = SchedulerOutput(self.step_id, new, cached, scheduled, self.finished,
                               sum(scheduled.values()))
        self.finished = []
        return plan

    def update(self, plan: SchedulerOutput, output) -> None:
        for request_id, n in plan.num_scheduled_tokens.items():
            self.reqs[request_id]["computed"] += n
        for request_id, token in zip(output.request_ids, output.sampled_token_ids):
            r = self.reqs[request_id]
            r["tokens"].append(token)
            r["out"].append(token)
            if len(r["out"]) == r["max_tokens"]:
                self.finished.append(request_id)

    def run(self, runner: ModelRunner) -> list[SchedulerOutput]:
        plans = []
        while self.has_work():
            plan = self.schedule()
            self.update(plan, runner.execute_model(plan))
            plans.append(plan)
        return plans


def _prompts(n: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(length)] for length in lengths[:n]]


def _hf_logits(model_dir, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return ref(ids).logits


def _our_prefill_logits(model_dir, ids: torch.Tensor, dtype=torch.float32,
                        packed: bool = False) -> torch.Tensor:
    """Logits of every position, each row of `ids` a request, all prefilled in one forward;
    `packed`: with the weights packed for the CPU kernels, as the runner packs them."""
    model, _ = load_model(model_dir, dtype, "cpu")
    if packed:
        for module in model.modules():
            if hasattr(module, "pack"):
                module.pack(batch_hint=16)
    layers = model.attention_layers()
    cache = torch.zeros(2, len(layers), 64, layers[0].num_kv_heads, BLOCK_SIZE,
                        layers[0].head_dim, dtype=dtype)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    batch, length = ids.shape
    per_req = -(-length // BLOCK_SIZE)
    tables = [list(range(63 - b * per_req, 63 - (b + 1) * per_req, -1)) for b in range(batch)]
    md = build_attention_metadata([length] * batch, [0] * batch, tables, BLOCK_SIZE)
    set_context(md)
    try:
        with torch.inference_mode():
            hidden = model(ids.flatten(), md.positions)
            return model.compute_logits(hidden).view(batch, length, -1)
    finally:
        set_context(None)


@pytest.mark.parametrize("arch", [*ARCHS, "llama-tied-bias-llama3", "mistral-sliding-window"])
def test_prefill_logits_match_transformers(arch, model_dirs, variant_dirs):
    model_dir = model_dirs.get(arch) or variant_dirs[arch]
    ids = torch.tensor(_prompts(2, [37, 37], seed=1))
    ours, ref = _our_prefill_logits(model_dir, ids), _hf_logits(model_dir, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _two_steps(model, cache: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of two steps: three prompts prefilled; then their decodes, mixed with a
    fourth prompt's first chunk."""
    cache.zero_()
    prompts = _prompts(4, [5, 9, 13, 11], seed=11)
    tables = [[3, 60, 7, 1], [9, 2, 33, 40], [12, 50, 21, 5, 6], [30, 31, 44, 45]]
    steps = [([5, 9, 13], [0, 0, 0], [p for p in prompts[:3]], tables[:3]),
             ([1, 1, 1, 6], [5, 9, 13, 0], [[7], [8], [9], prompts[3][:6]], tables)]
    hidden = []
    for query_lens, starts, ids, step_tables in steps:
        md = build_attention_metadata(query_lens, starts, step_tables, BLOCK_SIZE)
        set_context(md)
        try:
            with torch.inference_mode():
                hidden.append(model(torch.tensor(sum(ids, [])), md.positions))
        finally:
            set_context(None)
    return hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", [*ARCHS, "llama-tied-bias-llama3", "mistral-sliding-window"])
def test_native_layers_match_the_per_kernel_path(arch, dtype, model_dirs, variant_dirs,
                                                 monkeypatch):
    """One native call a layer runs the same kernels as the Python layers, in the same order:
    the hidden states are equal bit for bit, prefill chunks and decodes alike."""
    if not native.has_decoder_layer(dtype):
        pytest.skip(f"no native {dtype} kernels on this CPU")
    model, _ = load_model(model_dirs.get(arch) or variant_dirs[arch], dtype, "cpu")
    for module in model.modules():
        if hasattr(module, "pack"):
            module.pack(batch_hint=16)
    layers = model.attention_layers()
    cache = torch.zeros(2, len(layers), 64, layers[0].num_kv_heads, BLOCK_SIZE,
                        layers[0].head_dim, dtype=dtype)
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    native_hidden = _two_steps(model, cache)
    assert model.model._native is not None
    monkeypatch.setenv("ZOMNI_NATIVE_LAYERS", "0")
    model.model._native_key = None  # rebuilt: off
    per_kernel = _two_steps(model, cache)
    assert model.model._native is None
    for ours, ref in zip(native_hidden, per_kernel):
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_prefill_logits_close_to_transformers_bf16(arch, model_dirs):
    """bf16 end to end (on AVX512-BF16 CPUs: the native bf16 linears, layer ops and attention)
    against transformers in bf16: both round at every op, in different orders, so the logits
    agree to bf16 noise, not bit for bit."""
    ids = torch.tensor(_prompts(2, [37, 37], seed=1))
    ours = _our_prefill_logits(model_dirs[arch], ids, torch.bfloat16, packed=True).float()
    ref = _hf_logits(model_dirs[arch], ids, torch.bfloat16).float()
    assert (ours - ref).abs().mean() < 0.02 * ref.abs().mean()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("arch", [*ARCHS, "llama-tied-bias-llama3"])
def test_greedy_single_prompt(arch, model_dirs, variant_dirs):
    model_dir = model_dirs.get(arch) or variant_dirs[arch]
    prompt = _prompts(1, [13], seed=2)[0]
    sched = MiniScheduler(budget=64)
    sched.add("r0", prompt, max_tokens=40)
    plans = sched.run(make_runner(model_dir))
    assert len(plans) == 40  # one prefill step that samples, then 39 decodes
    assert assert_greedy_match(model_dir, prompt, sched.reqs["r0"]["out"]) >= 8


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_chunked_prefill(arch, model_dirs):
    model_dir = model_dirs[arch]
    prompts = _prompts(8, [1, 3, 7, 12, 17, 25, 33, 40], seed=3)
    sched = MiniScheduler(budget=48)
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, max_tokens=32)
    plans = sched.run(make_runner(model_dir))

    # the plans did what this test is about: chunked prompts and mixed prefill/decode steps
    partial = [(p.step_id, rid) for p in plans for rid, n in p.num_scheduled_tokens.items()
               if any(c.request_id == rid for c in p.new_requests)
               and n < len(next(x for x in p.new_requests if x.request_id == rid).token_ids)]
    assert partial, "no prompt was split over two steps"
    assert any(1 in p.num_scheduled_tokens.values() and max(p.num_scheduled_tokens.values()) > 1
               for p in plans), "no step mixed decodes with prefill chunks"
    matched = [assert_greedy_match(model_dir, p, sched.reqs[f"r{i}"]["out"])
               for i, p in enumerate(prompts)]
    assert sum(matched) >= 8 * 16, matched  # ties are rare: most sequences match in full


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_prefix_cache_hits(arch, model_dirs):
    """B and C reuse A's first KV blocks (computed in earlier steps) instead of recomputing."""
    model_dir = model_dirs[arch]
    a = _prompts(1, [30], seed=4)[0]
    runner = make_runner(model_dir)
    sched = MiniScheduler(budget=64)
    sched.add("a", a, max_tokens=4)
    sched.run(runner)
    blocks_a = sched.reqs["a"]["blocks"]
    b = a[:24] + _prompts(1, [9], seed=5)[0]  # 6 full blocks cached, 9 tokens to compute
    c = a[:24]  # the whole prompt cached: the scheduler recomputes only its last token
    sched.add("b", b, max_tokens=32, shared_blocks=blocks_a[:6], num_cached=24)
    sched.add("c", c, max_tokens=32, shared_blocks=blocks_a[:6], num_cached=23)
    plans = sched.run(runner)
    first = plans[0]
    assert {r.request_id: r.num_computed_tokens for r in first.new_requests} == {"b": 24, "c": 23}
    assert first.num_scheduled_tokens == {"b": 9, "c": 1}
    assert assert_greedy_match(model_dir, b, sched.reqs["b"]["out"]) >= 8
    assert assert_greedy_match(model_dir, c, sched.reqs["c"]["out"]) >= 8


def test_finished_and_preempted_requests(model_dirs):
    """Dropped requests leave the worker; a preempted request comes back as new, with its
    generated tokens, and continues as if it had never stopped."""
    model_dir = model_dirs["qwen3"]
    prompt = _prompts(1, [10], seed=6)[0]
    runner = make_runner(model_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    plan = SchedulerOutput(1, [NewRequestData("x", prompt, greedy, list(range(3)), 0, 10)], [],
                           {"x": 10}, [])
    out = runner.execute_model(plan)
    assert out.request_ids == ["x"] and out.logprobs is None
    tokens = prompt + out.sampled_token_ids
    # preempted: dropped, then resent as new with its generated token and fresh blocks
    plan = SchedulerOutput(2, [NewRequestData("x", tokens, greedy, [7, 8, 9], 0, 10)], [],
                           {"x": 11}, ["x"])
    out = runner.execute_model(plan)
    tokens += out.sampled_token_ids
    assert runner.requests["x"].token_ids == tokens
    assert runner.requests["x"].num_computed_tokens == 11
    plan = SchedulerOutput(3, [], [], {}, ["x"])
    assert runner.execute_model(plan).request_ids == []
    assert "x" not in runner.requests
    assert assert_greedy_match(model_dir, prompt, tokens[10:]) == 2


def test_logprobs_and_bad_plans(model_dirs):
    runner = make_runner(model_dirs["llama"])
    params = SamplingParams(temperature=0.0, logprobs=3)
    plan = SchedulerOutput(1, [NewRequestData("x", [5, 6, 7], params, [0], 0, 3),
                               NewRequestData("y", [5, 6, 7], SamplingParams(), [1], 0, 3)],
                           [], {"x": 3, "y": 3}, [])
    out = runner.execute_model(plan)
    assert out.logprobs[1] is None
    lp = out.logprobs[0]
    assert lp.token_ids[0] == lp.token_ids[1] == out.sampled_token_ids[0]  # greedy: top-1
    assert lp.ranks == [1, 1, 2, 3] and lp.logprobs[1] >= lp.logprobs[2] >= lp.logprobs[3]
    with pytest.raises(ValueError, match="unknown request"):
        runner.execute_model(SchedulerOutput(2, [], [], {"nope": 1}, []))
    with pytest.raises(ValueError, match="block ids"):
        runner.execute_model(SchedulerOutput(
            3, [NewRequestData("z", [1, 2], params, [NUM_BLOCKS], 0, 2)], [], {"z": 2}, []))
