"""The step cache (TeaCache, First-Block-Cache) under continuous batching, on tiny random SD3
and DiT pipelines, driven through ImageRunner by hand-built step plans:

- threshold 0 never skips: images equal the uncached ones exactly;
- at a positive threshold requests skip steps (first and last computed), and images and
  per-branch decisions equal the published algorithm run as a plain per-request loop over
  diffusers' own denoisers (`step_cache_reference.py`), PSNR >= 40 dB;
- a request gives the same decisions and image alone and batched with requests that joined
  at other steps (its state is its own);
- decisions are agreed across TP ranks (two gloo processes with different local metrics);
- bad parameters are an InvalidRequest naming the field; the engine default applies to
  requests without one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from image_utils import MIN_PSNR_DB, psnr, tiny_pipelines
from step_cache_reference import cached_images

from zomni.core.denoise_scheduler import DenoiseScheduler
from zomni.proto import (
    DenoiseRequestData,
    DenoiseSchedulerOutput,
    EngineConfig,
    ImageModelInfo,
    ImageParams,
    ImageRequest,
    ImageRunnerInfo,
    InvalidRequest,
    StepCacheParams,
    WorkerConfig,
)
from zomni.proto.arrays import read_array
from zomni.workers.image_runner import ImageRunner
from zomni.workers.step_cache import BranchCache, relative_l1


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return tiny_pipelines(tmp_path_factory)


@pytest.fixture(scope="module")
def runners(paths) -> dict[str, ImageRunner]:
    def make(model_dir) -> ImageRunner:
        config = EngineConfig(model=str(model_dir), device="cpu", max_num_seqs=16)
        return ImageRunner(WorkerConfig(engine=config, rank=0, engine_address=""))

    return {"sd3": make(paths.sd3), "dit": make(paths.dit)}


def request(kind: str, rid: str, steps: int, seed: int, cache: dict | None = None,
            guidance: float = 5.0, n: int = 1) -> DenoiseRequestData:
    params = StepCacheParams(**cache) if cache else None
    if kind == "sd3":
        return DenoiseRequestData(rid, f"a red circle {rid}", None, None, n, 32, 32, steps,
                                  guidance, seed, params)
    return DenoiseRequestData(rid, None, None, [seed % 5], n, 32, 32, steps, guidance, seed,
                              params)


def drive(runner: ImageRunner, arrivals: dict[int, list[DenoiseRequestData]]) -> dict:
    """Plans as the engine makes them for one batch key: requests join at the engine step in
    `arrivals`. request id -> (images, num_computed_steps, decisions per branch)."""
    remaining, states, done = {}, {}, {}
    step = 0
    while step <= max(arrivals) or remaining:
        new = arrivals.get(step, [])
        remaining.update({r.request_id: r.num_steps for r in new})
        result, frames = runner.execute(DenoiseSchedulerOutput(step, new, list(remaining), []))
        states.update({r.request_id: runner.requests.get(r.request_id) for r in new})
        for rid in list(remaining):
            remaining[rid] -= 1
            if not remaining[rid]:
                del remaining[rid]
        for rid, ref, computed in zip(result.request_ids, result.pixels,
                                      result.num_computed_steps):
            decisions = [b.computed for b in states[rid].cache] if states[rid] else []
            done[rid] = np.array(read_array(ref, frames)), computed, decisions
        step += 1
    assert runner.requests == {}
    return done


# ---- the policies --------------------------------------------------------------------------


def test_branch_decisions_follow_the_published_rules():
    def run(kind, threshold, metrics, cap=None, rescale=(1.0, 0.0)):
        branch = BranchCache(kind, threshold, cap, len(metrics), rescale)
        for i, metric in enumerate(metrics):
            branch.decide(metric)
            branch.residual = torch.zeros(1) if i == 0 else branch.residual
        return "".join("C" if c else "." for c in branch.computed)

    small = [None] + [0.01] * 7
    assert run("fbcache", 0.05, small) == "C......C"  # first and last always compute
    assert run("fbcache", 0.0, small) == "CCCCCCCC"  # threshold 0 never skips
    assert run("fbcache", 0.05, small, cap=2) == "C..C..CC"
    assert run("fbcache", 0.05, [None, 0.01, 0.2, 0.01, 0.01]) == "C.C.C"
    # TeaCache accumulates: 0.03 + 0.03 >= 0.05 computes and resets the sum
    assert run("teacache", 0.05, [None] + [0.03] * 6) == "C.C.C.C"
    # with the SD3 polynomial (p(0) = 0.264) even no change adds up
    assert run("teacache", 0.6, [None] + [0.0] * 6,
               rescale=(4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00,
                        2.64230861e-01)) == "C..C..C"


# ---- exactness, the reference, batching ----------------------------------------------------


@pytest.mark.parametrize("kind", ["sd3", "dit"])
def test_threshold_zero_equals_uncached_exactly(runners, kind):
    def arrivals(cache_a, cache_b):
        return {0: [request(kind, "a", 6, 1, cache_a)],
                2: [request(kind, "b", 4, 2, cache_b, n=2)]}

    plain = drive(runners[kind], arrivals(None, None))
    cached = drive(runners[kind], arrivals({"type": "fbcache", "threshold": 0.0},
                                           {"type": "teacache", "threshold": 0.0}))
    for rid, steps in (("a", 6), ("b", 4)):
        assert np.array_equal(plain[rid][0], cached[rid][0]), rid
        assert cached[rid][1] == [steps, steps]
        assert all(all(d) for d in cached[rid][2])


CASES = {  # thresholds at which the tiny random models skip a fair share of steps
    "sd3-fbcache": ("sd3", {"type": "fbcache", "threshold": 0.6}, 1),
    "sd3-fbcache-cap-n2": ("sd3", {"type": "fbcache", "threshold": 0.8,
                                   "max_consecutive_skips": 2}, 2),
    "sd3-teacache": ("sd3", {"type": "teacache", "threshold": 0.5}, 1),
    "dit-fbcache": ("dit", {"type": "fbcache", "threshold": 0.8}, 1),
    "dit-teacache": ("dit", {"type": "teacache", "threshold": 0.4}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_published_algorithm_per_request(runners, paths, case):
    kind, cache, n = CASES[case]
    steps, seed = 12, 7
    req = request(kind, "a", steps, seed, cache, n=n)
    images, computed, decisions = drive(runners[kind], {0: [req]})["a"]
    ref_images, ref_decisions = cached_images(
        getattr(paths, kind), cache, seed=seed, steps=steps, guidance=5.0, n=n,
        prompt=req.prompt, class_labels=req.class_labels)
    print(f"{case}: computed steps per branch {computed} of {steps}")
    assert decisions == ref_decisions
    assert computed == [sum(d) for d in decisions]
    for branch in decisions:
        assert branch[0] and branch[-1] and sum(branch) < steps
    assert psnr(images, ref_images) >= MIN_PSNR_DB
    if "cap" in case:
        assert all("..." not in "".join("C" if c else "." for c in b) for b in decisions)


@pytest.mark.parametrize("kind", ["sd3", "dit"])
def test_batched_equals_alone(runners, kind):
    fb = {"type": "fbcache", "threshold": 0.8 if kind == "dit" else 0.6}
    tea = {"type": "teacache", "threshold": 0.4}
    a = request(kind, "a", 10, 3, fb)
    alone = drive(runners[kind], {0: [a]})["a"]
    batched = drive(runners[kind], {0: [request(kind, "b", 9, 4, tea)], 2: [a],
                                    3: [request(kind, "c", 5, 5, None, n=2)],
                                    4: [request(kind, "d", 8, 6, fb)]})
    assert batched["a"][2] == alone[2] and batched["a"][1] == alone[1]
    assert psnr(batched["a"][0], alone[0]) >= MIN_PSNR_DB
    assert sum(alone[1]) < 2 * 10


# ---- tensor parallelism ----------------------------------------------------------------------


def _tp_rank(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank,
                            world_size=world)
    try:
        # Each rank's local metric alone would decide differently (0.04 vs 0.08 against a
        # threshold of 0.05); the agreed one is their mean, 0.06, on both.
        gen = torch.Generator().manual_seed(0)
        ref = torch.rand(2, 4, 8, generator=gen) + 0.5
        a = ref * (1 + (0.04 if rank == 0 else 0.08))
        branch = BranchCache("fbcache", 0.05, None, 3, (1.0, 0.0))
        branch.decide(None)
        branch.residual = torch.zeros(1)
        metrics = relative_l1([(a, ref), (a, None)])
        torch.save({"metrics": metrics, "compute": branch.decide(metrics[0])},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_decisions_are_agreed_across_tp_ranks(tmp_path):
    torch.multiprocessing.spawn(_tp_rank, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0 == r1
    assert r0["metrics"][1] is None and r0["metrics"][0] == pytest.approx(0.06, rel=1e-5)
    assert r0["compute"] is True


# ---- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache, param", [
    ({"type": "magcache"}, "cache.type"),
    ({"threshold": 0.1}, "cache.type"),
    ({"type": "fbcache", "threshold": -0.1}, "cache.threshold"),
    ({"type": "fbcache", "threshold": float("nan")}, "cache.threshold"),
    ({"type": "fbcache", "threshold": "high"}, "cache.threshold"),
    ({"type": "teacache", "max_consecutive_skips": -1}, "cache.max_consecutive_skips"),
    ({"type": "teacache", "max_consecutive_skips": 2.5}, "cache.max_consecutive_skips"),
    ({"type": "fbcache", "thresh": 0.1}, "cache"),
    ("fbcache", "cache"),
])
def test_bad_cache_params_are_invalid_request(cache, param):
    with pytest.raises(InvalidRequest) as e:
        ImageParams(cache=cache)
    assert e.value.param == param, e.value.message


def test_cache_params_defaults_and_wire():
    import msgspec

    params = ImageParams(cache={"type": "teacache"})
    assert params.cache == StepCacheParams(type="teacache", threshold=0.2)
    assert StepCacheParams(type="fbcache").threshold == 0.05
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=ImageParams) == params
    with pytest.raises(msgspec.ValidationError, match="cache.type must be one of"):
        msgspec.msgpack.decode(msgspec.msgpack.encode([1, None, None, None, None, None, None,
                                                       ["magic"]]), type=ImageParams)


def test_engine_default_applies_to_requests_without_a_cache(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    with pytest.raises(InvalidRequest) as e:
        EngineConfig(model=str(tmp_path), step_cache='{"type": "fbcache", "threshold": 99}')
    assert e.value.param == "step_cache.threshold"
    with pytest.raises(InvalidRequest, match="must be JSON"):
        EngineConfig(model=str(tmp_path), step_cache="fbcache")
    model = ImageModelInfo("text", 64, 64, 16, 256, 256, 28, 7.0)
    config = EngineConfig(model=str(tmp_path), step_cache='{"type": "fbcache"}')
    scheduler = DenoiseScheduler(config, model, ImageRunnerInfo(max_num_seqs=8))
    own = StepCacheParams(type="teacache", threshold=0.3, max_consecutive_skips=2)
    for rid, cache in (("default", None), ("own", own), ("off", {"type": "none"})):
        scheduler.add_request(ImageRequest(rid, prompt="x", params=ImageParams(cache=cache)),
                              b"c")
    resolved = {d.request_id: d.cache for d in scheduler.schedule().new_requests}
    assert resolved == {"default": StepCacheParams(type="fbcache", threshold=0.05),
                        "own": own, "off": None}
