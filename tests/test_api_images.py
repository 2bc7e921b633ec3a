"""The Python API on image models: `LLM.generate_images` and `AsyncLLM.generate_images`.

`LLM` starts its own engine; a `zomni frontend` attached to that same engine answers the same
seeded request over HTTP, which must give the very same pixels. Both are checked against
diffusers too.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from http_utils import Proc, http, scripted_model, zomni_cmd
from image_utils import (
    MIN_PSNR_DB,
    decode_png,
    dit_reference,
    psnr,
    sd3_partial_references,
    sd3_reference,
    tiny_pipelines,
)
from PIL import Image

from zomni import LLM, AsyncLLM, ImageGenerationOutput, ImageParams
from zomni._process import free_port
from zomni.proto import InvalidRequest


@pytest.fixture(scope="module")
def sd3_llm(tmp_path_factory):
    with LLM(model=str(tiny_pipelines(tmp_path_factory).sd3), num_threads=1) as llm:
        yield llm


@pytest.fixture(scope="module")
def frontend(sd3_llm, tmp_path_factory):
    """An HTTP frontend on the LLM's own engine (any number of clients may attach)."""
    port = free_port()
    proc = Proc(zomni_cmd("frontend", "--engine", sd3_llm.engine.address, "--port", str(port)),
                tmp_path_factory.mktemp("api-frontend") / "frontend.log", port)
    try:
        proc.wait_healthy()
        yield proc
    finally:
        proc.kill()


def as_array(images: list[Image.Image]) -> np.ndarray:
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    return np.stack([np.asarray(im) for im in images])


def test_generate_images_equals_http_and_diffusers(sd3_llm, frontend, tmp_path_factory):
    sd3 = tiny_pipelines(tmp_path_factory).sd3
    params = ImageParams(n=2, num_inference_steps=7, guidance_scale=4.5, seed=21,
                         negative_prompt="blurry")
    [out] = sd3_llm.generate_images("a large orange hexagon", params)
    assert isinstance(out, ImageGenerationOutput) and out.finished and out.num_steps == 7
    assert out.prompt == "a large orange hexagon" and len(out.images) == 2
    got = as_array(out.images)
    status, _, body = http("POST", frontend.base_url + "/v1/images/generations", {
        "prompt": "a large orange hexagon", "n": 2, "num_inference_steps": 7,
        "guidance_scale": 4.5, "seed": 21, "negative_prompt": "blurry"})
    assert status == 200, body
    over_http = np.stack([decode_png(d["b64_json"]) for d in json.loads(body)["data"]])
    assert np.array_equal(got, over_http)
    expected = sd3_reference(sd3, "a large orange hexagon", seed=21, steps=7, guidance=4.5, n=2,
                             negative_prompt="blurry")
    assert psnr(got, expected) >= MIN_PSNR_DB


def test_generate_images_batch_in_order(sd3_llm, tmp_path_factory):
    sd3 = tiny_pipelines(tmp_path_factory).sd3
    prompts = ["a red dot", "a blue cross", "a white ring"]
    params = [ImageParams(seed=i, num_inference_steps=4 + i, guidance_scale=3.0,
                          width=32 + 8 * (i == 2)) for i in range(3)]
    outs = sd3_llm.generate_images(prompts, params, use_tqdm=True)  # a bar over 3 images
    assert [o.prompt for o in outs] == prompts
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        expected = sd3_reference(sd3, prompt, seed=i, steps=4 + i, guidance=3.0,
                                 width=params[i].width)
        assert psnr(as_array(out.images), expected) >= MIN_PSNR_DB


def test_generate_images_keeps_partial_images(sd3_llm, tmp_path_factory):
    """partial_images offline: each partial is diffusers' denoised estimate at its step
    (8 steps, 2 partials: after steps 3 and 5), the images come last."""
    sd3 = tiny_pipelines(tmp_path_factory).sd3
    prompt = "a small red circle on a blue background"
    params = ImageParams(seed=11, num_inference_steps=8, guidance_scale=5.0, partial_images=2)
    [out] = sd3_llm.generate_images(prompt, params)
    assert len(out.partial_images) == 2 and all(len(p) == 1 for p in out.partial_images)
    expected = sd3_partial_references(sd3, prompt, seed=11, steps=8, guidance=5.0,
                                      after_steps=[3, 5])
    for got, ref in zip(out.partial_images, expected):
        assert psnr(as_array(got), ref) >= MIN_PSNR_DB
    assert out.num_prompt_tokens > 0
    assert psnr(as_array(out.images), sd3_reference(sd3, prompt, seed=11, steps=8,
                                                    guidance=5.0)) >= MIN_PSNR_DB
    with pytest.raises(InvalidRequest) as e:
        ImageParams(partial_images=4)
    assert e.value.param == "partial_images"


def test_image_model_refuses_text_methods_and_bad_requests(sd3_llm):
    assert sd3_llm.get_tokenizer() is None  # no LLM tokenizer for an image model
    with pytest.raises(InvalidRequest, match="generate_images") as e:
        sd3_llm.generate("hello")
    assert e.value.param == "model"
    with pytest.raises(InvalidRequest):
        sd3_llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest) as e:
        sd3_llm.generate_images(class_labels=[1])
    assert e.value.param == "class_labels"
    with pytest.raises(InvalidRequest) as e:
        sd3_llm.generate_images("x", ImageParams(width=1024, height=1024))
    assert e.value.param == "size"
    with pytest.raises(InvalidRequest) as e:
        sd3_llm.generate_images(["x", "y"], [ImageParams()])
    assert e.value.param == "params"
    assert len(sd3_llm.generate_images("x", ImageParams(num_inference_steps=1))[0].images) == 1


def test_async_generate_images(tmp_path_factory):
    dit = tiny_pipelines(tmp_path_factory).dit

    async def run():
        async with AsyncLLM(model=str(dit), num_threads=1) as llm:
            params = [ImageParams(n=2, seed=8, num_inference_steps=6),
                      ImageParams(seed=9, num_inference_steps=9, guidance_scale=1.0)]
            outs = await asyncio.gather(
                llm.generate_images(class_labels=[0, 4], params=params[0]),
                llm.generate_images(class_labels=[2], params=params[1], request_id="r2"))
            with pytest.raises(InvalidRequest) as e:
                await llm.generate_images("a goldfish")
            assert e.value.param == "prompt"
            steps = [len(o.partial_images) async for o in llm.stream_images(
                class_labels=[1], params=ImageParams(seed=1, num_inference_steps=8,
                                                     partial_images=3))]
            assert steps == [1, 2, 3, 3]  # one update per partial image, then the images
            return outs

    first, second = asyncio.run(run())
    assert second.request_id == "r2" and second.class_labels == [2]
    assert len(first.images) == 4 and first.num_steps == 6
    expected = dit_reference(dit, [0, 4], seed=8, steps=6, guidance=4.0, n=2)  # DiT's default
    assert psnr(as_array(first.images), expected) >= MIN_PSNR_DB
    expected = dit_reference(dit, [2], seed=9, steps=9, guidance=1.0)
    assert psnr(as_array(second.images), expected) >= MIN_PSNR_DB


def test_llm_refuses_generate_images(tmp_path_factory):
    model, _, _ = scripted_model(tmp_path_factory)
    llm = AsyncLLM(model=str(model), num_kv_blocks=16, num_threads=1)
    try:
        with pytest.raises(InvalidRequest, match="needs an image model") as e:
            asyncio.run(llm.generate_images("a cat"))  # refused before it waits for the engine
        assert e.value.param == "model"
    finally:
        llm.shutdown()
