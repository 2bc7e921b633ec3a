"""The HTTP frontend: an aiohttp app (on uvloop) speaking OpenAI's API to one or more engines.

    HTTP ─► middleware (X-Request-ID, API key, errors as OpenAI JSON) ─► handler
            ─► Engines.route(model) ─► OpenAIServing (serving.py, LLMs)
                                       ImageServing (image_serving.py, image models)
            ─► AsyncEngineClient ─DEALER─► that model's engine core

Each engine's life, and what the frontend does when one is gone, is in `engine_link.py`:
/health is 200 only while every engine is ready; an engine that dies gets 503s, and the
frontend exits with code 1 after a grace period. SIGINT / SIGTERM stop it with exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import os
import signal
import time
import uuid

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from zomni.proto import EngineDead, InvalidRequest, ModelKind, ZomniError
from zomni.proto.config import from_env

from . import openai_protocol as oai
from .engine_link import Engines
from .image_protocol import ImageGenerationRequest
from .launch import EngineProcess
from .metrics import flat_stats
from .serving import error_response, json_response
from .tokenizer import apply_chat_template

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
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    served_model_name: list[str] | None = None  # each model's API name; its path if unset
    tokenizer: list[str] | None = None  # an LLM's tokenizer; READY's model path if unset / ""
    max_inflight_requests: int = 1024  # engine requests in flight per engine; beyond: 429
    engine_ready_timeout: float = 600.0  # seconds to wait for the engines' READY
    access_log: bool = False

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


def _engines(request: web.Request) -> Engines:
    return request.app[_ENGINES]


async def completions(request: web.Request) -> web.StreamResponse:
    body = oai.decode_body(await request.read(), oai.CompletionRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/v1/completions")
    return await serving.completions(body, request["request_id"], request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = oai.decode_body(await request.read(), oai.ChatCompletionRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/v1/chat/completions")
    return await serving.chat(body, request["request_id"], request)


async def image_generations(request: web.Request) -> web.Response:
    body = oai.decode_body(await request.read(), ImageGenerationRequest)
    serving = _engines(request).route(body.model, ModelKind.IMAGE, "/v1/images/generations")
    return json_response(await serving.generations(body, request["request_id"]))


async def models(request: web.Request) -> web.Response:
    created = int(time.time())
    return json_response({"object": "list", "data": [
        oai.model_card(name, serving.info.model, getattr(serving.info.details,
                                                         "max_model_len", None), created)
        for serving in _engines(request).ready_servings() for name in serving.model_names]})


async def health(request: web.Request) -> web.Response:
    _engines(request).ready_servings()
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
    if body.messages is not None:
        ids = apply_chat_template(serving.tokenizer, [m.for_template() for m in body.messages],
                                  add_generation_prompt=body.add_generation_prompt)
    else:
        ids = serving.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return json_response({"count": len(ids),
                          "max_model_len": serving.info.details.max_model_len,
                          "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    body = oai.decode_body(await request.read(), oai.DetokenizeRequest)
    serving = _engines(request).route(body.model, ModelKind.AR, "/detokenize")
    return json_response({"prompt": serving.tokenizer.decode(body.tokens)})


async def version(request: web.Request) -> web.Response:
    try:
        ver = importlib.metadata.version("zomni")
    except importlib.metadata.PackageNotFoundError:
        ver = "unknown"
    return json_response({"version": ver})


# ---- app --------------------------------------------------------------------------------------


def _authorized(request: web.Request, api_key: str | None) -> bool:
    # As vLLM: only the OpenAI routes need the key; /health and /metrics stay open to probes.
    if api_key is None or not request.path.startswith("/v1"):
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


def _middleware(api_key: str | None):
    @web.middleware
    async def openai_errors(request: web.Request, handler) -> web.StreamResponse:
        """Request ids, the API key, and every error as OpenAI's error JSON."""
        request["request_id"] = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        if not _authorized(request, api_key):
            return json_response(oai.error_body("missing or wrong API key (send "
                                                "'Authorization: Bearer <key>')",
                                                "authentication_error", 401), 401)
        try:
            return await handler(request)
        except ZomniError as e:
            return error_response(e)
        except asyncio.TimeoutError:
            return error_response(EngineDead("the engine did not answer in time"))
        except web.HTTPException as e:  # unknown route, wrong method
            return json_response(oai.error_body(e.reason, "invalid_request_error", e.status),
                                 e.status)
        except Exception:
            logger.exception("request %s failed", request["request_id"])
            return json_response(oai.error_body("internal server error", "internal_error",
                                                500), 500)

    return openai_errors


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # Runs for every response, streamed ones included, just before its headers go out.
    response.headers["X-Request-ID"] = request.get("request_id") or uuid.uuid4().hex


def build_app(engines: Engines, api_key: str | None) -> web.Application:
    app = web.Application(middlewares=[_middleware(api_key)],
                          client_max_size=64 * 1024 * 1024)
    app[_ENGINES] = engines
    app.on_response_prepare.append(_add_request_id)
    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/images/generations", image_generations),
        web.get("/v1/models", models),
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
    """Serve HTTP until a signal (exit code 0) or an engine's death (exit code 1).
    `processes[i]` is the local process of engine i, if this frontend started it."""
    engines = Engines(config.engine, processes or [None] * len(config.engine),
                      config.per_engine("served_model_name"), config.per_engine("tokenizer"),
                      config.max_inflight_requests, config.engine_ready_timeout)
    runner = web.AppRunner(build_app(engines, config.api_key), handler_cancellation=True,
                           shutdown_timeout=1.0, access_log=logging.getLogger("aiohttp.access")
                           if config.access_log else None)
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
