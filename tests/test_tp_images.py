"""Image models through the real engine and workers, TP=1 and TP=2 (gloo on the CPU), over the
engine's ZMQ protocol: seeded images equal diffusers', requests of two batch keys in flight at
once, and aborts. One engine per TP size is shared by the module (start-up dominates).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from step_cache_reference import cached_images

from zomni.frontend.launch import EngineProcess, make_config
from zomni.proto import FinishReason, ImageOutput, ImageParams, ImageRequest, MsgType
from zomni.proto.arrays import read_array
from zomni.proto.client import EngineClient
from zomni.testing_images import build_sd3_pipeline


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_sd3_pipeline(tmp_path_factory.mktemp("tp-images") / "sd3")


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def engine(request, sd3_dir):
    config = make_config(str(sd3_dir), tensor_parallel_size=request.param, num_threads=1,
                         max_num_seqs=8)
    process = EngineProcess(config)
    client = EngineClient(process.address, alive=process.alive)
    try:
        ready = client.connect(timeout=300)
        assert ready.model.kind.name == "IMAGE" and ready.model.tensor_parallel_size == \
            request.param
        yield client
    finally:
        client.close()
        process.shutdown()


def collect(client: EngineClient, ids: set[str], timeout: float = 120.0) -> dict:
    """request id -> (ImageOutput, uint8 pixels or None) for every id, as they finish."""
    got: dict = {}
    deadline = time.monotonic() + timeout
    while ids - set(got) and time.monotonic() < deadline:
        received = client.recv(timeout_ms=500)
        if received is None or received[0] != MsgType.OUTPUTS:
            continue
        _, msg, frames = received
        for out in msg.outputs:
            assert isinstance(out, ImageOutput)
            if out.finish_reason is not None:
                pixels = read_array(out.pixels, frames).copy() if out.pixels else None
                got[out.request_id] = (out, pixels)
    assert not ids - set(got), f"no result for {ids - set(got)}"
    return got


def reference(model_dir, prompt, params: ImageParams) -> np.ndarray:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=prompt, num_images_per_prompt=params.n, height=params.height,
                  width=params.width, num_inference_steps=params.num_inference_steps,
                  guidance_scale=params.guidance_scale,
                  generator=torch.Generator("cpu").manual_seed(params.seed),
                  output_type="np").images
    return (images * 255).round().astype(np.uint8)


def test_seeded_images_equal_diffusers_with_two_batch_keys_in_flight(engine, sd3_dir):
    requests = {
        "a": ("a red circle", ImageParams(n=2, height=32, width=32, num_inference_steps=12,
                                          guidance_scale=5.0, seed=3)),
        "b": ("a blue square", ImageParams(height=64, width=32, num_inference_steps=6,
                                           guidance_scale=4.0, seed=4)),
        "c": ("a green star", ImageParams(height=32, width=32, num_inference_steps=8,
                                          guidance_scale=1.0, seed=5)),
    }
    for rid, (prompt, params) in requests.items():
        engine.add_request(ImageRequest(rid, prompt=prompt, params=params))
        time.sleep(0.05)  # arrive while the others run
    results = collect(engine, set(requests))
    for rid, (prompt, params) in requests.items():
        out, pixels = results[rid]
        assert out.finish_reason == FinishReason.STOP, out
        assert out.num_steps == params.num_inference_steps
        assert pixels.shape == (params.n, params.height, params.width, 3)
        assert psnr(pixels, reference(sd3_dir, prompt, params)) >= 40.0, rid
    stats = engine.get_stats()
    assert stats.scheduler.images_total >= 4 and stats.scheduler.num_running == 0


def test_step_cache_decisions_agree_across_ranks(engine, sd3_dir):
    """Cached requests (two types, guided, batched together) finish with the decisions and
    images of the per-request reference loop; at TP=2 a rank that decided otherwise than the
    other would have hung the next block's all-reduce."""
    caches = {"fb": {"type": "fbcache", "threshold": 0.6},
              "tea": {"type": "teacache", "threshold": 0.5, "max_consecutive_skips": 2}}
    for rid, cache in caches.items():
        engine.add_request(ImageRequest(rid, prompt=f"a red circle {rid}", params=ImageParams(
            height=32, width=32, num_inference_steps=12, guidance_scale=5.0, seed=7,
            cache=cache)))
    results = collect(engine, set(caches))
    for rid, cache in caches.items():
        out, pixels = results[rid]
        expected, decisions = cached_images(sd3_dir, cache, seed=7, steps=12, guidance=5.0,
                                            prompt=f"a red circle {rid}")
        assert out.finish_reason == FinishReason.STOP, out
        assert out.num_computed_steps == [sum(d) for d in decisions], rid
        assert sum(out.num_computed_steps) < 2 * 12
        assert psnr(pixels, expected) >= 40.0, rid


def test_abort_and_refusal(engine):
    params = ImageParams(height=32, width=32, num_inference_steps=200, seed=1)
    engine.add_request(ImageRequest("long", prompt="x", params=params))
    engine.add_request(ImageRequest("bad", prompt="x", params=ImageParams(height=33)))
    time.sleep(0.3)
    engine.abort(["long"])
    results = collect(engine, {"long", "bad"})
    assert results["long"][0].finish_reason == FinishReason.ABORT
    bad = results["bad"][0]
    assert bad.finish_reason == FinishReason.ERROR and bad.error_kind == "InvalidRequest"
    assert "multiple of" in bad.error
    engine.add_request(ImageRequest("after", prompt="y", params=ImageParams(
        height=32, width=32, num_inference_steps=2, seed=2)))
    assert collect(engine, {"after"})["after"][0].finish_reason == FinishReason.STOP
