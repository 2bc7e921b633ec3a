"""`POST /v1/images/generations` end to end, against diffusers' own pipelines.

One `zomni serve --model SD3 --model DiT` (two image engines behind one frontend) serves the
module: tiny random-weight pipelines with 32x32 default images. A seeded request must give
what diffusers gives for the same seed, steps, guidance, size and n (PSNR >= 40 dB, see
`image_utils.psnr`), alone and while sharing denoising steps with other requests.
"""

from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import openai
import pytest
from http_utils import Proc, http, zomni_cmd
from image_utils import (
    MIN_PSNR_DB,
    decode_png,
    dit_reference,
    psnr,
    sd3_partial_references,
    sd3_reference,
    tiny_pipelines,
)
from step_cache_reference import cached_images

from zomni._process import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    paths = tiny_pipelines(tmp_path_factory)
    port = free_port()
    proc = Proc(zomni_cmd("serve", "--model", str(paths.sd3), "--model", str(paths.dit),
                          "--served-model-name", "sd3", "--served-model-name", "dit",
                          "--port", str(port), "--num-threads", "1"),
                tmp_path_factory.mktemp("serve-images") / "serve.log", port)
    try:
        proc.wait_healthy()
        yield SimpleNamespace(proc=proc, url=proc.base_url, sd3=paths.sd3, dit=paths.dit)
    finally:
        proc.kill()


def generate(server, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    status, _, data = http("POST", server.url + "/v1/images/generations", body,
                           {"Content-Type": "application/json"}, timeout=timeout)
    return status, json.loads(data) if data else {}


def pixels(body: dict):
    import numpy as np

    return np.stack([decode_png(item["b64_json"]) for item in body["data"]])


def model_stats(server, name: str) -> dict:
    status, _, body = http("GET", server.url + "/stats")
    assert status == 200, body
    return json.loads(body)["models"][name]


def assert_close(got, expected, what: str) -> float:
    value = psnr(got, expected)
    print(f"PSNR {what}: {value:.1f} dB")  # shown with -s; the figures of the report
    assert value >= MIN_PSNR_DB, f"{what}: PSNR {value:.1f} dB"
    return value


# ---- references -------------------------------------------------------------------------------


def test_models_list_both_image_models(server):
    status, _, body = http("GET", server.url + "/v1/models")
    cards = json.loads(body)["data"]
    assert status == 200 and [c["id"] for c in cards] == ["sd3", "dit"]
    assert all("max_model_len" not in c for c in cards)
    assert [c["root"] for c in cards] == [str(server.sd3), str(server.dit)]


def test_sd3_matches_diffusers(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    out = client.images.generate(
        model="sd3", prompt="a small red circle on a blue background", n=2, size="32x32",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 8, "guidance_scale": 5.0,
                    "negative_prompt": "blurry"})
    got = pixels(out.model_dump())
    assert got.shape == (2, 32, 32, 3)
    expected = sd3_reference(server.sd3, "a small red circle on a blue background", seed=11,
                             steps=8, guidance=5.0, n=2, negative_prompt="blurry")
    assert_close(got, expected, "SD3 n=2 CFG + negative prompt")
    # another size (a multiple of 4 = VAE factor 2 x patch 2), no CFG (guidance 1)
    status, body = generate(server, {"model": "sd3", "prompt": "a green star", "size": "48x64",
                                     "seed": 5, "num_inference_steps": 6,
                                     "guidance_scale": 1.0})
    assert status == 200, body
    assert body["size"] == "48x64" and body["output_format"] == "png"
    got = pixels(body)
    assert got.shape == (1, 64, 48, 3)  # size is WIDTHxHEIGHT
    expected = sd3_reference(server.sd3, "a green star", seed=5, steps=6, guidance=1.0,
                             width=48, height=64)
    assert_close(got, expected, "SD3 48x64 no CFG")


def test_dit_matches_diffusers(server):
    status, body = generate(server, {"model": "dit", "class_labels": [1, 3], "n": 2,
                                     "seed": 7, "num_inference_steps": 10,
                                     "guidance_scale": 4.0})
    assert status == 200, body
    got = pixels(body)
    assert got.shape == (4, 32, 32, 3)
    expected = dit_reference(server.dit, [1, 3], seed=7, steps=10, guidance=4.0, n=2)
    assert_close(got, expected, "DiT labels [1, 3] x n=2")


def test_concurrent_requests_share_steps_and_match(server):
    """Requests sent 80 ms apart join the running batch at different steps (a step of this
    tiny model takes milliseconds), each with its own prompt, seed, steps and n."""
    cases = [dict(prompt="a big blue square", seed=1, num_inference_steps=60, n=1),
             dict(prompt="a tiny pink heart", seed=2, num_inference_steps=45, n=2),
             dict(prompt="a dark gray ring", seed=3, num_inference_steps=50, n=1,
                  negative_prompt="deformed"),
             dict(prompt="a thin cyan line", seed=4, num_inference_steps=35, n=1)]
    before = model_stats(server, "sd3")
    results: list = [None] * len(cases)

    def send(i: int) -> None:
        time.sleep(0.08 * i)
        results[i] = generate(server, {"model": "sd3", "guidance_scale": 5.0, **cases[i]})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = model_stats(server, "sd3")
    for case, (status, body) in zip(cases, results):
        assert status == 200, body
        expected = sd3_reference(server.sd3, case["prompt"], seed=case["seed"],
                                 steps=case["num_inference_steps"], guidance=5.0, n=case["n"],
                                 negative_prompt=case.get("negative_prompt"))
        assert_close(pixels(body), expected, f"SD3 batched {case['prompt']!r}")
    request_steps = after["denoising_steps_total"] - before["denoising_steps_total"]
    engine_steps = after["num_steps_total"] - before["num_steps_total"]
    assert request_steps == sum(c["num_inference_steps"] for c in cases)
    # Run one after the other they would take 190 engine steps; batched, far fewer.
    print(f"batched: {request_steps} request-steps in {engine_steps} engine steps")
    assert engine_steps < 0.8 * request_steps, (engine_steps, request_steps)


def test_step_cache_matches_the_reference_loop(server):
    """A per-request step cache over HTTP: the image of the published algorithm's plain loop
    over diffusers' denoiser (tests/step_cache_reference.py)."""
    for model, path, body, cache in (
            ("sd3", server.sd3, {"prompt": "a big blue square"},
             {"type": "fbcache", "threshold": 0.6, "max_consecutive_skips": 3}),
            ("dit", server.dit, {"class_labels": [2]}, {"type": "teacache", "threshold": 0.6})):
        status, out = generate(server, {"model": model, "seed": 9, "num_inference_steps": 10,
                                        "guidance_scale": 5.0, "cache": cache, **body})
        assert status == 200, out
        expected, decisions = cached_images(path, cache, seed=9, steps=10, guidance=5.0,
                                            prompt=body.get("prompt"),
                                            class_labels=body.get("class_labels"))
        assert sum(map(sum, decisions)) < 2 * 10  # it skipped some steps
        assert_close(pixels(out), expected, f"{model} {cache['type']}")


def test_streamed_partial_images_are_the_denoised_estimates(server):
    """stream + partial_images: OpenAI's events in order; each partial is diffusers' denoised
    estimate at its step (8 steps, 2 partials: after steps 3 and 5), the last event the image
    diffusers makes, with usage."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    prompt = "a small red circle on a blue background"
    events = list(client.images.generate(
        model="sd3", prompt=prompt, size="32x32", stream=True, partial_images=2,
        extra_body={"seed": 11, "num_inference_steps": 8, "guidance_scale": 5.0}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + \
        ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "32x32" and e.output_format == "png" for e in events)
    expected = sd3_partial_references(server.sd3, prompt, seed=11, steps=8, guidance=5.0,
                                      after_steps=[3, 5])
    partials = [decode_png(e.b64_json)[None] for e in events[:2]]
    for i, (got, ref) in enumerate(zip(partials, expected)):
        assert_close(got, ref, f"SD3 partial image {i}")
    final = decode_png(events[2].b64_json)[None]
    assert_close(final, sd3_reference(server.sd3, prompt, seed=11, steps=8, guidance=5.0),
                 "SD3 streamed final image")
    assert psnr(partials[0], final) < MIN_PSNR_DB  # a partial is not yet the image
    usage = events[2].usage
    assert usage.input_tokens == usage.input_tokens_details.text_tokens > 0
    assert usage.output_tokens == (32 // 4) ** 2  # latent patches: 32 px / (VAE 2 x patch 2)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_streamed_image_without_partials_and_dit(server):
    """partial_images 0: one completed event; a class-conditional model streams too (its
    input tokens are its labels); a bad field is a plain 400 before any event."""
    status, _, data = http("POST", server.url + "/v1/images/generations",
                           {"model": "dit", "class_labels": [3], "stream": True, "seed": 7,
                            "num_inference_steps": 10, "guidance_scale": 4.0,
                            "partial_images": 1}, {"Content-Type": "application/json"})
    text = data.decode()
    assert status == 200 and text.startswith("event: image_generation.partial_image\n"), text
    events = [json.loads(line[len("data: "):]) for line in text.splitlines()
              if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image",
                                           "image_generation.completed"]
    assert_close(decode_png(events[1]["b64_json"])[None],
                 dit_reference(server.dit, [3], seed=7, steps=10, guidance=4.0), "DiT stream")
    assert events[1]["usage"]["input_tokens"] == 1
    status, _, data = http("POST", server.url + "/v1/images/generations",
                           {"model": "sd3", "prompt": "x", "stream": True,
                            "num_inference_steps": 2}, {"Content-Type": "application/json"})
    assert status == 200 and data.decode().count("event: ") == 1
    status, body = generate(server, {"model": "sd3", "prompt": "x", "stream": True,
                                     "partial_images": 4})
    assert status == 400 and body["error"]["param"] == "partial_images", body


def test_disconnect_mid_image_stream_aborts(server):
    """A client that leaves after the first partial image: the request is aborted."""
    import urllib.request

    before = model_stats(server, "sd3")
    req = urllib.request.Request(
        server.url + "/v1/images/generations", method="POST",
        data=json.dumps({"model": "sd3", "prompt": "x", "size": "128x128", "stream": True,
                         "partial_images": 3, "num_inference_steps": 200}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.readline() == b"event: image_generation.partial_image\n"
    deadline = time.monotonic() + 20
    while (stats := model_stats(server, "sd3"))["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats["num_running"] == 0 and stats["images_total"] == before["images_total"]
    assert stats["denoising_steps_total"] - before["denoising_steps_total"] < 200


# ---- errors -----------------------------------------------------------------------------------

_BAD = [
    ({"model": "sd3", "prompt": "x", "response_format": "url"}, "response_format"),
    ({"model": "sd3", "prompt": "x", "size": "33x32"}, "size"),
    ({"model": "sd3", "prompt": "x", "size": "big"}, "size"),
    ({"model": "sd3", "prompt": "x", "size": "0x32"}, "size"),
    ({"model": "sd3", "prompt": "x", "size": "256x256"}, "size"),  # largest: 128x128
    ({"model": "dit", "class_labels": [1], "size": "64x64"}, "size"),  # DiT: 32x32 only
    ({"model": "sd3", "prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"model": "sd3", "prompt": "x", "num_inference_steps": 201}, "num_inference_steps"),
    ({"model": "sd3", "prompt": "x", "n": 0}, "n"),
    ({"model": "sd3", "prompt": "x", "n": 11}, "n"),
    ({"model": "sd3", "prompt": "x", "n": "two"}, "n"),
    ({"model": "sd3", "prompt": "x", "guidance_scale": 1.0, "negative_prompt": "y"},
     "negative_prompt"),
    ({"model": "sd3", "prompt": "x", "quality": "hd"}, "quality"),
    ({"model": "sd3", "prompt": "x", "style": "vivid"}, "style"),
    ({"model": "sd3", "prompt": "x", "background": "transparent"}, "background"),
    ({"model": "sd3", "prompt": "x", "output_format": "jpeg"}, "output_format"),
    ({"model": "sd3", "prompt": "x", "moderation": "low"}, "moderation"),
    ({"model": "sd3", "prompt": "x", "output_compression": 50}, "output_compression"),
    ({"model": "sd3", "prompt": "x", "stream": True, "n": 2}, "n"),
    ({"model": "sd3", "prompt": "x", "partial_images": 2}, "partial_images"),  # no stream
    ({"model": "sd3", "prompt": "x", "stream": True, "partial_images": -1}, "partial_images"),
    ({"model": "sd3", "class_labels": [1]}, "class_labels"),
    ({"model": "sd3"}, "prompt"),
    ({"model": "dit", "prompt": "a goldfish"}, "prompt"),
    ({"model": "dit", "class_labels": [1000]}, "class_labels"),
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"prompt": "x"}, "model"),  # two image models: name one
    ({"model": "sd3", "prompt": "x", "cache": {"type": "nope"}}, "cache.type"),
    ({"model": "sd3", "prompt": "x", "cache": {"threshold": 0.1}}, "cache.type"),
    ({"model": "sd3", "prompt": "x", "cache": {"type": "fbcache", "threshold": -1}},
     "cache.threshold"),
    ({"model": "dit", "class_labels": [1], "cache": {"type": "teacache",
                                                     "max_consecutive_skips": "3"}},
     "cache.max_consecutive_skips"),
    ({"model": "sd3", "prompt": "x", "cache": {"type": "fbcache", "skip": 1}}, "cache"),
    ({"model": "sd3", "prompt": "x", "cache": "fbcache"}, "cache"),
]


@pytest.mark.parametrize("body, param", _BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(_BAD)])
def test_bad_image_requests_are_400_naming_the_param(server, body, param):
    status, out = generate(server, body)
    assert status == 400, out
    assert set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["param"] == param and out["error"]["code"] == 400, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["message"]


def test_image_model_asked_for_text_is_400(server):
    cases = [("/v1/chat/completions", {"model": "sd3", "messages": [{"role": "user",
                                                                      "content": "hi"}]}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
             ("/v1/completions", {"model": "dit", "prompt": "hi"}),
             ("/tokenize", {"model": "sd3", "prompt": "hi"})]
    for path, body in cases:
        status, _, data = http("POST", server.url + path, body)
        error = json.loads(data)["error"]
        assert status == 400 and error["param"] == "model", (path, error)
    assert "is an image model" in json.loads(
        http("POST", server.url + "/v1/completions", {"model": "dit", "prompt": "hi"})[2]
    )["error"]["message"]


def test_accepted_openai_values_and_unknown_fields(server):
    """Values that ask for what zomni does are accepted; fields OpenAI does not define are
    ignored, as on the other endpoints. And the server still serves after the 400s."""
    status, body = generate(server, {"model": "sd3", "prompt": "x", "quality": "auto",
                                     "background": "auto", "output_format": "png",
                                     "response_format": "b64_json", "user": "u1",
                                     "stream": False, "size": "auto",
                                     "num_inference_steps": 2, "no_such_field": 1})
    assert status == 200 and len(body["data"]) == 1 and body["size"] == "32x32", body


# ---- disconnects and observability ------------------------------------------------------------


def test_disconnect_aborts_image_request(server):
    before = model_stats(server, "sd3")
    status, _ = generate(server, {"model": "sd3", "prompt": "x", "size": "128x128",
                                  "num_inference_steps": 200}, timeout=0.5)
    assert status == 0  # the client gave up
    deadline = time.monotonic() + 20
    while (stats := model_stats(server, "sd3"))["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["images_total"] == before["images_total"]  # aborted: no image made
    assert stats["denoising_steps_total"] - before["denoising_steps_total"] < 200


def test_stats_and_metrics_cover_images(server):
    status, _, body = http("GET", server.url + "/stats")
    stats = json.loads(body)
    assert status == 200 and set(stats["models"]) == {"sd3", "dit"}
    assert stats["kind"] == "image" and stats["images_total"] == \
        stats["models"]["sd3"]["images_total"]  # the top level is the first model's
    assert stats["models"]["dit"]["images_total"] >= 4
    status, headers, body = http("GET", server.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for model in ("sd3", "dit"):
        for name in ("zomni:num_requests_running", "zomni:num_requests_waiting",
                     "zomni:engine_step_time_seconds", "zomni:images_per_second",
                     "zomni:image_request_latency_seconds_count", "zomni:images_generated_total"):
            assert f'{name}{{model_name="{model}"}}' in text, (name, model)
    images = next(line for line in text.splitlines()
                  if line.startswith('zomni:images_generated_total{model_name="dit"}'))
    assert float(images.split()[-1]) >= 4
    aborted = next(line for line in text.splitlines() if line.startswith(
        'zomni:request_success_total{finished_reason="abort",model_name="sd3"}'))
    assert float(aborted.split()[-1]) >= 1  # the disconnect test's request
