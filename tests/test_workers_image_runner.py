"""ImageRunner against diffusers' own pipelines on tiny random SD3 and DiT folders, driven by
hand-built step plans: requests that join a running batch at other steps, with other sizes of
n, guidance and step counts, each give the image diffusers gives alone for the same seed.

Tolerance: PSNR >= 40 dB on the uint8 images (PSNR = 10 log10(255^2 / MSE)); in practice the
images are equal, or a few pixels differ by one level where a GEMM sums in another order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zomni.proto import DenoiseRequestData, DenoiseSchedulerOutput, EngineConfig, WorkerConfig
from zomni.proto.arrays import read_array
from zomni.testing_images import build_dit_pipeline, build_sd3_pipeline
from zomni.workers.image_runner import ImageRunner


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("image-pipelines")
    return {"sd3": str(build_sd3_pipeline(root / "sd3")),
            "dit": str(build_dit_pipeline(root / "dit"))}


def make_runner(model_dir: str) -> ImageRunner:
    config = EngineConfig(model=model_dir, device="cpu", max_num_seqs=16)
    return ImageRunner(WorkerConfig(engine=config, rank=0, engine_address=""))


def reference(model_dir: str, req: DenoiseRequestData) -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=req.num_steps, guidance_scale=req.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(req.seed), output_type="np")
    if req.class_labels is not None:
        per_label = req.num_images // len(req.class_labels)
        images = pipe(class_labels=[c for c in req.class_labels for _ in range(per_label)],
                      **kwargs).images
    else:
        images = pipe(prompt=req.prompt, negative_prompt=req.negative_prompt,
                      num_images_per_prompt=req.num_images, height=req.height,
                      width=req.width, **kwargs).images
    return (images * 255).round().astype(np.uint8)


def drive(runner: ImageRunner, arrivals: dict[int, list[DenoiseRequestData]]
          ) -> dict[str, np.ndarray]:
    """Run plans as the engine would for one batch key: requests admitted at the engine step
    given in `arrivals`, every running request one step per plan, until all finish."""
    running: dict[str, int] = {}
    images: dict[str, np.ndarray] = {}
    step = 0
    while step <= max(arrivals) or running:
        new = arrivals.get(step, [])
        for req in new:
            running[req.request_id] = req.num_steps
        plan = DenoiseSchedulerOutput(step, new, list(running), [])
        for rid in list(running):
            running[rid] -= 1
            if running[rid] == 0:
                del running[rid]
        result, frames = runner.execute(plan)
        for rid, ref in zip(result.request_ids, result.pixels):
            images[rid] = np.array(read_array(ref, frames))
        step += 1
    return images


def sd3_request(rid, prompt, n, steps, seed, guidance=5.0, negative=None, size=32):
    return DenoiseRequestData(rid, prompt, negative, None, n, size, size, steps, guidance, seed)


def test_sd3_batched_requests_equal_diffusers_alone(pipelines):
    runner = make_runner(pipelines["sd3"])
    reqs = {
        "a": sd3_request("a", "a red circle on a blue background", 1, 6, seed=1),
        "b": sd3_request("b", "a green square, top left", 2, 4, seed=2, negative="blurry"),
        "c": sd3_request("c", "a yellow triangle", 1, 5, seed=3, guidance=3.0),
    }
    images = drive(runner, {0: [reqs["a"]], 2: [reqs["b"]], 3: [reqs["c"]]})
    assert runner.requests == {}  # every finished request's latents were dropped
    for rid, req in reqs.items():
        assert images[rid].shape == (req.num_images, 32, 32, 3)
        assert psnr(images[rid], reference(pipelines["sd3"], req)) >= 40.0, rid
    alone = drive(runner, {0: [reqs["b"]]})["b"]  # batch composition changes nothing
    assert psnr(alone, images["b"]) >= 40.0
    assert not np.array_equal(images["a"][0], images["c"][0])


def test_sd3_unguided_and_other_size(pipelines):
    runner = make_runner(pipelines["sd3"])
    req = sd3_request("u", "a blue circle", 1, 4, seed=5, guidance=1.0, size=64)
    images = drive(runner, {0: [req]})
    assert psnr(images["u"], reference(pipelines["sd3"], req)) >= 40.0


def test_dit_batched_requests_equal_diffusers_alone(pipelines):
    runner = make_runner(pipelines["dit"])
    a = DenoiseRequestData("a", None, None, [1, 3], 2, 32, 32, 5, 4.0, 11)
    b = DenoiseRequestData("b", None, None, [0], 1, 32, 32, 7, 2.5, 12)
    images = drive(runner, {0: [a], 1: [b]})
    for req in (a, b):
        assert psnr(images[req.request_id], reference(pipelines["dit"], req)) >= 40.0


def test_plans_the_worker_cannot_run_raise(pipelines):
    runner = make_runner(pipelines["dit"])
    req = DenoiseRequestData("a", None, None, [1], 1, 32, 32, 1, 4.0, 0)
    with pytest.raises(ValueError, match="unknown request 'ghost'"):
        runner.execute(DenoiseSchedulerOutput(0, [], ["ghost"], []))
    runner.execute(DenoiseSchedulerOutput(1, [req], ["a"], []))
    with pytest.raises(ValueError, match="unknown request 'a'"):  # finished and dropped
        runner.execute(DenoiseSchedulerOutput(2, [], ["a"], []))
