"""DenoiseScheduler driven by a fake worker (no model): joining at step boundaries, batch keys
taking turns, the image bound, priorities and preemption, aborts, validation, async planning.

`FakeWorker` does what an ImageRunner does with a plan and checks the protocol on the way: it
holds each admitted request's step count, refuses a step for an unknown or finished request,
and returns "pixels" for requests whose last step it just ran.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from zomni.core.denoise_scheduler import DenoiseScheduler
from zomni.core.request import RequestStatus
from zomni.proto import (
    DenoiseRunnerOutput,
    DenoiseSchedulerOutput,
    EngineConfig,
    EngineOverloaded,
    EngineRequest,
    FinishReason,
    ImageModelInfo,
    ImageParams,
    ImageRequest,
    ImageRunnerInfo,
    InvalidRequest,
    SamplingParams,
)
from zomni.proto.arrays import add_array, read_array

TEXT = ImageModelInfo(conditioning="text", default_height=64, default_width=64,
                      size_multiple=16, max_height=256, max_width=256, default_num_steps=28,
                      default_guidance_scale=7.0)


class FakeWorker:
    def __init__(self):
        self.steps: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self.batches: list[list[str]] = []

    def execute(self, plan: DenoiseSchedulerOutput) -> tuple[DenoiseRunnerOutput, list]:
        for rid in plan.finished_request_ids:
            self.steps.pop(rid, None)
        for new in plan.new_requests:
            assert new.request_id not in self.steps
            self.steps[new.request_id], self.totals[new.request_id] = 0, new.num_steps
        self.batches.append(list(plan.scheduled_request_ids))
        done, frames, refs = [], [], []
        for rid in plan.scheduled_request_ids:
            assert self.steps[rid] < self.totals[rid], rid
            self.steps[rid] += 1
            if self.steps[rid] == self.totals[rid]:
                done.append(rid)
                refs.append(add_array(np.full((1, 2, 2, 3), len(done), np.uint8), frames))
                del self.steps[rid]
        return DenoiseRunnerOutput(plan.step_id, done, refs), frames


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    return str(tmp_path)


def make_scheduler(model_dir, max_images=8, model=TEXT, **cfg) -> DenoiseScheduler:
    return DenoiseScheduler(EngineConfig(model=model_dir, **cfg), model,
                            ImageRunnerInfo(max_num_seqs=max_images))


_arrivals = iter(range(1, 10**9))


def image_request(rid, steps=3, priority=0, **params) -> ImageRequest:
    params.setdefault("seed", 0)
    return ImageRequest(rid, prompt=f"p {rid}", priority=priority,
                        params=ImageParams(num_inference_steps=steps, **params),
                        arrival_time=float(next(_arrivals)))


def run(sched, worker, max_steps=500, ahead=False, on_step=None):
    """Step until idle; returns (plans, final outputs by request id)."""
    plans, finals = [], {}
    in_flight = collections.deque()
    for _ in range(max_steps):
        if not sched.has_unfinished_requests() and not in_flight:
            break
        plan = sched.schedule()
        if plan is not None:
            plans.append(plan)
            in_flight.append((plan, *worker.execute(plan)))
        if in_flight and (len(in_flight) >= (2 if ahead else 1) or plan is None):
            done, result, frames = in_flight.popleft()
            for client, outs in sched.update_from_output(done, result, frames).items():
                for out in outs:
                    assert out.request_id.startswith(client.decode())
                    finals[out.request_id] = (out, frames)
        if on_step and plan is not None:
            on_step(sched, plan)
    assert not sched.has_unfinished_requests() and not in_flight
    return plans, finals


def test_requests_join_at_the_next_step_each_at_its_own_index(model_dir):
    sched, worker = make_scheduler(model_dir), FakeWorker()
    sched.add_request(image_request("ca", steps=4), b"c")
    plan = sched.schedule()
    assert [r.request_id for r in plan.new_requests] == ["ca"]
    assert plan.scheduled_request_ids == ["ca"]
    sched.update_from_output(plan, *worker.execute(plan))
    sched.add_request(image_request("cb", steps=2), b"c")  # arrives while ca runs
    plan = sched.schedule()
    assert [r.request_id for r in plan.new_requests] == ["cb"]
    assert plan.scheduled_request_ids == ["ca", "cb"]  # ca at step 1, cb at step 0
    sched.update_from_output(plan, *worker.execute(plan))
    _, finals = run(sched, worker)
    assert worker.batches == [["ca"], ["ca", "cb"], ["ca", "cb"], ["ca"]]
    assert set(finals) == {"cb", "ca"}
    out, frames = finals["ca"]
    assert out.finish_reason == FinishReason.STOP and out.num_steps == 4
    assert read_array(out.pixels, frames).shape == (1, 2, 2, 3)


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async"])
def test_every_request_gets_exactly_its_steps(model_dir, ahead):
    sched, worker = make_scheduler(model_dir, max_images=3), FakeWorker()
    for i, steps in enumerate([5, 1, 3, 7, 2, 4]):
        sched.add_request(image_request(f"c{i}", steps=steps), b"c")
    plans, finals = run(sched, worker, ahead=ahead)
    assert set(finals) == {f"c{i}" for i in range(6)}
    count = collections.Counter(r for p in plans for r in p.scheduled_request_ids)
    assert [count[f"c{i}"] for i in range(6)] == [5, 1, 3, 7, 2, 4]
    assert all(len(p.scheduled_request_ids) <= 3 for p in plans)
    stats = sched.get_stats()
    assert stats.images_total == 6 and stats.denoising_steps_total == 22


def test_batch_keys_take_turns(model_dir):
    sched, worker = make_scheduler(model_dir), FakeWorker()
    sched.add_request(image_request("ca", steps=3, height=64), b"c")
    sched.add_request(image_request("cb", steps=3, height=128), b"c")  # another shape
    sched.add_request(image_request("cc", steps=3, height=64), b"c")
    sched.add_request(image_request("cd", steps=3, guidance_scale=1.0), b"c")  # no CFG
    run(sched, worker)
    assert worker.batches == [["ca", "cc"], ["cb"], ["cd"]] * 3


def test_image_bound_and_priority_order(model_dir):
    sched, worker = make_scheduler(model_dir, max_images=4), FakeWorker()
    sched.add_request(image_request("c5", steps=2, priority=5, n=2), b"c")
    sched.add_request(image_request("c0", steps=2, priority=0, n=2), b"c")
    sched.add_request(image_request("c1", steps=2, priority=1, n=3), b"c")
    plans, _ = run(sched, worker)
    admitted = [[r.request_id for r in p.new_requests] for p in plans if p.new_requests]
    # c1's 3 images do not fit beside c0's 2, nor c5's beside c1's; nothing overtakes
    assert admitted == [["c0"], ["c1"], ["c5"]]


def test_higher_priority_preempts_and_the_victim_restarts(model_dir):
    sched, worker = make_scheduler(model_dir, max_images=2), FakeWorker()
    sched.add_request(image_request("c9", steps=4, priority=9, n=2), b"c")
    for _ in range(2):
        plan = sched.schedule()
        sched.update_from_output(plan, *worker.execute(plan))
    sched.add_request(image_request("c0", steps=2, priority=0, n=2), b"c")
    plan = sched.schedule()
    assert plan.finished_request_ids == ["c9"] and plan.scheduled_request_ids == ["c0"]
    assert sched.requests["c9"].status == RequestStatus.PREEMPTED
    sched.update_from_output(plan, *worker.execute(plan))
    plans, finals = run(sched, worker)
    assert set(finals) == {"c0", "c9"} and sched.num_preemptions == 1
    count = collections.Counter(r for p in plans for r in p.scheduled_request_ids)
    assert count["c9"] == 4  # all four steps again, from its seed


def test_no_preemption_among_equal_priorities(model_dir):
    sched, worker = make_scheduler(model_dir, max_images=1), FakeWorker()
    sched.add_request(image_request("ca", steps=3), b"c")
    plan = sched.schedule()
    sched.update_from_output(plan, *worker.execute(plan))
    sched.add_request(image_request("cb", steps=3), b"c")
    plans, _ = run(sched, worker)
    assert [r for p in plans for r in p.scheduled_request_ids] == ["ca"] * 2 + ["cb"] * 3
    assert sched.num_preemptions == 0


def test_abort_running_and_waiting(model_dir):
    sched, worker = make_scheduler(model_dir, max_images=1), FakeWorker()
    sched.add_request(image_request("ca", steps=5), b"c")
    sched.add_request(image_request("cb", steps=5), b"c")
    plan = sched.schedule()
    result = worker.execute(plan)
    outs = sched.abort_requests(["ca", "cb", "nope"])
    assert [(o.request_id, o.finish_reason) for o in outs[b"c"]] == [
        ("ca", FinishReason.ABORT), ("cb", FinishReason.ABORT)]
    assert sched.update_from_output(plan, *result) == {}
    assert not sched.has_unfinished_requests()
    plan = sched.schedule()
    assert plan.finished_request_ids == ["ca"]  # cb never reached the worker
    worker.execute(plan)
    assert worker.steps == {}


def test_abort_while_the_last_step_is_in_flight_drops_the_pixels(model_dir):
    sched, worker = make_scheduler(model_dir), FakeWorker()
    sched.add_request(image_request("ca", steps=1), b"c")
    plan = sched.schedule()
    result = worker.execute(plan)
    assert sched.schedule() is None  # its only step is in flight: nothing more to plan
    sched.abort_requests(["ca"])
    assert sched.update_from_output(plan, *result) == {}


def test_defaults_and_seeds_are_resolved_by_the_engine(model_dir):
    sched = make_scheduler(model_dir, seed=3)
    sched.add_request(ImageRequest("ca", prompt="x"), b"c")
    sched.add_request(ImageRequest("cb", prompt="x", params=ImageParams(seed=7)), b"c")
    new = {r.request_id: r for r in sched.schedule().new_requests}
    a, b = new["ca"], new["cb"]
    assert (a.height, a.width, a.num_steps, a.guidance_scale) == (64, 64, 28, 7.0)
    assert b.seed == 7 and 0 <= a.seed < 2**63
    again = make_scheduler(model_dir, seed=3)
    again.add_request(ImageRequest("ca", prompt="x"), b"c")
    assert again.schedule().new_requests[0].seed == a.seed  # same engine seed, same draws


@pytest.mark.parametrize(("request_", "param"), [
    (ImageRequest("c", prompt="x", params=ImageParams(height=72)), "size"),
    (ImageRequest("c", prompt="x", params=ImageParams(width=512)), "size"),
    (ImageRequest("c", class_labels=[1]), "class_labels"),
    (ImageRequest("c"), "prompt"),
    (ImageRequest("c", prompt="x", params=ImageParams(negative_prompt="y",
                                                      guidance_scale=1.0)), "negative_prompt"),
    (ImageRequest("c", prompt="x", params=ImageParams(n=9)), "n"),
    (EngineRequest("c", [1, 2], SamplingParams()), "model"),
])
def test_bad_requests_name_the_parameter(model_dir, request_, param):
    with pytest.raises(InvalidRequest) as e:
        make_scheduler(model_dir).add_request(request_, b"c")
    assert e.value.param == param


def test_class_conditional_and_fixed_size_models(model_dir):
    dit = ImageModelInfo(conditioning="class", default_height=32, default_width=32,
                         size_multiple=4, max_height=32, max_width=32, default_num_steps=50,
                         default_guidance_scale=4.0, num_classes=10, fixed_size=True)
    sched = make_scheduler(model_dir, model=dit)
    sched.add_request(ImageRequest("ca", class_labels=[1, 9], params=ImageParams(n=2)), b"c")
    assert sched.schedule().new_requests[0].num_images == 4
    for bad, param in [(ImageRequest("c", prompt="x"), "prompt"),
                       (ImageRequest("c", class_labels=[10]), "class_labels"),
                       (ImageRequest("c", class_labels=[]), "class_labels"),
                       (ImageRequest("c", class_labels=[1], params=ImageParams(height=64)),
                        "size")]:
        with pytest.raises(InvalidRequest) as e:
            sched.add_request(bad, b"c")
        assert e.value.param == param


def test_waiting_bound_and_duplicate_ids(model_dir):
    sched = make_scheduler(model_dir, max_waiting_requests=1)
    sched.add_request(image_request("ca"), b"c")
    with pytest.raises(EngineOverloaded):
        sched.add_request(image_request("cb"), b"c")
    sched.schedule()
    with pytest.raises(InvalidRequest):
        sched.add_request(image_request("ca"), b"c")
