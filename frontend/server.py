"""The HTTP frontend: an aiohttp app (on uvloop) speaking OpenAI's API to one engine core.

    HTTP ─► middleware (X-Request-ID, API key, errors as OpenAI JSON) ─► handler
            ─► OpenAIServing (serving.py) ─► AsyncEngineClient ─DEALER─► engine core

The frontend's life follows its engine's (`EngineLink`):

    starting ──READY, tokenizer loaded──► ready ──engine gone──► dead ──grace──► exit(1)
    (/health 503)                         (200)                  (503)

The engine is "gone" when it says ENGINE_DEAD, when the ZMQ connection to it drops (a killed
process closes its sockets; the socket monitor sees it at once), or when a local engine
process exits. SIGINT / SIGTERM stop the frontend with exit code 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import importlib.metadata
import logging
import signal
import time
import uuid

import msgspec
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from zmq.utils.monitor import parse_monitor_message

from zomni.proto import EngineDead, InvalidRequest, ZomniError
from zomni.proto.client import AsyncEngineClient
from zomni.proto.config import from_env

from . import openai_protocol as oai
from .launch import EngineProcess, served_name
from .metrics import Metrics, flat_stats
from .serving import OpenAIServing, error_response, json_response
from .tokenizer import apply_chat_template, load_tokenizer

logger = logging.getLogger("zomni.frontend")

DEFAULT_ENGINE_ADDRESS = "tcp://127.0.0.1:5555"
_DEATH_GRACE_S = 2.0  # time to answer in-flight requests with 503 before exiting
_STATS_TIMEOUT_S = 10.0


class FrontendConfig(msgspec.Struct, kw_only=True):
    """One HTTP frontend; filled from CLI flags and `ZOMNI_*` variables, printed at start."""

    engine: str = DEFAULT_ENGINE_ADDRESS  # the engine core's client address (ipc:// or tcp://)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    served_model_name: str | None = None  # the model's name in the API; its path if unset
    tokenizer: str | None = None  # where to load the tokenizer; READY's model path if unset
    max_inflight_requests: int = 1024  # engine requests in flight; beyond: 429
    engine_ready_timeout: float = 600.0  # seconds to wait for the engine's READY
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.max_inflight_requests < 1:
            raise ValueError("max_inflight_requests must be at least 1")

    @classmethod
    def from_env(cls, **overrides) -> FrontendConfig:
        return from_env(cls, **overrides)


class EngineLink:
    """This frontend's connection to its engine core and what it knows of the engine."""

    def __init__(self, config: FrontendConfig, process: EngineProcess | None = None):
        self.config = config
        self.process = process
        self.lost = False
        self.client = AsyncEngineClient(config.engine, alive=self._alive)
        self.serving: OpenAIServing | None = None
        self.dead_reason: str | None = None
        self.signalled = False
        self.stop = asyncio.Event()  # set on SIGINT / SIGTERM, or a grace period after death

    def _alive(self) -> bool:
        # The client's reader calls this after a second without messages: returning False
        # fails every open stream with EngineDead.
        return not self.lost and (self.process is None or self.process.alive())

    def ready_serving(self) -> OpenAIServing:
        """The serving object, or a 503 while the engine is not ready or is dead."""
        if self.dead_reason is not None:
            raise EngineDead(f"the engine is dead: {self.dead_reason}")
        if self.serving is None:
            raise EngineDead("the engine is not ready yet")
        return self.serving

    async def run(self) -> None:
        """Connect and load the tokenizer, then watch the engine until it is gone."""
        # Loading a tokenizer takes seconds (importing transformers most of it): do it while
        # the engine loads its model, from the engine's model path once READY gives it.
        early = self.config.tokenizer
        loading = asyncio.create_task(asyncio.to_thread(
            load_tokenizer if early else importlib.import_module, early or "transformers"))
        try:
            ready = await self.client.connect(self.config.engine_ready_timeout,
                                              client_name="http-frontend")
            info = ready.model
            tokenizer = await loading
            if not early:
                tokenizer = await asyncio.to_thread(load_tokenizer, info.model)
        except Exception as e:  # noqa: BLE001 - any failure here means we cannot serve
            self._die(f"could not connect: {e}")
            return
        name = self.config.served_model_name or served_name(info.model)
        self.serving = OpenAIServing(self.client, tokenizer, info, [name], Metrics(name),
                                     self.config.max_inflight_requests)
        logger.info("engine ready: %s (%s, max_model_len %d, %d KV blocks); serving it as %r",
                    info.model, info.architecture, info.details.max_model_len,
                    ready.runner.num_kv_blocks, name)
        self._die(await self._watch())

    async def _watch(self) -> str:
        """Wait until the engine is gone; returns why."""
        monitor = zmq.asyncio.Socket.from_socket(
            self.client.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        try:
            while self.client.dead is None:
                if not self._alive():
                    return "the engine process exited"
                if await monitor.poll(500):
                    event = parse_monitor_message(await monitor.recv_multipart())
                    if event["event"] == zmq.EVENT_DISCONNECTED:
                        return "the connection to the engine dropped"
            return self.client.dead.message
        finally:
            self.client.socket.disable_monitor()
            monitor.close(linger=0)

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.lost = True
        self.dead_reason = reason
        logger.error("engine is gone (%s): answering 503, exiting in %.0f s", reason,
                     _DEATH_GRACE_S)
        asyncio.get_running_loop().call_later(_DEATH_GRACE_S, self.stop.set)

    def on_signal(self) -> None:
        logger.info("stopping on a signal")
        self.signalled = True
        self.stop.set()


# ---- handlers ---------------------------------------------------------------------------------

_LINK = web.AppKey("link", EngineLink)


def _serving(request: web.Request) -> OpenAIServing:
    return request.app[_LINK].ready_serving()


async def completions(request: web.Request) -> web.StreamResponse:
    serving = _serving(request)
    body = oai.decode_body(await request.read(), oai.CompletionRequest)
    return await serving.completions(body, request["request_id"], request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    serving = _serving(request)
    body = oai.decode_body(await request.read(), oai.ChatCompletionRequest)
    return await serving.chat(body, request["request_id"], request)


async def models(request: web.Request) -> web.Response:
    serving = _serving(request)
    created = int(time.time())
    return json_response({"object": "list", "data": [
        oai.model_card(name, serving.info.model, serving.info.details.max_model_len, created)
        for name in serving.model_names]})


async def health(request: web.Request) -> web.Response:
    _serving(request)
    return web.Response()


async def stats(request: web.Request) -> web.Response:
    serving = _serving(request)
    engine_stats = await asyncio.wait_for(serving.client.get_stats(), _STATS_TIMEOUT_S)
    return json_response({**flat_stats(engine_stats),
                          "frontend_requests_in_flight": serving.inflight})


async def metrics(request: web.Request) -> web.Response:
    serving = _serving(request)
    try:
        engine_stats = await asyncio.wait_for(serving.client.get_stats(), _STATS_TIMEOUT_S)
    except (asyncio.TimeoutError, ZomniError):
        engine_stats = None  # still serve the frontend's own metrics
    return web.Response(body=serving.metrics.render(engine_stats),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def tokenize(request: web.Request) -> web.Response:
    serving = _serving(request)
    body = oai.decode_body(await request.read(), oai.TokenizeRequest)
    serving.check_model(body.model)
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
    serving = _serving(request)
    body = oai.decode_body(await request.read(), oai.DetokenizeRequest)
    serving.check_model(body.model)
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


def build_app(link: EngineLink) -> web.Application:
    app = web.Application(middlewares=[_middleware(link.config.api_key)],
                          client_max_size=64 * 1024 * 1024)
    app[_LINK] = link
    app.on_response_prepare.append(_add_request_id)
    app.add_routes([
        web.post("/v1/completions", completions),
        web.post("/v1/chat/completions", chat_completions),
        web.get("/v1/models", models),
        web.get("/health", health),
        web.get("/stats", stats),
        web.get("/metrics", metrics),
        web.post("/tokenize", tokenize),
        web.post("/detokenize", detokenize),
        web.get("/version", version),
    ])
    return app


async def serve(config: FrontendConfig, process: EngineProcess | None = None) -> int:
    """Serve HTTP until a signal (exit code 0) or the engine's death (exit code 1)."""
    link = EngineLink(config, process)
    runner = web.AppRunner(build_app(link), handler_cancellation=True, shutdown_timeout=1.0,
                           access_log=logging.getLogger("aiohttp.access")
                           if config.access_log else None)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, link.on_signal)
    watcher = asyncio.create_task(link.run())
    logger.info("HTTP frontend on http://%s:%d, engine at %s", config.host, config.port,
                config.engine)
    try:
        await link.stop.wait()
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher  # it closes its socket monitor before the client closes
        await runner.cleanup()
        link.client.close()
    return 1 if link.dead_reason is not None and not link.signalled else 0


def run(config: FrontendConfig, process: EngineProcess | None = None) -> int:
    """Run `serve` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, process))
    return uvloop.run(serve(config, process))

