"""`zomni serve` over HTTP with the official `openai` client: every endpoint, error and stream.

One server (engine core + worker + frontend) serves the whole module; it runs the scripted
model of `http_utils`, so greedy replies are known exactly: `SCRIPT_TEXT`, whose multi-byte
characters the tokenizer splits across tokens. The last test kills its engine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from types import SimpleNamespace

import openai
import psutil
import pytest
from http_utils import SCRIPT_TEXT, engine_stats, http, scripted_model, start_serve, wait_idle

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, chain, start = scripted_model(tmp_path_factory)
    proc = start_serve(model, tmp_path_factory.mktemp("serve") / "serve.log", "--api-key", KEY)
    try:
        proc.wait_healthy()
        yield SimpleNamespace(proc=proc, url=proc.base_url, model=str(model), chain=chain,
                              start=start, prompt=[5, 6, start])
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(server, path, body, **headers):
    status, hdrs, data = http("POST", server.url + path, body,
                              {**AUTH, "Content-Type": "application/json", **headers})
    return status, hdrs, json.loads(data) if data else None


# ---- plain endpoints --------------------------------------------------------------------------


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert http("GET", server.url + "/health")[0] == 200  # probes need no API key
    assert http("GET", server.url + "/version")[0] == 401  # everything else does
    status, headers, body = http("GET", server.url + "/version", headers=AUTH)
    assert status == 200 and json.loads(body)["version"]
    assert len(headers["X-Request-ID"]) == 32  # generated when the client sends none


def test_tokenize_detokenize(server):
    status, _, body = post(server, "/tokenize", {"prompt": SCRIPT_TEXT})
    assert status == 200 and body["count"] == len(server.chain) and body["tokens"] == \
        server.chain
    status, _, body = post(server, "/detokenize", {"tokens": server.chain})
    assert status == 200 and body["prompt"] == SCRIPT_TEXT
    status, _, body = post(server, "/tokenize", {"messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and body["tokens"][-1] == server.start


# ---- completions ------------------------------------------------------------------------------


def test_completion_greedy_exact(server, client):
    out = client.completions.create(model=server.model, prompt=server.prompt, max_tokens=50,
                                    temperature=0, user="u1")
    choice = out.choices[0]
    assert choice.text == SCRIPT_TEXT and choice.finish_reason == "stop"
    assert out.usage.prompt_tokens == 3
    assert out.usage.completion_tokens == len(server.chain) + 1  # + EOS
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_prompt_forms(server, client):
    text_prompt = "Say it:\n"
    n_text = post(server, "/tokenize", {"prompt": text_prompt})[2]["count"]
    for prompt, n_prompt in [(text_prompt, n_text), ([text_prompt, text_prompt], 2 * n_text),
                             ([server.prompt, [7, server.start]], 5)]:
        out = client.completions.create(model=server.model, prompt=prompt, max_tokens=50,
                                        temperature=0, n=2)
        n_choices = 2 * (1 if isinstance(prompt, str) else len(prompt))
        assert sorted(c.index for c in out.choices) == list(range(n_choices))
        assert all(c.text == SCRIPT_TEXT for c in out.choices)
        assert out.usage.prompt_tokens == n_prompt
        assert out.usage.completion_tokens == n_choices * (len(server.chain) + 1)


def test_completion_stream_splits_utf8_right(server, aclient):
    async def run():
        stream = await aclient.completions.create(
            model=server.model, prompt=server.prompt, max_tokens=50, temperature=0,
            stream=True, stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == SCRIPT_TEXT
    assert all("\ufffd" not in t for t in texts)
    assert "" in texts  # a token that ends mid-character yields no text yet
    assert chunks[-1].usage.completion_tokens == len(server.chain) + 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completion_logprobs_and_echo(server, client):
    out = client.completions.create(model=server.model, prompt="Go:\n", max_tokens=50,
                                    temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text == "Go:\n" + SCRIPT_TEXT
    lp = choice.logprobs  # with echo: the prompt's tokens, then the completion's
    n_prompt = out.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == n_prompt + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # no context yet
    assert lp.token_logprobs[n_prompt] > -0.01 and lp.tokens[n_prompt] == "H"  # certain
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len("Go:\n")


@pytest.mark.parametrize("stop, expected", [("語🙂", "Hé日"), (" fox", "Hé日語🙂 brown")])
def test_stop_string_across_tokens_ends_request(server, client, stop, expected):
    before = engine_stats(server.url, KEY)["generation_tokens_total"]
    # ignore_eos: without the abort the engine would generate all 2000 tokens.
    common = dict(model=server.model, prompt=server.prompt, max_tokens=2000, temperature=0,
                  stop=[stop], extra_body={"ignore_eos": True})
    out = client.completions.create(**common)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop" and out.choices[0].stop_reason == stop
    chunks = list(client.completions.create(stream=True, **common))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    stats = wait_idle(server.url, api_key=KEY)
    assert stats["num_running"] == 0
    assert stats["generation_tokens_total"] - before < 1000


def test_sampling_params_and_vllm_extensions(server, client):
    base = dict(model=server.model, prompt=[5, 6, 7], max_tokens=30)
    out = client.completions.create(**base, extra_body={"ignore_eos": True, "min_tokens": 30})
    assert out.usage.completion_tokens == 30 and out.choices[0].finish_reason == "length"
    stop_id = server.chain[11]  # the last byte of 🙂
    out = client.completions.create(model=server.model, prompt=server.prompt, max_tokens=50,
                                    temperature=0, extra_body={"stop_token_ids": [stop_id]})
    assert out.choices[0].text == "Hé日語🙂" and out.choices[0].stop_reason == stop_id
    kw = dict(**base, temperature=0.8, top_p=0.9, seed=1234, presence_penalty=0.5,
              frequency_penalty=0.5,
              extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                          "ignore_eos": True})
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert first.choices[0].text == again.choices[0].text  # same seed, same sample


# ---- chat -------------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": [{"type": "text", "text": "So?"}]},
]


def test_chat_roles_and_usage(server, client):
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0)
    assert out.choices[0].message.content == SCRIPT_TEXT
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "stop"
    n_prompt = post(server, "/tokenize", {"messages": MESSAGES})[2]["count"]
    assert out.usage.prompt_tokens == n_prompt
    assert out.usage.completion_tokens == len(server.chain) + 1
    for limit in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        out = client.chat.completions.create(model=server.model, messages=MESSAGES, seed=3,
                                             **limit)
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_chat_stream_n_usage(server, aclient):
    async def run():
        stream = await aclient.chat.completions.create(
            model=server.model, messages=MESSAGES[:2], temperature=0, n=2, stream=True,
            stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    by_index: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        for choice in c.choices:
            by_index[choice.index].append(choice)
    for deltas in by_index.values():
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == SCRIPT_TEXT
        assert deltas[-1].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 2 * (len(server.chain) + 1)


def test_chat_logprobs_and_stop(server, client):
    out = client.chat.completions.create(model=server.model, messages=MESSAGES[:2],
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert content[0].token == "H" and content[0].logprob > -0.01
    assert all(len(t.top_logprobs) == 2 for t in content)
    out = client.chat.completions.create(model=server.model, messages=MESSAGES[:2],
                                         temperature=0, stop="🙂 b")
    assert out.choices[0].message.content == "Hé日語"


# ---- errors -----------------------------------------------------------------------------------


def _assert_openai_error(status, body, expected_status, param=None):
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == expected_status and body["error"]["message"]
    if param:
        assert body["error"]["param"] == param


def test_bad_json_and_types(server):
    status, _, body = post(server, "/v1/completions", b"{not json")
    _assert_openai_error(status, body, 400)
    status, _, body = post(server, "/v1/completions", {"prompt": "x", "max_tokens": "ten"})
    _assert_openai_error(status, body, 400, "max_tokens")
    assert "Expected `int | null`, got `str`" in body["error"]["message"]
    status, _, body = post(server, "/v1/chat/completions", {"messages": "hi"})
    _assert_openai_error(status, body, 400, "messages")
    status, _, body = post(server, "/v1/nope", {})
    _assert_openai_error(status, body, 404)


def test_invalid_requests(server, client):
    cases = [
        dict(model="not-a-model", prompt="x"),
        dict(model=server.model, prompt="x", max_tokens=0),
        dict(model=server.model, prompt="x", temperature=-1),
        dict(model=server.model, prompt=[1] * 4000, max_tokens=200),  # 4200 > 4096
    ]
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw)
        assert e.value.status_code == 400
    assert "maximum context length is 4096" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=MESSAGES, stream=True,
                                       max_tokens=5000)


def test_api_key(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # The openai client refuses to send no key at all: check that case by hand.
    status, headers, body = http("POST", server.url + "/v1/completions", {"prompt": "x"})
    _assert_openai_error(status, json.loads(body), 401)
    assert "X-Request-ID" in headers


def test_request_id_is_returned(server, client):
    status, headers, _ = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2},
                              **{"X-Request-ID": "my-id-1"})
    assert status == 200 and headers["X-Request-ID"] == "my-id-1"
    status, headers, _ = post(server, "/v1/completions", {"prompt": "x", "max_tokens": 0},
                              **{"X-Request-ID": "my-id-2"})
    assert status == 400 and headers["X-Request-ID"] == "my-id-2"
    raw = client.chat.completions.with_raw_response.create(
        model=server.model, messages=MESSAGES[:2], max_tokens=2, stream=True,
        extra_headers={"X-Request-ID": "my-id-3"})
    assert raw.headers["X-Request-ID"] == "my-id-3"
    assert raw.parse().response is not None
    raw.parse().close()


# ---- observability ----------------------------------------------------------------------------


def test_stats_and_metrics(server):
    stats = engine_stats(server.url, KEY)
    assert {"num_waiting", "num_running", "kv_usage", "generation_tokens_per_s"} <= set(stats)
    assert stats["generation_tokens_total"] > 0
    status, headers, body = http("GET", server.url + "/metrics")  # its own flag guards it
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("zomni:time_to_first_token_seconds_count", "zomni:inter_token_latency_seconds",
                 "zomni:e2e_request_latency_seconds", "zomni:prompt_tokens_total",
                 "zomni:generation_tokens_total", "zomni:num_requests_running",
                 "zomni:num_requests_waiting", "zomni:kv_cache_usage_perc",
                 "zomni:request_success_total", 'finished_reason="stop"'):
        assert name in text
    ttft = next(line for line in text.splitlines()
                if line.startswith("zomni:time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) > 0


# ---- disconnects ------------------------------------------------------------------------------


def _long(server):
    return dict(model=server.model, prompt=[5, 6, 7], max_tokens=3000,
                extra_body={"ignore_eos": True})


def test_disconnect_mid_stream_aborts(server, client):
    before = engine_stats(server.url, KEY)["generation_tokens_total"]
    stream = client.completions.create(stream=True, **_long(server))
    for _, _chunk in zip(range(3), stream):
        pass
    assert engine_stats(server.url, KEY)["num_running"] == 1
    stream.close()
    stats = wait_idle(server.url, api_key=KEY)
    assert stats["num_running"] == 0
    assert stats["generation_tokens_total"] - before < 3000


def test_disconnect_mid_request_aborts(server):
    before = engine_stats(server.url, KEY)["generation_tokens_total"]
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                              timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(**_long(server))
    stats = wait_idle(server.url, api_key=KEY)
    assert stats["num_running"] == 0
    assert stats["generation_tokens_total"] - before < 3000


# ---- the engine dies (keep last: it ends this module's server) --------------------------------


def test_engine_killed_under_load(server, aclient):
    serve = psutil.Process(server.proc.proc.pid)
    engine = next(p for p in serve.children() if "zomni.core.engine" in " ".join(p.cmdline()))
    everyone = [serve, *serve.children(recursive=True)]

    async def run():
        kw = _long(server)
        calls = [asyncio.create_task(aclient.completions.create(**kw)) for _ in range(4)]
        streams = [await aclient.completions.create(stream=True, **kw) for _ in range(2)]
        for s in streams:
            await s.__anext__()
        deadline = time.monotonic() + 20
        while engine_stats(server.url, KEY)["num_running"] < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert engine_stats(server.url, KEY)["num_running"] == 6
        engine.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*calls, return_exceptions=True)
        for s in streams:  # the stream ends with an error event
            with pytest.raises(openai.APIError):
                async for _ in s:
                    pass
        return results

    for result in asyncio.run(run()):
        assert isinstance(result, openai.APIStatusError) and result.status_code == 503, result
    status = http("GET", server.url + "/health")[0]
    assert status in (503, 0)  # 0: it already exited
    assert server.proc.proc.wait(30) == 1
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
