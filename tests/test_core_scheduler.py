"""Scheduler driven by a fake worker (no model): batching, chunking, preemption, stops, aborts.

`FakeWorker` does what a real worker does with a plan and checks the protocol on the way: it
keeps each request's tokens and block table from `NewRequestData` / `CachedRequestData`, writes
"KV" (the token ids themselves) into block slots, checks that every position it attends to holds
the right token (this catches wrong prefix hits and evicted blocks), and samples a token that
depends on the whole sequence, like a model would.
"""

import collections
import random

import pytest

from zomni.core.request import Request, RequestStatus
from zomni.core.token_scheduler import TokenScheduler
from zomni.proto import (
    EngineConfig,
    EngineOverloaded,
    FinishReason,
    InvalidRequest,
    ModelRunnerOutput,
    SamplingParams,
    SchedulerOutput,
    TokenLogprobs,
    TokenModelInfo,
    TokenRunnerInfo,
)

EOS = 99


def seq_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole sequence, never EOS."""
    return 10 + (sum(t * (i + 1) for i, t in enumerate(tokens)) % 80)


class FakeWorker:
    def __init__(self, block_size: int, sample=seq_token):
        self.block_size = block_size
        self.sample = sample
        self.kv: dict[int, list[int | None]] = {}
        self.reqs: dict[str, dict] = {}

    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        for rid in plan.finished_request_ids:
            del self.reqs[rid]
        for new in plan.new_requests:
            assert new.request_id not in self.reqs
            assert new.num_computed_tokens % self.block_size == 0
            self.reqs[new.request_id] = dict(tokens=list(new.token_ids), blocks=list(new.block_ids),
                                             computed=new.num_computed_tokens)
        for cached in plan.cached_requests:
            state = self.reqs[cached.request_id]
            assert state["computed"] == cached.num_computed_tokens
            state["blocks"] += cached.new_block_ids
        # Schedule order: running requests first, then the newly admitted ones.
        order = [r.request_id for r in plan.cached_requests + plan.new_requests]
        assert list(plan.num_scheduled_tokens) == order
        assert plan.total_num_scheduled_tokens == sum(plan.num_scheduled_tokens.values())
        sampled_ids, sampled = [], []
        for rid, n in plan.num_scheduled_tokens.items():
            token = self._run(rid, n)
            if token is not None:
                sampled_ids.append(rid)
                sampled.append(token)
        return ModelRunnerOutput(step_id=plan.step_id, request_ids=sampled_ids,
                                 sampled_token_ids=sampled)

    def _run(self, rid: str, n: int) -> int | None:
        state, bs = self.reqs[rid], self.block_size
        tokens, blocks, start = state["tokens"], state["blocks"], state["computed"]
        assert n > 0 and start + n <= len(tokens) and len(blocks) * bs >= start + n
        for p in range(start):  # attention reads the whole prefix
            assert self.kv[blocks[p // bs]][p % bs] == tokens[p], (rid, p)
        for p in range(start, start + n):
            self.kv.setdefault(blocks[p // bs], [None] * bs)[p % bs] = tokens[p]
        state["computed"] = start + n
        if state["computed"] < len(tokens):
            return None
        token = self.sample(tokens)
        tokens.append(token)
        return token


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 100, '
        '"max_position_embeddings": 64}')
    return str(tmp_path)


def make_scheduler(model_dir, num_blocks=64, block_size=4, max_model_len=64,
                   max_num_batched_tokens=1024, **cfg) -> TokenScheduler:
    """A scheduler as the engine builds one: the KV and budget figures are what the workers
    resolved and reported."""
    config = EngineConfig(model=model_dir, **cfg)
    return TokenScheduler(config, TokenModelInfo(max_model_len, 100, [EOS]),
                          TokenRunnerInfo(num_blocks, block_size, max_num_batched_tokens))


_arrivals = iter(range(1, 10**9))


def make_request(rid, prompt, client=b"c", priority=0, **sampling) -> Request:
    sampling.setdefault("max_tokens", 8)
    return Request(request_id=rid, client_id=client, prompt_token_ids=list(prompt),
                   sampling=SamplingParams(**sampling),
                   max_tokens=min(sampling["max_tokens"] or 10**9, 64 - len(prompt)),
                   priority=priority, arrival_time=float(next(_arrivals)))


def run(sched: TokenScheduler, worker: FakeWorker, max_steps=500, on_step=None, ahead=False):
    """Step until idle; returns (plans, outputs per request id, finish reason per request id).

    ahead: as the engine with async scheduling, plan step N+1 before applying N's result."""
    plans, tokens, reasons = [], {}, {}
    in_flight: collections.deque = collections.deque()
    for _ in range(max_steps):
        if not sched.has_unfinished_requests() and not in_flight:
            break
        plan = sched.schedule()
        sent = plan is not None  # None: nothing to compute or drop
        if sent:
            plans.append(plan)
            assert plan.total_num_scheduled_tokens <= sched.max_num_batched_tokens
            assert plan.num_scheduled_tokens or plan.finished_request_ids
            assert len(sched.running) <= sched.config.max_num_seqs
            in_flight.append((plan, worker.execute(plan)))
        if in_flight and (len(in_flight) >= (2 if ahead else 1) or not sent):
            done, output = in_flight.popleft()
            for client, outs in sched.update_from_output(done, output).items():
                for out in outs:
                    assert out.request_id.startswith(client.decode())
                    tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                    if out.finish_reason is not None:
                        reasons[out.request_id] = out.finish_reason
        if on_step and sent:
            on_step(sched, plan)
    assert not sched.has_unfinished_requests() and not in_flight
    return plans, tokens, reasons


def test_decode_batching_and_first_output_fields(model_dir):
    sched = make_scheduler(model_dir)
    for i in range(3):
        sched.add_request(make_request(f"c{i}", range(i + 5), client=f"c{i}".encode()))
    plan = sched.schedule()
    assert [r.request_id for r in plan.new_requests] == ["c0", "c1", "c2"]
    assert plan.num_scheduled_tokens == {"c0": 5, "c1": 6, "c2": 7}
    worker = FakeWorker(4)
    outs = sched.update_from_output(plan, worker.execute(plan))
    assert set(outs) == {b"c0", b"c1", b"c2"}
    first = outs[b"c1"][0]
    assert (first.num_prompt_tokens, first.num_cached_tokens, len(first.new_token_ids)) == (6, 0, 1)
    plan = sched.schedule()
    assert plan.new_requests == [] and plan.num_scheduled_tokens == {"c0": 1, "c1": 1, "c2": 1}
    assert [r.num_computed_tokens for r in plan.cached_requests] == [5, 6, 7]
    outs = sched.update_from_output(plan, worker.execute(plan))
    assert outs[b"c0"][0].num_prompt_tokens == 0  # only on the first output
    plans, tokens, reasons = run(sched, worker)
    assert all(len(t) == 6 for t in tokens.values())  # 8 in all, 2 already taken above
    assert set(reasons.values()) == {FinishReason.LENGTH}
    assert sorted(plans[-1].finished_request_ids) == [] and sched.finished_req_ids == [
        "c0", "c1", "c2"]
    assert sorted(sched.schedule().finished_request_ids) == ["c0", "c1", "c2"]
    assert sched.kv_cache_manager.usage == 0.0


def test_chunked_prefill(model_dir):
    sched = make_scheduler(model_dir, max_num_batched_tokens=8, enable_prefix_caching=False)
    sched.add_request(make_request("c", range(20), max_tokens=2))
    worker = FakeWorker(4)
    seen = []
    for expect_start, expect_n in [(0, 8), (8, 8), (16, 4), (20, 1)]:
        plan = sched.schedule()
        data = plan.new_requests or plan.cached_requests
        assert (data[0].num_computed_tokens, plan.num_scheduled_tokens["c"]) == (
            expect_start, expect_n)
        assert bool(plan.new_requests) == (expect_start == 0)
        seen.append(sched.update_from_output(plan, worker.execute(plan)))
    assert seen[0] == seen[1] == {}
    assert seen[2][b"c"][0].num_prompt_tokens == 20
    assert seen[3][b"c"][0].finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_budget_and_max_num_seqs(model_dir, ahead):
    sched = make_scheduler(model_dir, max_num_batched_tokens=10, max_num_seqs=2)
    for i in range(5):
        sched.add_request(make_request(f"c{i}", [i + 1] * 7, max_tokens=3))
    plans, tokens, _ = run(sched, FakeWorker(4), ahead=ahead)
    assert max(len(p.num_scheduled_tokens) for p in plans) == 2
    assert max(p.total_num_scheduled_tokens for p in plans) == 10
    assert all(len(t) == 3 for t in tokens.values()) and len(tokens) == 5


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_preemption_resumes_with_complete_outputs(model_dir, ahead):
    def requests():
        return [make_request(f"c{i}", [i + 1] * 6, max_tokens=10) for i in range(4)]

    _, expected, _ = run(_with(make_scheduler(model_dir), requests()), FakeWorker(4))
    # 4 requests growing to 16 tokens need 16 blocks of 4; there are 12.
    sched = _with(make_scheduler(model_dir, num_blocks=12, max_model_len=48,
                                 enable_prefix_caching=False), requests())
    resumed = {}

    def check(s: TokenScheduler, plan: SchedulerOutput):
        for new in plan.new_requests:
            if new.request_id in resumed:
                assert new.token_ids[:6] == [int(new.request_id[1]) + 1] * 6
                assert len(new.token_ids) > new.num_prompt_tokens == 6
                resumed[new.request_id] = True
        for rid in plan.finished_request_ids:
            if rid in s.requests:  # preempted, not finished
                assert s.requests[rid].status == RequestStatus.PREEMPTED
                resumed[rid] = False

    _, tokens, _ = run(sched, FakeWorker(4), on_step=check, ahead=ahead)
    assert sched.num_preemptions > 0 and resumed and all(resumed.values())
    assert tokens == expected


def _with(sched: TokenScheduler, reqs: list[Request]) -> TokenScheduler:
    for r in reqs:
        sched.add_request(r)
    return sched


def test_priorities_lower_value_first(model_dir):
    sched = make_scheduler(model_dir, max_num_seqs=1)
    for rid, prio in [("c5", 5), ("c0", 0), ("c3", 3), ("c0b", 0)]:
        sched.add_request(make_request(rid, [1, 2, 3], priority=prio, max_tokens=1))
    plans, _, _ = run(sched, FakeWorker(4))
    assert [p.new_requests[0].request_id for p in plans if p.new_requests] == [
        "c0", "c0b", "c3", "c5"]


def test_preemption_victim_is_lowest_priority(model_dir):
    # 12 blocks of 4: three requests of 12 + 8 outputs cannot all grow to 5 blocks.
    sched = make_scheduler(model_dir, num_blocks=12, max_model_len=48,
                           enable_prefix_caching=False)
    for rid, prio in [("c1", 1), ("c9", 9), ("c5", 5)]:
        sched.add_request(make_request(rid, [ord(rid[1])] * 12, priority=prio, max_tokens=8))
    preempted = []
    run(sched, FakeWorker(4), on_step=lambda s, p: preempted.extend(
        r for r in p.finished_request_ids if r in s.requests))
    assert preempted and preempted[0] == "c9"


def test_request_preempts_itself_when_lowest_priority(model_dir):
    sched = make_scheduler(model_dir, num_blocks=8, max_model_len=32)
    worker = FakeWorker(4)
    sched.add_request(make_request("c9", range(15), priority=9))  # 4 blocks, last one full soon
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    sched.add_request(make_request("c0", range(50, 66), priority=0))  # 4 blocks
    plan = sched.schedule()
    assert plan.num_scheduled_tokens == {"c9": 1, "c0": 16}
    sched.update_from_output(plan, worker.execute(plan))
    plan = sched.schedule()  # c9 runs first and needs a 5th block: it is the victim itself
    assert plan.finished_request_ids == ["c9"] and plan.num_scheduled_tokens == {"c0": 1}
    assert plan.cached_requests[0].new_block_ids != []
    assert sched.requests["c9"].status == RequestStatus.PREEMPTED
    assert sched.requests["c9"].num_computed_tokens == 0
    sched.update_from_output(plan, worker.execute(plan))
    _, tokens, _ = run(sched, worker)
    assert len(tokens["c9"]) == 6  # 2 before the preemption, 6 after: all 8 in order


def test_abort_frees_blocks_and_reports_running_ids(model_dir):
    sched = make_scheduler(model_dir, max_num_seqs=1)
    sched.add_request(make_request("c0", range(9)))
    sched.add_request(make_request("c1", range(5)))
    worker = FakeWorker(4)
    plan = sched.schedule()
    sched.update_from_output(plan, worker.execute(plan))
    assert sched.kv_cache_manager.usage > 0
    requests = [sched.requests["c0"], sched.requests["c1"]]
    outs = sched.abort_requests(["c0", "c1", "nope"])
    assert all(r.status == RequestStatus.FINISHED_ABORTED for r in requests)
    assert sched.kv_cache_manager.usage == 0.0 and not sched.has_unfinished_requests()
    plan = sched.schedule()
    assert plan.finished_request_ids == ["c0"]  # c1 never reached the worker
    assert plan.num_scheduled_tokens == {}
    worker.execute(plan)
    assert [o.request_id for o in outs[b"c"]] == ["c0", "c1"]
    assert [o.finish_reason for o in outs[b"c"]] == [FinishReason.ABORT] * 2
    assert [o.num_prompt_tokens for o in outs[b"c"]] == [0, 5]  # c0 already reported its own


def test_abort_between_schedule_and_update_drops_the_token(model_dir):
    sched = make_scheduler(model_dir)
    sched.add_request(make_request("c", range(5)))
    plan = sched.schedule()
    output = FakeWorker(4).execute(plan)
    sched.abort_requests(["c"])
    assert sched.update_from_output(plan, output) == {}


def _finish(model_dir, sample, max_model_len=64, ahead=False, **sampling):
    sched = make_scheduler(model_dir, max_model_len=max_model_len)
    sched.add_request(make_request("c", [1, 2, 3], **sampling))
    _, tokens, reasons = run(sched, FakeWorker(4, sample=sample), ahead=ahead)
    return tokens["c"], reasons["c"]


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_stop_conditions(model_dir, ahead):
    """Async: the step planned before a stop is known computes one more token, which is
    dropped; the outputs are the same."""
    def finish(sample, **kw):
        return _finish(model_dir, sample, ahead=ahead, **kw)

    eos_third = lambda toks: EOS if len(toks) == 5 else 7  # noqa: E731
    assert finish(eos_third) == ([7, 7, EOS], FinishReason.STOP)
    assert finish(eos_third, ignore_eos=True) == ([7, 7, EOS] + [7] * 5, FinishReason.LENGTH)
    assert finish(lambda t: 7, stop_token_ids=[7]) == ([7], FinishReason.STOP)
    assert finish(lambda t: 7, stop_token_ids=[7], min_tokens=4) == ([7] * 4, FinishReason.STOP)
    assert finish(lambda t: EOS, min_tokens=2) == ([EOS] * 2, FinishReason.STOP)
    assert finish(lambda t: 7, max_tokens=5) == ([7] * 5, FinishReason.LENGTH)
    assert finish(lambda t: 7, max_model_len=10, max_tokens=None) == ([7] * 7,
                                                                      FinishReason.LENGTH)
    # A stop token on the last allowed position reports STOP: the model did end there.
    assert finish(eos_third, max_tokens=3) == ([7, 7, EOS], FinishReason.STOP)


def test_async_plans_the_next_decode_before_its_input_token_is_known(model_dir):
    sched = make_scheduler(model_dir)
    sched.add_request(make_request("c", [1, 2, 3], max_tokens=2))
    worker = FakeWorker(4)
    first = sched.schedule()
    first_out = worker.execute(first)
    second = sched.schedule()  # before the first token is back: the worker has it
    assert second.num_scheduled_tokens == {"c": 1}
    assert second.cached_requests[0].num_computed_tokens == 3
    second_out = worker.execute(second)
    assert sched.schedule() is None  # 2 tokens in flight = max_tokens: nothing to plan
    assert sched.update_from_output(first, first_out)[b"c"][0].finish_reason is None
    last = sched.update_from_output(second, second_out)[b"c"][0]
    assert last.new_token_ids == second_out.sampled_token_ids
    assert last.finish_reason == FinishReason.LENGTH and not sched.has_unfinished_requests()


def test_async_token_planned_past_a_stop_is_dropped(model_dir):
    sched = make_scheduler(model_dir)
    sched.add_request(make_request("c", [1, 2, 3]))
    worker = FakeWorker(4, sample=lambda toks: EOS)
    first = sched.schedule()
    first_out = worker.execute(first)
    second = sched.schedule()
    second_out = worker.execute(second)
    assert second_out.request_ids == ["c"]  # the worker did compute a token after EOS
    assert sched.update_from_output(first, first_out)[b"c"][0].finish_reason == \
        FinishReason.STOP
    assert sched.update_from_output(second, second_out) == {}
    assert sched.schedule().finished_request_ids == ["c"]
    assert sched.kv_cache_manager.usage == 0.0


def test_logprobs_pass_through(model_dir):
    sched = make_scheduler(model_dir)
    sched.add_request(make_request("c", [1, 2], logprobs=1))
    plan = sched.schedule()
    lp = TokenLogprobs(token_ids=[7, 3], logprobs=[-0.1, -2.5], ranks=[1, 2])
    outs = sched.update_from_output(plan, ModelRunnerOutput(
        step_id=plan.step_id, request_ids=["c"], sampled_token_ids=[7], logprobs=[lp]))
    assert outs[b"c"][0].new_logprobs == [lp]


def test_overload_and_bad_requests(model_dir):
    sched = make_scheduler(model_dir, max_waiting_requests=2, max_model_len=16)
    sched.add_request(make_request("a", [1]))
    sched.add_request(make_request("b", [1]))
    with pytest.raises(EngineOverloaded):
        sched.add_request(make_request("c", [1]))
    sched.schedule()  # both start running; the queue has room again
    with pytest.raises(InvalidRequest):
        sched.add_request(make_request("a", [1]))
    with pytest.raises(InvalidRequest):
        sched.add_request(make_request("long", range(16)))


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_kv_cache_smaller_than_max_model_len_caps_requests(model_dir, ahead):
    sched = make_scheduler(model_dir, num_blocks=3, max_model_len=16)  # holds 12 tokens
    with pytest.raises(InvalidRequest):
        sched.add_request(make_request("long", range(12)))
    sched.add_request(make_request("ca", range(3), max_tokens=None))
    sched.add_request(make_request("cb", range(20, 23), max_tokens=None))
    _, tokens, reasons = run(sched, FakeWorker(4), ahead=ahead)
    assert len(tokens["ca"]) == len(tokens["cb"]) == 9
    assert set(reasons.values()) == {FinishReason.LENGTH} and sched.num_preemptions > 0


def test_prefix_cache_hits_and_stats(model_dir):
    sched = make_scheduler(model_dir)
    worker = FakeWorker(4)
    sched.add_request(make_request("c0", range(10), max_tokens=1))
    run(sched, worker)
    sched.add_request(make_request("c1", list(range(9)) + [50, 51], max_tokens=2))
    plan = sched.schedule()
    assert plan.new_requests[0].num_computed_tokens == 8
    assert plan.num_scheduled_tokens == {"c1": 3}
    outs = sched.update_from_output(plan, worker.execute(plan))
    assert outs[b"c"][0].num_cached_tokens == 8
    stats = sched.get_stats()
    assert (stats.num_waiting, stats.num_running, stats.kv_usage, stats.num_kv_blocks,
            stats.prefix_cache_hit_rate, stats.num_preemptions) == (0, 1, 3 / 64, 64, 8 / 21, 0)
    assert (stats.prompt_tokens_total, stats.generation_tokens_total) == (10 + 11, 1 + 1)
    assert sched.has_request("c1") and not sched.has_request("c0")


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_random_workload_matches_unconstrained_run(model_dir, ahead):
    """Random prompts sharing prefixes, priorities, scarce blocks, small budget and aborts: every
    request that is not aborted produces exactly the tokens of a run with plenty of room."""
    rng = random.Random(0)
    base = [rng.randrange(1, 90) for _ in range(24)]
    specs = [(f"c{i}", base[:rng.randrange(1, 24)] + [rng.randrange(1, 90)
                                                   for _ in range(rng.randrange(1, 8))],
              rng.randrange(3), rng.randrange(1, 12)) for i in range(30)]

    def requests():
        return [make_request(rid, p, priority=pr, max_tokens=mt) for rid, p, pr, mt in specs]

    _, expected, _ = run(_with(make_scheduler(model_dir, num_blocks=512), requests()),
                         FakeWorker(4))
    sched = _with(make_scheduler(model_dir, num_blocks=18, max_num_batched_tokens=12,
                                 max_num_seqs=6), requests())
    aborted = set()

    def maybe_abort(s: TokenScheduler, plan: SchedulerOutput):
        if rng.random() < 0.1 and s.requests:
            rid = rng.choice(sorted(s.requests))
            aborted.update(o.request_id for outs in s.abort_requests([rid]).values() for o in outs)

    _, tokens, _ = run(sched, FakeWorker(4), on_step=maybe_abort, ahead=ahead)
    assert sched.num_preemptions > 0 and aborted and sched.kv_cache_manager.num_hit_tokens > 0
    for rid in expected:
        if rid not in aborted:
            assert tokens[rid] == expected[rid], rid
    assert sched.kv_cache_manager.usage == 0.0
