"""One `zomni frontend` over two engines: an LLM (the scripted model of `http_utils`) and an
image model (a tiny SD3), each its own `zomni engine` process.

Requests are routed by `model` (or, without one, to the only engine of the endpoint's kind);
/v1/models, /health, /stats and /metrics cover both. The last test kills the image engine:
the frontend answers 503 for it and exits, as it does with one engine.
"""

from __future__ import annotations

import json
import signal
import time
from types import SimpleNamespace

import openai
import psutil
import pytest
from http_utils import SCRIPT_TEXT, Proc, http, scripted_model, zomni_cmd
from image_utils import decode_png, tiny_pipelines

from zomni._process import free_port
from zomni.frontend import cli
from zomni.frontend.server import FrontendConfig

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    llm_model, _, _ = scripted_model(tmp_path_factory)
    sd3 = tiny_pipelines(tmp_path_factory).sd3
    logs = tmp_path_factory.mktemp("multi-engine")
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    engines = [Proc(zomni_cmd("engine", "--model", str(llm_model), "--listen", addresses[0],
                              "--num-kv-blocks", "256", "--num-threads", "1"),
                    logs / "engine-llm.log"),
               Proc(zomni_cmd("engine", "--model", str(sd3), "--listen", addresses[1],
                              "--num-threads", "1"), logs / "engine-image.log")]
    port = free_port()
    frontend = Proc(zomni_cmd("frontend", "--engine", addresses[0], "--engine", addresses[1],
                              "--served-model-name", "llm", "--served-model-name", "painter",
                              "--port", str(port)), logs / "frontend.log", port)
    try:
        frontend.wait_healthy()
        yield SimpleNamespace(engines=engines, frontend=frontend, url=frontend.base_url,
                              llm_model=str(llm_model), sd3=str(sd3))
    finally:
        for p in [frontend, *engines]:
            p.kill()


def post(cluster, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = http("POST", cluster.url + path, body)
    return status, json.loads(data) if data else {}


def test_config_lists_from_flags_and_env(monkeypatch):
    args = cli.build_parser().parse_args(["frontend", "--engine", "tcp://a:1", "--engine",
                                          "tcp://b:2", "--served-model-name", "x",
                                          "--served-model-name", "y"])
    cfg = cli._frontend_config(args, args.engine)
    assert cfg.engine == ["tcp://a:1", "tcp://b:2"] and cfg.served_model_name == ["x", "y"]
    monkeypatch.setenv("ZOMNI_ENGINE", "tcp://a:1, tcp://b:2")
    monkeypatch.setenv("ZOMNI_SERVED_MODEL_NAME", "x,y")
    cfg = FrontendConfig.from_env()
    assert cfg.engine == ["tcp://a:1", "tcp://b:2"] and cfg.served_model_name == ["x", "y"]
    assert cfg.per_engine("tokenizer") == [None, None]
    with pytest.raises(ValueError, match="one served model name per engine"):
        FrontendConfig.from_env(served_model_name=["x"])
    with pytest.raises(ValueError, match="twice"):
        FrontendConfig(engine=["tcp://a:1", "tcp://a:1"])


def test_models_lists_both(cluster):
    status, _, body = http("GET", cluster.url + "/v1/models")
    cards = {c["id"]: c for c in json.loads(body)["data"]}
    assert status == 200 and list(cards) == ["llm", "painter"]
    assert cards["llm"]["max_model_len"] == 4096 and cards["llm"]["root"] == cluster.llm_model
    assert "max_model_len" not in cards["painter"] and cards["painter"]["root"] == cluster.sd3
    assert http("GET", cluster.url + "/health")[0] == 200


def test_requests_are_routed_by_model(cluster):
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
    out = client.chat.completions.create(model="llm", messages=CHAT, temperature=0)
    assert out.choices[0].message.content == SCRIPT_TEXT and out.model == "llm"
    image = client.images.generate(model="painter", prompt="a red circle", size="32x32",
                                   response_format="b64_json",
                                   extra_body={"num_inference_steps": 3, "seed": 1})
    assert decode_png(image.data[0].b64_json).shape == (32, 32, 3)
    # without `model`: the only engine of the endpoint's kind
    status, body = post(cluster, "/v1/chat/completions", {"messages": CHAT, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == SCRIPT_TEXT
    status, body = post(cluster, "/v1/images/generations",
                        {"prompt": "a red circle", "num_inference_steps": 3, "seed": 1})
    assert status == 200 and body["data"][0]["b64_json"] == image.data[0].b64_json
    status, body = post(cluster, "/tokenize", {"prompt": SCRIPT_TEXT})
    assert status == 200 and body["count"] > 0


@pytest.mark.parametrize("path, body", [
    ("/v1/images/generations", {"model": "llm", "prompt": "a cat"}),
    ("/v1/chat/completions", {"model": "painter", "messages": CHAT}),
    ("/v1/completions", {"model": "painter", "prompt": "hi"}),
    ("/tokenize", {"model": "painter", "prompt": "hi"}),
    ("/detokenize", {"model": "painter", "tokens": [1, 2]}),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}),
])
def test_wrong_kind_is_400_naming_model(cluster, path, body):
    status, out = post(cluster, path, body)
    assert status == 400 and out["error"]["param"] == "model", out
    assert "'llm'" in out["error"]["message"] or "'painter'" in out["error"]["message"]


def test_stats_and_metrics_cover_both(cluster):
    status, _, body = http("GET", cluster.url + "/stats")
    stats = json.loads(body)
    assert status == 200 and set(stats["models"]) == {"llm", "painter"}
    assert stats["models"]["llm"]["kind"] == "ar" and stats["models"]["painter"]["kind"] == "image"
    assert stats["generation_tokens_total"] == stats["models"]["llm"]["generation_tokens_total"]
    assert stats["models"]["painter"]["images_total"] >= 2
    text = http("GET", cluster.url + "/metrics")[2].decode()
    for line in ('zomni:generation_tokens_total{model_name="llm"}',
                 'zomni:kv_cache_usage_perc{model_name="llm"}',
                 'zomni:num_requests_running{model_name="llm"}',
                 'zomni:num_requests_running{model_name="painter"}',
                 'zomni:images_generated_total{model_name="painter"} 2.0',
                 'zomni:image_request_latency_seconds_count{model_name="painter"} 2.0',
                 'zomni:engine_step_time_seconds{model_name="painter"}'):
        assert line in text, line
    assert 'kv_cache_usage_perc{model_name="painter"}' not in text  # no KV cache there


def test_image_engine_killed_frontend_answers_503_and_exits(cluster):
    image_engine = cluster.engines[1]
    core = next(p for p in psutil.Process(image_engine.proc.pid).children()
                if "zomni.core.engine" in " ".join(p.cmdline()))
    core.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while http("GET", cluster.url + "/health")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http("GET", cluster.url + "/health")[0] in (503, 0)  # 0: it already exited
    status, body = post(cluster, "/v1/images/generations", {"prompt": "x"})
    assert status in (503, 0), body
    assert image_engine.proc.wait(30) == 128 + signal.SIGKILL
    assert cluster.frontend.proc.wait(30) == 1, cluster.frontend.output()
    assert "is gone" in cluster.frontend.output()
    # the LLM engine outlives the frontend (it serves any frontend that attaches)
    assert cluster.engines[0].proc.poll() is None
