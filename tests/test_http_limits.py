"""The HTTP door (`frontend/http_guard.py`): limits, timeouts, the API key, rate limits, and
refusals as OpenAI error JSON, down to aiohttp's own parser errors (checked on raw sockets).

These tests run the real app and connection handler in a thread, with a stub in place of the
engines: an LLM route answers with the demo model's tokenizer (so /tokenize and /detokenize
work), and nothing here needs an engine process.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from types import SimpleNamespace

import pytest
from aiohttp import web
from http_utils import http

from zomni._process import free_port
from zomni.frontend.http_guard import AppRunner, runner_kwargs
from zomni.frontend.launch import default_model
from zomni.frontend.metrics import Metrics, SequenceTimer
from zomni.frontend.ratelimit import TOKEN_METER, RateLimiter, TokenBucket
from zomni.frontend.server import FrontendConfig, build_app
from zomni.frontend.tokenizer import (
    MAX_CHARS_PER_TOKEN,
    check_template_kwargs,
    encode_prompt_async,
    load_tokenizer,
)
from zomni.proto import EngineOverloaded, InvalidRequest, ModelKind

KEY = "sk-limits"
MAX_MODEL_LEN = 64
AUTH = {"Authorization": f"Bearer {KEY}"}


class StubEngines:
    """What the app asks of `Engines`, with one LLM and no engine behind it."""

    def __init__(self, tokenizer, overloaded: bool = False):
        self.metrics = Metrics()
        self.overloaded = overloaded
        self.serving = SimpleNamespace(tokenizer=tokenizer, info=SimpleNamespace(
            details=SimpleNamespace(vocab_size=len(tokenizer), max_model_len=MAX_MODEL_LEN)))

    def route(self, model, kind, path):
        if self.overloaded:
            raise EngineOverloaded("the engine's queue is full")
        return self.serving

    def ready_servings(self) -> list:
        return []

    async def check_health(self) -> None:
        return None


class AppThread:
    """The app on its own event loop in a thread, served as `serve()` serves it."""

    def __init__(self, config: FrontendConfig, engines: StubEngines):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = AppRunner(build_app(engines, config), handler_cancellation=True,
                                shutdown_timeout=1.0, **runner_kwargs(config))
        self._call(self._start())

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def close(self) -> None:
        self._call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_app(tokenizer, **config) -> AppThread:
    settings = dict(api_key=KEY, max_request_body_mb=1.0, header_timeout_s=1.0,
                    body_timeout_s=1.0)
    settings.update(config)
    return AppThread(FrontendConfig(**settings), StubEngines(tokenizer))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model())


@pytest.fixture(scope="module")
def app(tokenizer):
    thread = make_app(tokenizer)
    yield thread
    thread.close()


def post(app, path, body, headers=None):
    status, hdrs, data = http("POST", app.url + path, body,
                              {"Content-Type": "application/json", **AUTH, **(headers or {})})
    return status, hdrs, data


def assert_error(status_body, status: int, param: str | None = None) -> dict:
    got_status, _, data = status_body
    assert got_status == status, data[:300]
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    return error


def raw(app, data: bytes, timeout: float = 10.0, close_write: bool = False) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (a timeout
    raises: the server kept it open)."""
    with socket.create_connection(("127.0.0.1", app.port), timeout=timeout) as s:
        s.sendall(data)
        if close_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def json_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)


# ---- the API key -----------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_metrics(app, tokenizer):
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/stats"),
                         ("GET", "/version"), ("GET", "/v1/models"), ("GET", "/nowhere")]:
        assert_error(http(method, app.url + path, b"{}"), 401)
    assert http("GET", app.url + "/health")[0] == 200
    assert http("GET", app.url + "/metrics")[0] == 200  # open to scrapers, as in vLLM
    assert http("GET", app.url + "/version", headers=AUTH)[0] == 200
    guarded = make_app(tokenizer, metrics_require_api_key=True)
    try:
        assert_error(http("GET", guarded.url + "/metrics"), 401)
        assert http("GET", guarded.url + "/metrics", headers=AUTH)[0] == 200
    finally:
        guarded.close()


# ---- bodies -----------------------------------------------------------------------------------


def test_body_over_the_limit_is_413(app):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert_error(post(app, "/tokenize", big), 413)


def test_gzip_body_counts_inflated(app):
    # 16 MB of JSON in a few KB of gzip: refused by its inflated size
    bomb = gzip.compress(b'{"prompt": "' + b" " * (16 << 20) + b'"}')
    assert len(bomb) < 100_000
    assert_error(post(app, "/tokenize", bomb, {"Content-Encoding": "gzip"}), 413)
    small = gzip.compress(json.dumps({"prompt": "hello"}).encode())
    status, _, data = post(app, "/tokenize", small, {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(data)["count"] > 0
    assert_error(post(app, "/tokenize", b"not gzip at all", {"Content-Encoding": "gzip"}), 400)


def test_half_sent_body_gets_408_and_is_closed(app):
    head = (b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n")
    status, body = json_of(raw(app, head + b'{"prompt": "' + b"x" * 400))
    assert status == 408 and body["error"]["code"] == 408


def test_half_sent_headers_are_closed(app):
    # closed without an answer: there is no request to answer yet
    assert raw(app, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Le") == b""


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line over 8190
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",  # over 128 headers
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
])
def test_parser_refusals_are_openai_json(app, request_bytes):
    status, body = json_of(raw(app, request_bytes))
    assert status == 400 and body["error"]["code"] == 400 and body["error"]["message"]


# ---- what the handlers refuse -----------------------------------------------------------------


def test_deep_nesting_is_400(app):
    nested = b'{"prompt": "x", "ignored": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_error(post(app, "/tokenize", nested), 400)


def test_detokenize_refuses_ids_outside_the_vocabulary(app, tokenizer):
    for ids in ([-1], [2**64], [10**12], [len(tokenizer)], [1, 2**63]):
        assert_error(post(app, "/detokenize", {"tokens": ids}), 400, "tokens")
    status, _, data = post(app, "/detokenize", {"tokens": tokenizer.encode("hi")})
    assert status == 200 and json.loads(data)["prompt"] == "hi"


def test_over_long_text_is_refused_before_tokenizing(app):
    limit = MAX_CHARS_PER_TOKEN * MAX_MODEL_LEN
    assert_error(post(app, "/tokenize", {"prompt": "x" * (limit + 1)}), 400, "prompt")
    assert_error(post(app, "/tokenize", {"messages": [
        {"role": "user", "content": "x" * (limit + 1)}]}), 400, "messages")
    status, _, data = post(app, "/tokenize", {"prompt": "x" * 100})
    assert status == 200 and json.loads(data)["count"] > 0


def test_tokenizing_runs_off_the_event_loop():
    threads = []

    class Recorder:
        def encode(self, text, add_special_tokens=True):
            threads.append(threading.current_thread().name)
            return [1]

    assert asyncio.run(encode_prompt_async(Recorder(), "hello")) == ("hello", [1])
    assert threads[0].startswith("zomni-tokenize")


def test_template_kwargs_may_not_set_the_request_fields():
    assert check_template_kwargs({"enable_thinking": False}) == {"enable_thinking": False}
    for key in ("messages", "add_generation_prompt", "tokenize", "conversation",
                "chat_template"):
        with pytest.raises(InvalidRequest) as e:
            check_template_kwargs({key: "x"})
        assert e.value.param == "chat_template_kwargs"


# ---- 429s -------------------------------------------------------------------------------------


def test_every_429_has_retry_after(tokenizer):
    config = FrontendConfig(api_key=KEY)
    overloaded = AppThread(config, StubEngines(tokenizer, overloaded=True))
    try:
        result = post(overloaded, "/tokenize", {"prompt": "x"})
        assert_error(result, 429)
        assert result[1]["Retry-After"] == "1"
    finally:
        overloaded.close()


def test_request_rate_limit(tokenizer):
    limited = make_app(tokenizer, rate_limit_rps=0.01)  # one request per 100 s
    try:
        assert http("GET", limited.url + "/version", headers=AUTH)[0] == 200
        result = http("GET", limited.url + "/version", headers=AUTH)
        assert_error(result, 429)
        assert 1 <= int(result[1]["Retry-After"]) <= 100
        assert http("GET", limited.url + "/health")[0] == 200  # probes are never limited
    finally:
        limited.close()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_and_overdraws():
    clock = Clock()
    bucket = TokenBucket(2.0, clock)  # 2 per second, holds 2
    assert bucket.take(2) == 0 and bucket.take(1) == pytest.approx(0.5)
    clock.now = 0.5
    assert bucket.take(1) == 0
    bucket.charge(3)  # computed tokens are paid even past empty
    assert bucket.wait_s(0) == pytest.approx(1.5)
    clock.now = 100.0
    assert bucket.full and bucket.level == 2.0


def test_tokens_rate_limit_charges_computed_tokens():
    clock = Clock()
    limiter = RateLimiter(tokens_per_s=10.0, clock=clock)
    wait, meter = limiter.admit("client-a")
    assert wait == 0 and meter is not None
    TOKEN_METER.set(meter)  # as the middleware does for the request's task
    timer = SequenceTimer(Metrics().model("m", ModelKind.AR))
    timer.on_output(15)
    timer.finish(5, "stop")  # 15 generated + 5 prompt: 10 overdrawn
    wait, _ = limiter.admit("client-a")
    assert wait == pytest.approx(1.0)
    assert limiter.admit("client-b")[0] == 0  # another client has its own bucket
    clock.now = 1.0
    assert limiter.admit("client-a")[0] == 0
