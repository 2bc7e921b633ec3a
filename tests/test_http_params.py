"""Request parameters over HTTP: each is honoured, or a 400 naming it; never dropped.

One server runs the scripted model of `http_utils` (greedy replies are the known chain), so
`logit_bias`, `echo` and prompt logprobs can be checked exactly. Also here without a server:
the bundled demo's served name, and the model's generation_config defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from http_utils import SCRIPT_TEXT, http, scripted_model, start_serve

from zomni.frontend.generation_config import generation_defaults
from zomni.frontend.launch import DEMO_MODEL_NAME, default_model, served_name
from zomni.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest, decode_body
from zomni.frontend.serving import OpenAIServing
from zomni.proto.model_info import read_model_info


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoTokenizer

    model, chain, start = scripted_model(tmp_path_factory)
    proc = start_serve(model, tmp_path_factory.mktemp("serve-params") / "serve.log")
    try:
        proc.wait_healthy()
        yield SimpleNamespace(url=proc.base_url, model=str(model), chain=chain, start=start,
                              prompt=[5, 6, start], tok=AutoTokenizer.from_pretrained(model))
    finally:
        proc.kill()


def post(server, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = http("POST", server.url + path, {"model": server.model, **body},
                           {"Content-Type": "application/json"}, timeout=60)
    return status, json.loads(data)


def complete(server, **body) -> dict:
    status, out = post(server, "/v1/completions", body)
    assert status == 200, out
    return out


def sse(server, path: str, body: dict) -> list[dict]:
    status, _, data = http("POST", server.url + path, {"model": server.model, **body},
                           {"Content-Type": "application/json"}, timeout=60)
    assert status == 200, data
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_400(server, path: str, body: dict, param: str) -> str:
    status, out = post(server, path, body)
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["code"] == 400, out
    return out["error"]["message"]


GREEDY = {"max_tokens": 50, "temperature": 0}
CHAT = [{"role": "user", "content": "x"}]


# ---- limits on fan-out: refused before any work --------------------------------------------


def test_fanout_caps_are_400s_naming_the_param(server):
    for n in (129, 200_000):
        assert_400(server, "/v1/completions", {"prompt": "x", "n": n, "max_tokens": 1}, "n")
        assert_400(server, "/v1/chat/completions", {"messages": CHAT, "n": n}, "n")
    # more sequences than --max-inflight-requests (1024) can never run: not a 429
    message = assert_400(server, "/v1/completions",
                         {"prompt": [[5]] * 1025, "max_tokens": 1}, "prompt")
    assert "max-inflight-requests" in message
    assert_400(server, "/v1/completions", {"prompt": [[5]] * 9, "n": 128, "max_tokens": 1},
               "prompt")
    assert_400(server, "/v1/completions", {"prompt": "x", "best_of": 129}, "best_of")


# ---- logit_bias -------------------------------------------------------------------------------


def test_logit_bias_forces_and_bans_tokens(server):
    forced = server.tok.encode("Z")[0]
    out = complete(server, prompt=server.prompt, max_tokens=3, temperature=0,
                   logit_bias={str(forced): 100})
    assert out["choices"][0]["text"] == server.tok.decode([forced] * 3)
    out = complete(server, prompt=server.prompt, max_tokens=1, temperature=0,
                   logit_bias={str(server.chain[0]): -100})
    assert not out["choices"][0]["text"].startswith("H")
    status, out = post(server, "/v1/chat/completions",
                       {"messages": CHAT, "max_tokens": 2, "temperature": 0,
                        "logit_bias": {str(forced): 100}})
    assert status == 200 and out["choices"][0]["message"]["content"] == "ZZ", out


@pytest.mark.parametrize("bias", [{"abc": 1}, {"-1": 1}, {"1.5": 1}, {"512": 1}, {"5": 101},
                                  {"5": -100.5}, {"5": "x"}, {"5": True}, {"5": None}, [1]])
def test_bad_logit_bias_is_400(server, bias):
    assert_400(server, "/v1/completions", {"prompt": "x", "logit_bias": bias}, "logit_bias")
    assert_400(server, "/v1/chat/completions", {"messages": CHAT, "logit_bias": bias},
               "logit_bias")


# ---- echo, logprobs of the prompt -------------------------------------------------------------


def test_echo_with_max_tokens_0_returns_the_prompt_only(server):
    prompt = "Go:\n"
    n_prompt = len(server.tok.encode(prompt))
    out = complete(server, prompt=prompt, echo=True, max_tokens=0, logprobs=1)
    choice = out["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == n_prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None for x in lp["token_logprobs"][1:])
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == n_prompt
    chunks = sse(server, "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 0,
                                             "logprobs": 1, "stream": True})
    assert [c["choices"][0]["text"] for c in chunks] == [prompt]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    assert_400(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0}, "max_tokens")


def test_echo_logprobs_cover_prompt_then_completion_streamed_too(server):
    body = {"prompt": server.prompt, "echo": True, "logprobs": 1, "n": 2, **GREEDY}
    out = complete(server, **body)
    prompt_text = server.tok.decode(server.prompt)
    for choice in out["choices"]:
        assert choice["text"] == prompt_text + SCRIPT_TEXT
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(server.prompt) + len(server.chain) + 1
        assert lp["token_logprobs"][0] is None and lp["token_logprobs"][3] > -0.01
    chunks = sse(server, "/v1/completions", {**body, "stream": True})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == prompt_text + SCRIPT_TEXT
        tokens = [t for c in mine for t in c["logprobs"]["tokens"]]
        assert tokens == out["choices"][index]["logprobs"]["tokens"]
        assert mine[0]["logprobs"]["token_logprobs"][0] is None


def _check_vllm_prompt_logprobs(entries: list, prompt: list[int], num: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for token_id, entry in zip(prompt[1:], entries[1:]):
        assert next(iter(entry)) == str(token_id)  # the prompt token first, then the top-N
        assert num <= len(entry) <= num + 1
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())


def test_prompt_logprobs_completions_and_chat(server):
    out = complete(server, prompt=server.prompt, n=2, prompt_logprobs=2, **GREEDY)
    first, second = (c["prompt_logprobs"] for c in out["choices"])
    _check_vllm_prompt_logprobs(first, server.prompt, 2)
    assert second == first  # one prompt: the same for every choice
    status, out = post(server, "/v1/chat/completions",
                       {"messages": CHAT, "prompt_logprobs": 0, **GREEDY})
    assert status == 200, out
    n_prompt = out["usage"]["prompt_tokens"]
    assert len(out["prompt_logprobs"]) == n_prompt and out["prompt_logprobs"][0] is None
    for path, body in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": CHAT})):
        assert_400(server, path, {**body, "prompt_logprobs": 1, "stream": True},
                   "prompt_logprobs")
        assert_400(server, path, {**body, "prompt_logprobs": 21}, "prompt_logprobs")


# ---- best_of ----------------------------------------------------------------------------------


def test_best_of_returns_the_most_likely_samples(server):
    # The same seed samples the same 4 sequences: best_of=4 must return the 2 most likely.
    body = {"prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 11,
            "logprobs": 0, "ignore_eos": True}
    everything = complete(server, n=4, **body)["choices"]
    ranked = sorted(everything, key=lambda c: -sum(c["logprobs"]["token_logprobs"]))
    assert len({c["text"] for c in everything}) > 1  # else nothing is chosen
    out = complete(server, n=2, best_of=4, **body)
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == [c["text"] for c in ranked[:2]]
    assert out["usage"]["completion_tokens"] == 4 * 6  # every sample was generated
    out = complete(server, n=1, best_of=2, prompt=[5], max_tokens=2)
    assert len(out["choices"]) == 1 and out["choices"][0]["logprobs"] is None
    assert_400(server, "/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of")
    assert_400(server, "/v1/completions", {"prompt": "x", "best_of": 2, "stream": True},
               "best_of")


# ---- what stays unsupported: a 400 unless it asks for what zomni does anyway ----------------


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {}}}]}, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"messages": CHAT, "function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}},
     "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "stream_options": {"include_usage": True}},
     "stream_options"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    # a masked-diffusion LM's fields, sent to an autoregressive one
    ("/v1/completions", {"prompt": "x", "steps": 8}, "steps"),
    ("/v1/chat/completions", {"messages": CHAT, "cache": "dual", "remasking": "entropy"},
     "remasking"),
])
def test_unsupported_fields_are_400(server, path, body, param):
    assert_400(server, path, {**body, "max_tokens": 2}, param)


def test_fields_asking_for_what_zomni_does_are_accepted(server):
    assert complete(server, prompt="x", suffix="", max_tokens=2)["choices"]
    status, out = post(server, "/v1/chat/completions",
                       {"messages": CHAT, "tool_choice": "none", "function_call": "none",
                        "response_format": {"type": "text"}, **GREEDY})
    assert status == 200 and out["choices"][0]["message"]["content"] == SCRIPT_TEXT, out


# ---- GET /v1/models/{id} ----------------------------------------------------------------------


def test_retrieve_model(server):
    status, _, data = http("GET", f"{server.url}/v1/models/{server.model}")
    card = json.loads(data)
    assert status == 200 and card["id"] == server.model and card["object"] == "model"
    assert card["max_model_len"] == 4096
    status, _, data = http("GET", server.url + "/v1/models/no-such-model")
    error = json.loads(data)["error"]
    assert status == 404 and error["code"] == 404 and error["param"] == "model"
    assert "no-such-model" in error["message"]


# ---- no server: served names, generation_config defaults ------------------------------------


def test_demo_is_zomni_demo_from_any_install(tmp_path):
    """The engine reports its own install's path; the frontend may be another install's."""
    other = tmp_path / "venv" / "lib" / "site-packages" / "zomni" / "demo_model"
    other.mkdir(parents=True)
    (other / "config.json").write_text(Path(default_model(), "config.json").read_text())
    link = tmp_path / "my-demo"
    link.symlink_to(other)
    for path in (default_model(), str(other), str(other) + "/", str(link)):
        assert served_name(path) == DEMO_MODEL_NAME, path
    assert served_name(str(tmp_path / "venv")) == str(tmp_path / "venv")  # others: the path


def test_generation_config_fills_what_the_request_omits(tmp_path, llama_dir):
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((llama_dir / name).read_bytes())
    (model / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "do_sample": True, "eos_token_id": 2}))
    defaults = generation_defaults(str(model))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert generation_defaults(str(tmp_path / "gone"), str(model)) == defaults
    serving = OpenAIServing(None, None, read_model_info(str(model)), ["m"], None, 8)
    assert serving.defaults == defaults
    body = decode_body(b'{"prompt": "x", "top_p": 0.5}', CompletionRequest)
    params = body.completion_params(512, serving.defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.5, 20)
    body = decode_body(b'{"messages": [], "temperature": 0}', ChatCompletionRequest)
    params = body.sampling_params(512, serving.defaults, None, None)
    assert (params.temperature, params.top_p, params.min_p) == (0.0, 0.9, 0.0)
