"""A masked-diffusion LM (LLaDA) behind the real server: `/v1/completions` and
`/v1/chat/completions` unchanged, the diffusion fields as extra request fields, streams of
whole committed blocks, stop strings across a block boundary, max_tokens rounded up to a block
and the answer cut to it, EOS ending the answer, a client that leaves freeing its state, and
a 400 naming the field for what the model cannot honour.

The served folder is the tiny random LLaDA of `zomni.testing_dllm` with a second EOS id: a
token its greedy answer to `EOS_PROMPT` holds, so that answer ends early as a real one does.
Every expected text is `workers.dllm_step.generate()` on the same weights, decoded.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import openai
import pytest
import torch
from http_utils import engine_stats, http, start_serve, wait_idle

from zomni.frontend.tokenizer import apply_chat_template
from zomni.workers.dllm_decoding import DecodingParams
from zomni.workers.dllm_step import generate
from zomni.workers.loader import load_model

PROMPT = [5, 17, 99, 40]
EOS_PROMPT = [9, 8, 7]
CHAT = [{"role": "user", "content": "Tell me a story."}]
GREEDY = {"temperature": 0, "ignore_eos": True}


def reference(model, prompt: list[int], gen_length: int, block_length: int = 32,
              steps: int | None = None, **params) -> list[int]:
    return generate(model, [prompt], DecodingParams(
        gen_length=gen_length, block_length=block_length, steps=steps or gen_length,
        **params))[0]


@pytest.fixture(scope="module")
def server(dllm_dirs, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("http-dllm") / "llada"
    shutil.copytree(dllm_dirs["llada"], path)
    model = load_model(path, torch.float32, "cpu")[0]
    answer = reference(model, EOS_PROMPT, 32)
    eos = next(t for i, t in enumerate(answer) if i >= 8 and t not in answer[:i])
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config,
                                                              "eos_token_id": [2, eos]}))
    tok = AutoTokenizer.from_pretrained(path)
    proc = start_serve(path, path.parent / "serve.log", "--block-size", "16")
    try:
        proc.wait_healthy(timeout=300)  # a busy machine takes its time to start an engine
        yield SimpleNamespace(url=proc.base_url, name=str(path), model=model, tok=tok,
                              eos=eos, eos_answer=answer)
    finally:
        proc.kill()


def post(server, path: str, body: dict) -> tuple[int, dict]:
    status, _, data = http("POST", server.url + path, body,
                           {"Content-Type": "application/json"}, timeout=120)
    return status, json.loads(data)


def ok(server, path: str, body: dict) -> dict:
    status, out = post(server, path, body)
    assert status == 200, out
    return out


def sse(server, path: str, body: dict) -> list[dict]:
    status, _, data = http("POST", server.url + path, {**body, "stream": True},
                           {"Content-Type": "application/json"}, timeout=120)
    assert status == 200, data
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def text(server, ids: list[int]) -> str:
    return server.tok.decode(ids, skip_special_tokens=True)


def test_completion_rounds_max_tokens_up_to_a_block_and_cuts_to_it(server):
    out = ok(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 40, **GREEDY})
    want = reference(server.model, PROMPT, 64)[:40]  # two blocks of 32, 40 tokens returned
    choice = out["choices"][0]
    assert choice["text"] == text(server, want)
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 40, "total_tokens": 44}


def test_stream_sends_each_committed_block_once(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "block_length": 16, "steps": 24,
            "cache": "dual", **GREEDY}
    chunks = sse(server, "/v1/completions", body)
    want = reference(server.model, PROMPT, 48, block_length=16, steps=24, cache="dual")[:40]
    assert len(chunks) == 3  # blocks of 16, 16 and the last cut to 8: one chunk each
    assert "".join(c["choices"][0]["text"] for c in chunks) == text(server, want)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert ok(server, "/v1/completions", body)["choices"][0]["text"] == text(server, want)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_a_block_boundary(server, stream):
    params = {"block_length": 8, "steps": 16, "cache": "prefix"}
    want = reference(server.model, PROMPT, 32, **params)
    full, first_block = text(server, want), text(server, want[:8])
    assert full.startswith(first_block)
    # the shortest string around the boundary that first occurs there
    k = next(k for k in range(1, 8)
             if full.find(full[len(first_block) - k: len(first_block) + k])
             == len(first_block) - k)
    stop = full[len(first_block) - k: len(first_block) + k]
    body = {"prompt": PROMPT, "max_tokens": 32, "stop": [stop], **params, **GREEDY}
    if stream:
        chunks = sse(server, "/v1/completions", body)
        got = "".join(c["choices"][0]["text"] for c in chunks)
        last = chunks[-1]["choices"][0]
    else:
        last = ok(server, "/v1/completions", body)["choices"][0]
        got = last["text"]
    assert got == full[: len(first_block) - k]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == stop


def test_eos_ends_the_answer(server):
    out = ok(server, "/v1/completions", {"prompt": EOS_PROMPT, "max_tokens": 32,
                                         "temperature": 0})
    end = server.eos_answer.index(server.eos) + 1
    choice = out["choices"][0]
    assert choice["text"] == text(server, server.eos_answer[:end])
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert out["usage"]["completion_tokens"] == end


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completions(server, stream):
    ids = apply_chat_template(server.tok, CHAT, add_generation_prompt=True)
    want = reference(server.model, ids, 32, remasking="low_confidence", threshold=0.8)[:20]
    body = {"messages": CHAT, "max_tokens": 20, "threshold": 0.8, **GREEDY}
    if stream:
        chunks = sse(server, "/v1/chat/completions", body)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        content = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
        assert len(chunks) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    else:
        out = ok(server, "/v1/chat/completions", body)
        content = out["choices"][0]["message"]["content"]
        assert out["usage"]["prompt_tokens"] == len(ids)
    assert content == text(server, want)


def test_client_gone_mid_stream_frees_its_state(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=256, stream=True, temperature=0,
        extra_body={"block_length": 8, "cache": "dual", "ignore_eos": True})
    next(iter(stream))  # the first block came
    busy = engine_stats(server.url)
    assert busy["num_running"] == 1 and busy["kv_usage"] > 0  # dual: KV blocks held
    stream.close()
    stats = wait_idle(server.url, timeout=60)
    assert stats["kind"] == "dllm" and stats["num_running"] == 0 and stats["kv_usage"] == 0.0
    assert stats["generation_tokens_total"] - busy["generation_tokens_total"] < 200


def test_model_card(server):
    status, _, data = http("GET", server.url + "/v1/models")
    [card] = json.loads(data)["data"]
    assert card["zomni_kind"] == "dllm" and card["max_model_len"] == 4096
    assert card["zomni_diffusion"] == {"remasking": "low_confidence", "block_length": 32}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"logprobs": 2}, "logprobs"),
    ("/v1/completions", {"echo": True, "logprobs": 0}, "logprobs"),
    ("/v1/completions", {"best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"repetition_penalty": 1.1}, "repetition_penalty"),
    ("/v1/completions", {"logit_bias": {"5": 3}}, "logit_bias"),
    ("/v1/completions", {"min_p": 0.1}, "min_p"),
    ("/v1/completions", {"top_p": 0.9}, "top_p"),  # LLaDA's remasking takes no nucleus
    ("/v1/completions", {"remasking": "greedy"}, "remasking"),
    ("/v1/completions", {"steps": 3, "block_length": 8}, "steps"),  # 2 blocks
    ("/v1/completions", {"steps": "8"}, "steps"),
    ("/v1/completions", {"threshold": 0.9, "remasking": "random"}, "threshold"),
    ("/v1/completions", {"threshold": 0.9, "steps": 16}, "steps"),
    ("/v1/completions", {"cache": "full"}, "cache"),
    ("/v1/completions", {"cfg_scale": 1.0, "cache": "dual"}, "cfg_scale"),
    ("/v1/completions", {"max_tokens": 4090}, "max_tokens"),  # 4096 positions in blocks
    ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"block_length": 0}, "block_length"),
])
def test_what_it_cannot_honour_is_a_400_naming_the_field(server, path, body, param):
    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    status, out = post(server, path, {**base, "max_tokens": 16, **body})
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    if not body.get("stream"):  # the engine stays up and serves the next request
        assert ok(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, **GREEDY})
