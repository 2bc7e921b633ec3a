"""The HTTP frontend: an aiohttp app (on uvloop) speaking OpenAI's API to one or more engines.

    HTTP ─► http_guard.py (limits, API key, rate limits, errors as OpenAI JSON) ─► handler
            ─► Engines.route(model) ─► OpenAIServing (serving.py, LLMs)
                                       ImageServing (image_serving.py, image models)
            ─► AsyncEngineClient ─DEALER─► that model's engine core

Each engine's life, and what the frontend does when one is gone, is in `engine_link.py`:
/health is 200 only while every engine is ready and answers a ping; an engine that dies gets
503s, and the frontend exits with code 1 after a grace period. SIGINT / SIGTERM drain it (new
requests 503, those in flight get `drain_timeout_s` to finish) and stop it with exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.resources
import logging
import math
import os
import signal
import time

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from zomni.proto import InvalidRequest, ModelKind, ZomniError
from zomni.proto.config import from_env
from zomni.proto.keys import keys_from_dir

from . import openai_protocol as oai
from .engine_link import Engines
from .http_guard import REQUEST_ID, AppRunner, make_middleware, on_response_prepare, runner_kwargs
from .image_protocol import ImageGenerationRequest
from .launch import EngineProcess
from .metrics import flat_stats
from .ratelimit import RateLimiter
from .serving import json_response, stream_sse
from .tokenizer import apply_chat_template_async, decode_async, encode_text_async

logger = logging.getLogger("zomni.frontend")

DEFAULT_ENGINE_ADDRESS = "tcp://127.0.0.1:5555"
_STATS_TIMEOUT_S = 10.0
# list fields: repeatable flags; their ZOMNI_* variables hold comma-separated lists
_LIST_FIELDS = ("engine", "served_model_name", "tokenizer")


class FrontendConfig(msgspec.Struct, kw_only=True):
    """One HTTP frontend; filled from CLI flags and `ZOMNI_*` variables, printed at start.

    `engine` lists the engine cores' client addresses (ipc:// or tcp://), one model each;
    `served_model_name` and `tokenizer`, when given, are per engine in the same order.
    """

    engine: list[str] = msgspec.field(default_factory=lambda: [DEFAULT_ENGINE_ADDRESS])
    host: str = "127.0.0.1"
    port: int = 8000
    # when set, every route but /health, / (the playground page) and /metrics (unless
    # metrics_require_api_key) needs `Authorization: Bearer <key>`
    api_key: str | None = None
    metrics_require_api_key: bool = False
    served_model_name: list[str] | None = None  # each model's API name; its path if unset
    tokenizer: list[str] | None = None  # an LLM's tokenizer; READY's model path if unset / ""
    max_inflight_requests: int = 1024  # engine requests in flight per engine; beyond: 429
    engine_ready_timeout: float = 600.0  # seconds to wait for the engines' READY
    access_log: bool = False
    # On SIGINT / SIGTERM: seconds requests in flight get to finish (new ones get 503) before
    # the rest end with an error; as EngineConfig.drain_timeout_s, which `serve` sets too.
    drain_timeout_s: float = 5.0
    # The engines' CURVE keys: DIR/server.key and this frontend's DIR/clients/NAME.key_secret
    # (NAME: curve_client, else the only one there; none: a fresh key pair).
    curve_keys_dir: str | None = None
    curve_client: str | None = None
    # HTTP limits (http_guard.py): a body over max_request_body_mb (inflated, if compressed)
    # is a 413, one slower than body_timeout_s a 408; a connection whose request headers
    # have not come header_timeout_s after it opened or after the last response is closed.
    max_request_body_mb: float = 8.0
    header_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    # per API key (per client IP without one); 0: no limit. Beyond: 429 with Retry-After.
    rate_limit_rps: float = 0.0
    rate_limit_tokens_per_s: float = 0.0  # prompt + generated tokens

    def __post_init__(self) -> None:
        for name in _LIST_FIELDS:  # FrontendConfig(engine="tcp://...") still works
            if isinstance(getattr(self, name), str):
                setattr(self, name, _split(getattr(self, name)))
        if not self.engine:
            raise ValueError("give at least one engine address")
        if len(set(self.engine)) != len(self.engine):
            raise ValueError(f"an engine address is given twice: {self.engine}")
        names = self.served_model_name
        if names is not None and len(names) != len(self.engine):
            raise ValueError(f"give one served model name per engine: {len(self.engine)} "
                             f"engines, {len(names)} names")
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"served model names must differ: {names}")
        if self.tokenizer is not None and len(self.tokenizer) > len(self.engine):
            raise ValueError(f"more tokenizers ({len(self.tokenizer)}) than engines "
                             f"({len(self.engine)})")
        if self.max_inflight_requests < 1:
            raise ValueError("max_inflight_requests must be at least 1")
        if not (math.isfinite(self.drain_timeout_s) and self.drain_timeout_s >= 0):
            raise ValueError("drain_timeout_s must be a non-negative number of seconds")
        for name in ("max_request_body_mb", "header_timeout_s", "body_timeout_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number")
        for name in ("rate_limit_rps", "rate_limit_tokens_per_s"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative number (0: no limit)")

    def per_engine(self, name: str) -> list[str | None]:
        """A list field's entry for each engine (None where not given)."""
        values = getattr(self, name) or []
        return [v or None for v in values] + [None] * (len(self.engine) - len(values))

    @classmethod
    def from_env(cls, **overrides) -> FrontendConfig:
        lists = {name: _split(os.environ[f"ZOMNI_{name.upper()}"]) for name in _LIST_FIELDS
                 if f"ZOMNI_{name.upper()}" in os.environ}
        return from_env(cls, **{**lists, **{k: v for k, v in overrides.items()
                                            if v is not None}})


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


# ---- handlers ---------------------------------------------------------------------------------

_ENGINES = web.AppKey("engines", Engines)
_PLAYGROUND = web.AppKey("playground", bytes)  # the page's HTML, read once by build_app
# The page loads nothing from elsewhere: inline script and style, images as data: URLs, and
# fetches to this server only.
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
             "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'")


def _engines(request: web.Request) -> Engines:
    return request.app[_ENGINES]


async def completions(request: web.Request) -> web.StreamResponse:
    body = oai.decode_body(await request.read(), oai.CompletionRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/v1/completions")
    return await serving.completions(body, request[REQUEST_ID], request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = oai.decode_body(await request.read(), oai.ChatCompletionRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/v1/chat/completions")
    return await serving.chat(body, request[REQUEST_ID], request)


async def image_generations(request: web.Request) -> web.Response:
    body = oai.decode_body(await request.read(), ImageGenerationRequest)
    serving = _engines(request).route(body.model, ModelKind.IMAGE, "/v1/images/generations")
    if body.stream:
        return await stream_sse(request, serving.stream(body, request[REQUEST_ID]),
                                named_events=True)
    return json_response(await serving.generations(body, request[REQUEST_ID]))


async def models(request: web.Request) -> web.Response:
    created = int(time.time())
    return json_response({"object": "list", "data": [
        oai.model_card(name, serving.info.model, serving.info.details, created)
        for serving in _engines(request).ready_servings() for name in serving.model_names]})


async def model(request: web.Request) -> web.Response:
    """One model's card (OpenAI's retrieve-model); a 404 for a name no engine serves. The
    name may be a path (slashes and all): the route takes the rest of the URL."""
    name, engines = request.match_info["model"], _engines(request)
    for serving in engines.ready_servings():
        if name in serving.model_names:
            return json_response(oai.model_card(name, serving.info.model,
                                                serving.info.details, int(time.time())))
    return json_response(oai.error_body(f"the model {name!r} does not exist; this server "
                                        f"serves {engines.names()}", "invalid_request_error",
                                        404, "model"), 404)


async def health(request: web.Request) -> web.Response:
    await _engines(request).check_health()  # a 503 naming the reason unless all is well
    return web.Response()


async def _all_stats(request: web.Request, tolerant: bool) -> dict[str, object]:
    """model name -> its engine's Stats (None where it failed to answer, if `tolerant`)."""
    servings = _engines(request).ready_servings()
    got = await asyncio.gather(*(asyncio.wait_for(s.client.get_stats(), _STATS_TIMEOUT_S)
                                 for s in servings), return_exceptions=True)
    for result in got:
        if isinstance(result, BaseException) and not (
                tolerant and isinstance(result, (asyncio.TimeoutError, ZomniError))):
            raise result
    return {s.model_names[0]: None if isinstance(r, BaseException) else r
            for s, r in zip(servings, got)}


async def stats(request: web.Request) -> web.Response:
    """The first engine's figures at the top level (what a single-model client reads), and
    every model's under "models"."""
    servings = {s.model_names[0]: s for s in _engines(request).ready_servings()}
    per_model = {name: {**flat_stats(engine_stats),
                        "frontend_requests_in_flight": servings[name].inflight}
                 for name, engine_stats in (await _all_stats(request, False)).items()}
    return json_response({**next(iter(per_model.values())), "models": per_model})


async def metrics(request: web.Request) -> web.Response:
    engine_stats = await _all_stats(request, True)  # a silent engine: still serve ours
    return web.Response(body=_engines(request).metrics.render(engine_stats),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokenize(request: web.Request) -> web.Response:
    body = oai.decode_body(await request.read(), oai.TokenizeRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/tokenize")
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("give exactly one of prompt and messages", param="prompt")
    max_model_len = serving.info.details.max_model_len
    if body.messages is not None:
        ids = await apply_chat_template_async(
            serving.tokenizer, [m.for_template() for m in body.messages],
            body.add_generation_prompt, max_model_len=max_model_len)
    else:
        ids = await encode_text_async(serving.tokenizer, body.prompt, body.add_special_tokens,
                                      max_model_len)
    return json_response({"count": len(ids), "max_model_len": max_model_len, "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    body = oai.decode_body(await request.read(), oai.DetokenizeRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/detokenize")
    vocab = serving.info.details.vocab_size
    if body.tokens and not 0 <= min(body.tokens) <= max(body.tokens) < vocab:
        raise InvalidRequest(f"tokens must be token ids in [0, {vocab})", param="tokens")
    return json_response({"prompt": await decode_async(serving.tokenizer, body.tokens)})


async def playground(request: web.Request) -> web.Response:
    """The playground page (static/playground.html): chat and image generation in a browser,
    over this same API. It is open without the API key (a browser's navigation sends no
    bearer header); the key typed into the page goes with its API calls."""
    return web.Response(body=request.app[_PLAYGROUND], content_type="text/html",
                        charset="utf-8", headers={"Cache-Control": "no-cache",
                                                  "Content-Security-Policy": _PAGE_CSP})


async def version(request: web.Request) -> web.Response:
    try:
        ver = importlib.metadata.version("zomni")
    except importlib.metadata.PackageNotFoundError:
        ver = "unknown"
    return json_response({"version": ver})


# ---- app --------------------------------------------------------------------------------------


def build_app(engines: Engines, config: FrontendConfig) -> web.Application:
    limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_tokens_per_s)
    app = web.Application(middlewares=[make_middleware(config, limiter)],
                          client_max_size=int(config.max_request_body_mb * 2**20))
    app[_ENGINES] = engines
    app[_PLAYGROUND] = (importlib.resources.files(__package__) / "static" / "playground.html"
                        ).read_bytes()
    app.on_response_prepare.append(on_response_prepare)
    app.add_routes([
        web.get("/", playground),
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/images/generations", image_generations),
        web.get("/v1/models", models),
        web.get("/v1/models/{model:.+}", model),
        web.get("/health", health),
        web.get("/stats", stats),
        web.get("/metrics", metrics),
        web.post("/tokenize", tokenize),
        web.post("/detokenize", detokenize),
        web.get("/version", version),
    ])
    return app


async def serve(config: FrontendConfig,
                processes: list[EngineProcess | None] | None = None) -> int:
    """Serve HTTP until a signal (a drain, then exit code 0) or an engine's death (exit code
    1). `processes[i]` is the local process of engine i, if this frontend started it."""
    curve_keys = keys_from_dir(config.curve_keys_dir, config.curve_client) \
        if config.curve_keys_dir else None
    engines = Engines(config.engine, processes or [None] * len(config.engine),
                      config.per_engine("served_model_name"), config.per_engine("tokenizer"),
                      config.max_inflight_requests, config.engine_ready_timeout, curve_keys)
    runner = AppRunner(build_app(engines, config), handler_cancellation=True,
                       shutdown_timeout=1.0, access_log=logging.getLogger("aiohttp.access")
                       if config.access_log else None, **runner_kwargs(config))
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, engines.on_signal)
    watcher = asyncio.create_task(engines.run())
    logger.info("HTTP frontend on http://%s:%d, engines at %s", config.host, config.port,
                ", ".join(config.engine))
    try:
        await engines.stop.wait()
        if engines.signalled:  # the listener stays open meanwhile: late requests get a 503
            await engines.drain(config.drain_timeout_s)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher  # the links close their socket monitors before the clients close
        await runner.cleanup()
        engines.close()
    return 1 if engines.dead and not engines.signalled else 0


def run(config: FrontendConfig, processes: list[EngineProcess | None] | None = None) -> int:
    """Run `serve` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, processes))
    return uvloop.run(serve(config, processes))
