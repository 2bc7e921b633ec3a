"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`) against transformers.

Entry i >= 1 of a request's prompt logprobs must be `log_softmax` of transformers' logits at
position i - 1, for prompt token i first, then the top-N: with the prompt in one step, split
over several (chunked prefill), the LM head run a few rows at a time, and a prefix that another
request already put in the prefix cache (a request that wants prompt logprobs reads none of it,
as in vLLM). Tolerance: atol 1e-4 on logprobs (fp32, |logits| ~ 5).

Levels: the model runner driven by hand-built plans; the scheduler with a fake worker (where the
entries are filed, preemption); an engine process read through `EngineClient`.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_core_scheduler import FakeWorker, make_scheduler, run
from test_workers_model_runner import MiniScheduler, _hf_logits, _prompts, make_runner
from zmq_utils import start_engine

from zomni.core.request import Request
from zomni.proto import (
    EngineRequest,
    FinishReason,
    ModelRunnerOutput,
    MsgType,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
)
from zomni.proto.client import EngineClient

ATOL = 1e-4


@pytest.fixture
def model_dir(tmp_path):
    """A config the scheduler tests read (vocab 100); no weights."""
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 100, '
        '"max_position_embeddings": 64}')
    return str(tmp_path)


def hf_prompt_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row p = log_softmax of transformers' logits at position p."""
    return torch.log_softmax(_hf_logits(model_dir, torch.tensor([prompt]))[0], dim=-1)


def check_against_reference(entries: list[TokenLogprobs | None], prompt: list[int],
                            ref: torch.Tensor, num: int) -> float:
    """Assert vLLM's layout and values; returns the largest logprob difference."""
    assert len(entries) == len(prompt) and entries[0] is None
    worst = 0.0
    for pos in range(1, len(prompt)):
        lp, row = entries[pos], ref[pos - 1]
        assert lp is not None, f"position {pos} missing"
        assert lp.token_ids[0] == prompt[pos] and len(lp.token_ids) == num + 1
        assert lp.ranks[0] == int((row > row[prompt[pos]]).sum()) + 1
        assert lp.ranks[1:] == list(range(1, num + 1))
        top = row.topk(num)
        assert lp.token_ids[1:] == top.indices.tolist()
        want = [row[prompt[pos]].item(), *top.values.tolist()]
        worst = max(worst, max(abs(a - b) for a, b in zip(lp.logprobs, want)))
    assert worst <= ATOL, worst
    return worst


def collect_runner(plans_outputs) -> dict[str, list[TokenLogprobs | None]]:
    """Fold the runner's per-step entries by position, as the engine core does."""
    found: dict[str, dict[int, TokenLogprobs]] = {}
    for plan, out in plans_outputs:
        starts = {r.request_id: r.num_computed_tokens
                  for r in (*plan.new_requests, *plan.cached_requests)}
        for rid, lps in (out.prompt_logprobs or {}).items():
            for i, lp in enumerate(lps):
                assert starts[rid] + 1 + i not in found.setdefault(rid, {}), "reported twice"
                found[rid][starts[rid] + 1 + i] = lp
    return {rid: [None] + [pos.get(p) for p in range(1, max(pos) + 1)]
            for rid, pos in found.items()}


# ---- the model runner ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_runner_chunked_prompts_match_transformers(arch, model_dirs):
    """Three prompts, a budget of 11 tokens a step (each prompt split over steps, mixed with
    decodes), the LM head 3 rows at a time; only the requests that asked pay for logits."""
    model_dir = model_dirs[arch]
    prompts = _prompts(4, [23, 9, 17, 12], seed=21)
    runner = make_runner(model_dir)
    runner.prompt_logits_rows = 3
    sched = MiniScheduler(budget=11)
    nums = {"r0": 5, "r1": 0, "r2": None, "r3": 20}
    for i, p in enumerate(prompts):
        sched.add(f"r{i}", p, max_tokens=3, sampling=SamplingParams(
            temperature=0.0, max_tokens=3, prompt_logprobs=nums[f"r{i}"]))
    steps = []
    while sched.has_work():
        plan = sched.schedule()
        out = runner.execute_model(plan)
        sched.update(plan, out)
        steps.append((plan, out))
    assert sum("r0" in (out.prompt_logprobs or {}) for _, out in steps) >= 2, "not chunked"
    found = collect_runner(steps)
    assert set(found) == {"r0", "r1", "r3"}  # r2 did not ask
    worst = 0.0
    for i, p in enumerate(prompts):
        if nums[f"r{i}"] is not None:
            ref = hf_prompt_logprobs(model_dir, p)
            worst = max(worst, check_against_reference(found[f"r{i}"], p, ref, nums[f"r{i}"]))
    print(f"{arch}: max |prompt logprob - transformers| = {worst:.2e}")


def test_runner_one_token_prompt_and_decodes_report_nothing(model_dirs):
    runner = make_runner(model_dirs["llama"])
    sched = MiniScheduler(budget=64)
    sched.add("one", [7], max_tokens=4, sampling=SamplingParams(
        temperature=0.0, max_tokens=4, prompt_logprobs=2))
    while sched.has_work():
        plan = sched.schedule()
        out = runner.execute_model(plan)
        assert out.prompt_logprobs is None  # a 1-token prompt has no scored position
        sched.update(plan, out)


# ---- the scheduler ---------------------------------------------------------------------------


class PromptLogprobsWorker(FakeWorker):
    """FakeWorker that also reports prompt logprobs: position p's entry says p in its logprob,
    so filing by position is checked exactly."""

    def __init__(self, block_size: int):
        super().__init__(block_size)
        self.asked: dict[str, tuple[int, int]] = {}  # request id -> (N, num_prompt)
        self.positions: list[tuple[str, int]] = []  # every position reported, in order

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for new in plan.new_requests:
            if new.sampling.prompt_logprobs is not None:
                self.asked[new.request_id] = (new.sampling.prompt_logprobs,
                                              new.num_prompt_tokens)
            else:
                self.asked.pop(new.request_id, None)
        starts = {r.request_id: r.num_computed_tokens
                  for r in (*plan.new_requests, *plan.cached_requests)}
        out = super().execute(plan)
        found = {}
        for rid, n in plan.num_scheduled_tokens.items():
            if rid not in self.asked:
                continue
            tokens, num_prompt = self.reqs[rid]["tokens"], self.asked[rid][1]
            positions = range(starts[rid] + 1, min(starts[rid] + n, num_prompt - 1) + 1)
            found[rid] = [TokenLogprobs([tokens[p]], [-float(p)], [1]) for p in positions]
            self.positions += [(rid, p) for p in positions]
        out.prompt_logprobs = {k: v for k, v in found.items() if v} or None
        return out


def first_outputs(sched, worker, ahead=False) -> dict[str, object]:
    firsts = {}
    orig = sched.update_from_output

    def spy(plan, output, frames=()):
        outs = orig(plan, output, frames)
        for client_outs in outs.values():
            for o in client_outs:
                firsts.setdefault(o.request_id, o)
        return outs

    sched.update_from_output = spy
    run(sched, worker, ahead=ahead)
    return firsts


def wire(rid, prompt, **sampling) -> EngineRequest:
    sampling.setdefault("max_tokens", 3)
    return EngineRequest(rid, list(prompt), SamplingParams(temperature=0.0, **sampling))


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_scheduler_files_chunks_by_position_and_skips_prefix_reads(model_dir, ahead):
    sched = make_scheduler(model_dir, max_num_batched_tokens=6)
    prompt = list(range(1, 22))
    worker = PromptLogprobsWorker(4)
    sched.add_request(wire("warm", prompt))
    run(sched, worker)  # its full blocks are in the prefix cache now
    hits_before = sched.kv_cache_manager.num_queried_tokens
    sched.add_request(wire("asks", prompt, prompt_logprobs=1))
    firsts = first_outputs(sched, worker, ahead)
    first = firsts["asks"]
    assert first.num_cached_tokens == 0  # nothing read from the prefix cache
    assert sched.kv_cache_manager.num_queried_tokens == hits_before  # and no lookup counted
    assert first.prompt_logprobs[0] is None
    assert [lp.logprobs[0] for lp in first.prompt_logprobs[1:]] == [-float(p)
                                                                      for p in range(1, 21)]
    assert [lp.token_ids[0] for lp in first.prompt_logprobs[1:]] == prompt[1:]
    # its own blocks went into the cache as usual: a later request hits them
    sched.add_request(wire("after", prompt))
    assert first_outputs(sched, worker, ahead)["after"].num_cached_tokens == 20


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("prompt_len", "sent_first"), [(20, False), (12, True)],
                         ids=["mid-prefill", "after-first-output"])
def test_scheduler_preemption(model_dir, prompt_len, sent_first, ahead):
    """8 blocks of 4 tokens for two requests that need more; "b" (lower priority) is the one
    preempted. Preempted mid-prefill: readmitted with prompt_logprobs, from position 0, and
    the recomputed entries are filed once. Preempted after its first output carried them:
    readmitted without prompt_logprobs (the worker skips that work), so it may read the
    prefix cache like any request."""
    sched = make_scheduler(model_dir, num_blocks=8, max_num_batched_tokens=8)
    worker = PromptLogprobsWorker(4)
    admissions = []
    execute = worker.execute

    def spy(plan):
        admissions.extend((n.sampling.prompt_logprobs, len(n.token_ids) - n.num_prompt_tokens,
                           n.num_computed_tokens) for n in plan.new_requests
                          if n.request_id == "b")
        return execute(plan)

    worker.execute = spy
    prompt = list(range(30, 30 + prompt_len))
    sched.add_request(wire("a", range(1, 14), max_tokens=12))
    b = Request.from_engine_request(wire("b", prompt, prompt_logprobs=2, max_tokens=12), b"", 64)
    b.priority = 1
    sched.add_request(b)
    first = first_outputs(sched, worker, ahead)["b"]
    assert sched.num_preemptions > 0 and len(admissions) > 1
    assert first.prompt_logprobs[0] is None
    assert [lp.token_ids[0] for lp in first.prompt_logprobs[1:]] == prompt[1:]
    assert [lp.logprobs[0] for lp in first.prompt_logprobs[1:]] == [
        -float(p) for p in range(1, prompt_len)]
    reported = [p for rid, p in worker.positions if rid == "b"]
    assert set(reported) == set(range(1, prompt_len))
    if sent_first:
        assert len(reported) == prompt_len - 1  # never computed again
        assert all(n is None and outs > 0 for n, outs, _ in admissions[1:])
        assert any(computed > 0 for _, _, computed in admissions[1:])  # prefix cache read
    else:
        assert len(reported) > prompt_len - 1  # recomputed after a preemption
        assert all(n == 2 and computed == 0 for n, _, computed in admissions)


def test_request_files_by_position():
    r = Request("x", b"", [1, 2, 3, 4], SamplingParams(prompt_logprobs=0), max_tokens=1)
    assert r.needs_prompt_logits and r.prompt_logprobs == [None] * 4
    lp = [TokenLogprobs([t], [0.0], [1]) for t in (2, 3, 4, 5)]
    r.add_prompt_logprobs(1, lp[:2])
    r.add_prompt_logprobs(1, lp[:2])  # recomputed: the same slots again
    r.add_prompt_logprobs(3, lp[2:])  # runs past the prompt: cut, the list keeps its size
    assert r.prompt_logprobs == [None, *lp[:3]]
    assert r.sampling_for_workers() is r.sampling
    r.prompt_logprobs = None  # sent
    assert r.sampling_for_workers().prompt_logprobs is None and not r.needs_prompt_logits


# ---- an engine process -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def engine(llama_dir, request):
    """A small step budget (prompts are chunked), prefix caching on (the default); at TP=2
    every rank runs the LM head on the prompt rows (its all-gather), rank 0 reports."""
    e = start_engine(llama_dir, block_size=4, max_num_batched_tokens=8,
                     tensor_parallel_size=request.param)
    yield e
    e.shutdown()


def serve(engine, requests: list[EngineRequest]) -> dict[str, list]:
    client = EngineClient(engine.address, alive=engine.alive)
    client.connect()
    try:
        outs: dict[str, list] = {r.request_id: [] for r in requests}
        done: set[str] = set()
        for r in requests:
            client.add_request(r)
        deadline = time.monotonic() + 60
        while done != set(outs) and time.monotonic() < deadline:
            got = client.recv(1000)
            if got is None or got[0] != MsgType.OUTPUTS:
                continue
            for o in got[1].outputs:
                outs[o.request_id].append(o)
                if o.finish_reason is not None:
                    done.add(o.request_id)
        assert done == set(outs)
        return outs
    finally:
        client.close()


def test_engine_prompt_logprobs_with_chunking_and_a_shared_prefix(engine, llama_dir):
    prompt = _prompts(1, [30], seed=31)[0]
    other = prompt[:24] + _prompts(1, [7], seed=32)[0]
    serve(engine, [wire("warm", prompt)])  # its blocks are in the prefix cache now
    outs = serve(engine, [wire("a", prompt, prompt_logprobs=3),
                          wire("b", other, prompt_logprobs=0, max_tokens=2),
                          wire("plain", other)])
    a, b, plain = outs["a"], outs["b"], outs["plain"]
    assert a[0].num_cached_tokens == 0 and b[0].num_cached_tokens == 0
    assert plain[0].num_cached_tokens > 0 and plain[0].prompt_logprobs is None
    assert all(o.prompt_logprobs is None for o in a[1:] + b[1:])  # first output only
    worst = max(check_against_reference(a[0].prompt_logprobs, prompt,
                                        hf_prompt_logprobs(llama_dir, prompt), 3),
                check_against_reference(b[0].prompt_logprobs, other,
                                        hf_prompt_logprobs(llama_dir, other), 0))
    print(f"engine: max |prompt logprob - transformers| = {worst:.2e}")
    assert all(o.finish_reason in (None, FinishReason.LENGTH) for o in a)
