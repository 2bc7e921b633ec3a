"""DiffusionLMScheduler driven by a fake worker (no model): one step per engine step for every
running request, joining at step boundaries, committed blocks as outputs (cut at a stop token
or max_tokens), KV blocks held for the whole sequence and freed on abort, and what a
masked-diffusion LM refuses. Also `DiffusionParams` and `resolve_diffusion` on their own.

`FakeWorker` does what a DiffusionLMRunner does with a plan and checks the protocol on the
way: each request commits one block every `steps_per_block` steps (a threshold block: every
step), its tokens taken from a script; it refuses a step for an unknown or finished request
and a drop of a request it does not hold.
"""

from __future__ import annotations

import pytest

from zomni.core.dllm_scheduler import DiffusionLMScheduler
from zomni.core.token_scheduler import TokenScheduler
from zomni.proto import (
    ContextLengthExceeded,
    DiffusionLMModelInfo,
    DiffusionLMRunnerInfo,
    DiffusionLMRunnerOutput,
    DiffusionLMSchedulerOutput,
    DiffusionParams,
    EngineConfig,
    EngineRequest,
    FinishReason,
    ImageRequest,
    InvalidRequest,
    SamplingParams,
    TokenModelInfo,
    TokenRunnerInfo,
)
from zomni.proto.diffusion import resolve_diffusion

EOS, MASK = 2, 511
MODEL = DiffusionLMModelInfo(max_model_len=256, vocab_size=512, eos_token_ids=[EOS],
                             mask_token_id=MASK, remasking="low_confidence", block_length=8)


class FakeWorker:
    def __init__(self, script=lambda request_id, i: 100 + i):
        self.script = script  # (request id, answer position) -> token
        # request id -> [blocks done, num blocks, steps a block, step in block, block length]
        self.held: dict[str, list] = {}
        self.batches: list[list[str]] = []

    def execute(self, plan: DiffusionLMSchedulerOutput) -> DiffusionLMRunnerOutput:
        for rid in plan.finished_request_ids:
            assert rid in self.held, f"dropping {rid}, which the worker does not hold"
            del self.held[rid]
        for new in plan.new_requests:
            assert new.request_id not in self.held
            d = new.sampling.diffusion
            num_blocks = new.gen_length // d.block_length
            per_block = 1 if d.threshold is not None else d.steps // num_blocks
            self.held[new.request_id] = [0, num_blocks, per_block, 0, d.block_length]
        self.batches.append(list(plan.scheduled_request_ids))
        ids, blocks = [], []
        for rid in plan.scheduled_request_ids:
            state = self.held[rid]
            assert state[0] < state[1], f"a step for {rid}, which has no block left"
            state[3] += 1
            if state[3] == state[2]:
                start = state[0] * state[4]
                ids.append(rid)
                blocks.append([self.script(rid, i) for i in range(start, start + state[4])])
                state[0], state[3] = state[0] + 1, 0
                if state[0] == state[1]:
                    del self.held[rid]
        return DiffusionLMRunnerOutput(plan.step_id, ids, blocks)


@pytest.fixture(scope="module")
def model_dir(dllm_dirs) -> str:
    return str(dllm_dirs["llada"])  # EngineConfig checks the folder; MODEL is what counts


def make(model_dir: str, num_kv_blocks: int = 64, block_size: int = 16,
         **config) -> DiffusionLMScheduler:
    config = EngineConfig(model=model_dir, **{"max_num_seqs": 8, **config})
    return DiffusionLMScheduler(config, MODEL,
                                DiffusionLMRunnerInfo(num_kv_blocks=num_kv_blocks,
                                                      block_size=block_size))


def request(rid: str, prompt=(5, 6, 7), **sampling) -> EngineRequest:
    sampling.setdefault("temperature", 0.0)
    return EngineRequest(rid, list(prompt), SamplingParams(**sampling))


def run(sched: DiffusionLMScheduler, worker: FakeWorker, outputs: dict | None = None,
        max_steps: int = 100) -> dict[str, list]:
    """Step until nothing is left; every output per request id, in order."""
    outputs = {} if outputs is None else outputs
    for _ in range(max_steps):
        plan = sched.schedule()
        if plan is None:
            break
        for outs in sched.update_from_output(plan, worker.execute(plan)).values():
            for out in outs:
                outputs.setdefault(out.request_id, []).append(out)
    return outputs


def tokens(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_one_step_per_engine_step_and_blocks_as_outputs(model_dir):
    sched, worker = make(model_dir), FakeWorker()
    # 20 tokens -> 3 blocks of 8, 24 steps -> 8 a block
    sched.add_request(request("a", max_tokens=20, ignore_eos=True), b"c")
    outs = run(sched, worker)["a"]
    assert [len(o.new_token_ids) for o in outs] == [8, 8, 4]  # the last block cut at 20
    assert tokens(outs) == [100 + i for i in range(20)]
    assert [o.finish_reason for o in outs] == [None, None, FinishReason.LENGTH]
    assert outs[0].num_prompt_tokens == 3 and outs[1].num_prompt_tokens == 0
    assert len(worker.batches) == 24 and not worker.held
    stats = sched.get_stats()
    assert stats.denoising_steps_total == 24 and stats.generation_tokens_total == 20


def test_requests_join_at_the_next_step_each_at_its_own_block(model_dir):
    sched, worker = make(model_dir), FakeWorker()
    sched.add_request(request("a", max_tokens=16, ignore_eos=True), b"c")
    outputs: dict = {}
    for _ in range(3):
        plan = sched.schedule()
        sched.update_from_output(plan, worker.execute(plan))
    sched.add_request(request("b", max_tokens=8, ignore_eos=True,
                              diffusion=DiffusionParams(steps=2)), b"c")
    run(sched, worker, outputs)
    assert worker.batches[:3] == [["a"]] * 3
    assert worker.batches[3:5] == [["a", "b"]] * 2  # b joined at step 4; done after 2 steps
    assert worker.batches[5:] == [["a"]] * 11
    assert tokens(outputs["b"]) == [100 + i for i in range(8)]


def test_a_stop_token_cuts_the_block_and_ends_the_request(model_dir):
    script = {0: 7, 1: EOS, 2: 9}  # answer position -> token; EOS at 1
    sched, worker = make(model_dir), FakeWorker(lambda rid, i: script.get(i, 50))
    sched.add_request(request("eos", max_tokens=16), b"c")
    sched.add_request(request("ignore", max_tokens=16, ignore_eos=True), b"c")
    sched.add_request(request("min", max_tokens=16, min_tokens=3), b"c")
    sched.add_request(request("stop-id", max_tokens=16, ignore_eos=True,
                              stop_token_ids=[9]), b"c")
    outputs = run(sched, worker)
    assert tokens(outputs["eos"]) == [7, EOS]
    assert outputs["eos"][-1].finish_reason == FinishReason.STOP
    assert len(tokens(outputs["ignore"])) == 16
    assert outputs["ignore"][-1].finish_reason == FinishReason.LENGTH
    assert len(tokens(outputs["min"])) == 16  # its only EOS comes before min_tokens
    assert tokens(outputs["stop-id"]) == [7, EOS, 9]
    # the stopped requests were still held by the worker: they were dropped in a later plan
    assert not worker.held and not sched.has_unfinished_requests()


def test_kv_blocks_bound_admission_and_abort_frees_them(model_dir):
    # prompt 3 + 16 positions = 19 -> 2 blocks of 16; 5 blocks hold two such requests
    sched, worker = make(model_dir, num_kv_blocks=5), FakeWorker()
    for rid in "abc":
        sched.add_request(request(rid, max_tokens=16, ignore_eos=True,
                                  diffusion=DiffusionParams(cache="dual")), b"c")
    sched.add_request(request("no-cache", max_tokens=16, ignore_eos=True), b"c")
    plan = sched.schedule()
    assert [r.request_id for r in plan.new_requests] == ["a", "b"]  # c waits; so does no-cache
    assert all(len(r.block_ids) == 2 for r in plan.new_requests)
    assert sched.kv_cache_manager.num_free_blocks == 1
    sched.update_from_output(plan, worker.execute(plan))
    out = sched.abort_requests(["a"])[b"c"][0]
    assert out.finish_reason == FinishReason.ABORT
    plan = sched.schedule()
    assert plan.finished_request_ids == ["a"]
    assert [r.request_id for r in plan.new_requests] == ["c", "no-cache"]
    assert plan.new_requests[1].block_ids == []  # without a cache: no KV kept between steps
    sched.update_from_output(plan, worker.execute(plan))
    run(sched, worker)
    assert sched.kv_cache_manager.num_free_blocks == 5 and not worker.held
    # a request that can never fit is refused at once
    with pytest.raises(InvalidRequest, match="KV blocks") as e:
        sched.add_request(request("huge", prompt=range(3, 100), max_tokens=16,
                                  diffusion=DiffusionParams(cache="prefix")), b"c")
    assert e.value.param == "max_tokens"


def test_abort_of_a_waiting_request_and_unknown_ids(model_dir):
    sched = make(model_dir, max_num_seqs=1)
    sched.add_request(request("a", max_tokens=8), b"c")
    sched.add_request(request("b", max_tokens=8), b"c")
    sched.schedule()
    outs = sched.abort_requests(["b", "nope"])[b"c"]
    assert [o.request_id for o in outs] == ["b"] and outs[0].num_prompt_tokens == 3
    assert sched.finished_req_ids == []  # b never reached the worker


def test_defaults_and_seeds_are_resolved_by_the_engine(model_dir):
    sched = make(model_dir)
    sched.add_request(request("a", max_tokens=10), b"c")
    sched.add_request(request("b", max_tokens=None, seed=5), b"c")
    a, b = sched.schedule().new_requests
    assert a.gen_length == 16 and a.sampling.max_tokens == 10
    assert a.sampling.diffusion == DiffusionParams(steps=16, block_length=8,
                                                   remasking="low_confidence", cache="none")
    assert a.sampling.seed is not None and b.sampling.seed == 5
    assert b.gen_length == 128 and b.sampling.max_tokens == 128


@pytest.mark.parametrize("sampling, param", [
    (dict(logprobs=1), "logprobs"),
    (dict(prompt_logprobs=0), "prompt_logprobs"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(logit_bias={3: 1.0}), "logit_bias"),
    (dict(min_p=0.1), "min_p"),
    (dict(n=2), "n"),
    (dict(top_p=0.9), "top_p"),  # LLaDA's remasking takes no nucleus
    (dict(diffusion=DiffusionParams(steps=3)), "steps"),  # 2 blocks
    (dict(top_k=5), "top_k"),
    (dict(max_tokens=300), "max_tokens"),
])
def test_what_a_diffusion_lm_refuses(model_dir, sampling, param):
    sampling.setdefault("max_tokens", 16)
    with pytest.raises((InvalidRequest, ContextLengthExceeded)) as e:
        make(model_dir).add_request(request("r", **sampling), b"c")
    assert e.value.param == param, e.value


def test_prompt_checks(model_dir):
    sched = make(model_dir)
    for prompt, match in (([], "empty"), ([5, 512], r"\[0, 512\)"), ([5, MASK], "mask token")):
        with pytest.raises(InvalidRequest, match=match):
            sched.add_request(request("r", prompt=prompt), b"c")
    with pytest.raises(InvalidRequest, match="EngineRequest"):
        sched.add_request(ImageRequest("img", prompt="x"), b"c")


def test_an_autoregressive_llm_refuses_diffusion_params(llama_dir):
    sched = TokenScheduler(EngineConfig(model=str(llama_dir)),
                           TokenModelInfo(max_model_len=64, vocab_size=512, eos_token_ids=[EOS]),
                           TokenRunnerInfo(num_kv_blocks=8, block_size=16,
                                           max_num_batched_tokens=64))
    with pytest.raises(InvalidRequest, match="masked-diffusion") as e:
        sched.add_request(request("r", diffusion=DiffusionParams(steps=4)), b"c")
    assert e.value.param == "diffusion"


# ---- DiffusionParams and resolve_diffusion ----------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    (dict(steps=0), "steps"),
    (dict(block_length="8"), "block_length"),
    (dict(remasking="greedy"), "remasking"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=0.9, remasking="origin"), "threshold"),
    (dict(threshold=0.9, steps=8), "steps"),
    (dict(cache="full"), "cache"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(cfg_scale=1.0, cache="dual"), "cfg_scale"),
])
def test_diffusion_params_are_checked(fields, param):
    with pytest.raises(InvalidRequest) as e:
        DiffusionParams(**fields)
    assert e.value.param == param


def test_diffusion_params_from_a_dict():
    assert SamplingParams(diffusion={"steps": 4}).diffusion == DiffusionParams(steps=4)
    with pytest.raises(InvalidRequest, match="unknown keys"):
        SamplingParams(diffusion={"stepz": 4})


@pytest.mark.parametrize("remasking, block, max_tokens, gen_length", [
    ("low_confidence", 32, 5, 32), ("entropy", 32, 40, 64), ("low_confidence", 8, 16, 16)])
def test_resolve_rounds_max_tokens_up_to_blocks(remasking, block, max_tokens, gen_length):
    sampling, length = resolve_diffusion(SamplingParams(max_tokens=max_tokens), 10, 4096,
                                         remasking, block)
    assert length == gen_length and sampling.max_tokens == max_tokens
    d = sampling.diffusion
    assert (d.remasking, d.block_length, d.steps, d.cache) == (remasking, block, gen_length,
                                                               "none")
    with_threshold, _ = resolve_diffusion(SamplingParams(
        max_tokens=max_tokens, diffusion=DiffusionParams(threshold=0.9, remasking="maskgit_plus")),
        10, 4096, remasking, block)
    assert with_threshold.diffusion.steps is None  # a block takes the steps it needs


def test_a_threshold_needs_a_probability_remasking_after_defaults():
    threshold = SamplingParams(max_tokens=8, diffusion=DiffusionParams(threshold=0.9))
    with pytest.raises(InvalidRequest, match="entropy") as e:
        resolve_diffusion(threshold, 10, 4096, "entropy", 32)  # Dream's default
    assert e.value.param == "threshold"
    assert resolve_diffusion(threshold, 10, 4096, "low_confidence", 32)[0].diffusion.threshold \
        == 0.9
