"""What every HTTP request passes before its handler, and how a refusal looks (OpenAI JSON).

    bytes ─► aiohttp's parser: request line and each header ≤ 8190 bytes, ≤ 128 headers;
    │        its refusals (plain text in aiohttp) are OpenAI error JSON here: `_Handler`
    │        headers must arrive within `header_timeout_s` of the connection's start or of the
    │        previous response (aiohttp's keep-alive timer closes a connection that waits for
    │        headers, idle or half-sent)
    ▼
    middleware: X-Request-ID ─► API key, on all but /health, / (and /metrics unless asked): 401
    │           ─► rate limits per API key, or per client IP without one: 429
    │           ─► the body, read whole here: at most `max_body_bytes` as declared and as
    │              inflated (gzip / deflate / br / zstd; aiohttp inflates in bounded steps
    │              and stops at the limit): 413; within `body_timeout_s`: 408. A body
    │              refused mid-way is not read further: the connection closes.
    ▼
    handler: ZomniError → its status; anything else → 500; all of them OpenAI error JSON
    every 429 (rate limit, engine queue full, frontend in-flight bound) has a Retry-After
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web, web_protocol, web_server

from zomni.proto import EngineDead, ZomniError

from . import openai_protocol as oai
from .ratelimit import TOKEN_METER, RateLimiter, retry_after

if TYPE_CHECKING:
    from .server import FrontendConfig

logger = logging.getLogger("zomni.frontend")
REQUEST_ID = web.RequestKey("request_id", str)  # echoed as X-Request-ID

_encode = msgspec.json.Encoder().encode
# Open without the API key: /health (load balancers' probes carry no key) and / (the
# playground page: a browser's navigation cannot send a bearer header; the page is static and
# sends the key the user types with each of its API calls).
_OPEN_PATHS = frozenset({"/health", "/"})


def error_json(message: str, status: int, type_: str = "invalid_request_error",
               param: str | None = None, headers: dict[str, str] | None = None
               ) -> web.Response:
    return web.Response(body=_encode(oai.error_body(message, type_, status, param)),
                        status=status, content_type="application/json", headers=headers)


def _authorized(request: web.Request, api_key: str | None, open_paths: frozenset[str]) -> bool:
    if api_key is None or request.path in open_paths:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


async def _send_and_close(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection without reading the rest of the body: for
    a body refused for its size or its pace, reading (and inflating) the rest is the very
    cost the limit is there to avoid. aiohttp would otherwise linger, reading it."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


async def _read_body(request: web.Request, max_bytes: int, timeout_s: float
                     ) -> web.Response | None:
    """Read the body into the request's cache (the handler's `read()` returns it), or the
    refusal to send instead."""
    mb = f"{max_bytes / 2**20:g} MB"
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        refusal = error_json(f"the request body has {declared} bytes, over the {mb} limit "
                             "(--max-request-body-mb)", 413)
        # Nothing inflated yet: aiohttp may read (and drop) the rest of a plain body, so the
        # client, still sending, gets the answer instead of a reset connection.
        if "Content-Encoding" not in request.headers:
            return refusal
        return await _send_and_close(request, refusal)
    try:
        async with asyncio.timeout(timeout_s):
            await request.read()
    except web.HTTPRequestEntityTooLarge:
        return await _send_and_close(request, error_json(
            f"the request body is over the {mb} limit (--max-request-body-mb; a compressed "
            "body counts inflated)", 413))
    except TimeoutError:
        return await _send_and_close(request, error_json(
            f"the request body did not arrive within {timeout_s:g} s (--body-timeout-s)",
            408))
    except web.RequestPayloadError as e:  # bad chunked framing, a corrupt gzip stream
        return await _send_and_close(request, error_json(f"the request body could not be "
                                                         f"read: {e}", 400))
    return None


def make_middleware(config: FrontendConfig, limiter: RateLimiter):
    max_bytes = int(config.max_request_body_mb * 2**20)
    open_paths = _OPEN_PATHS | (frozenset() if config.metrics_require_api_key
                                else frozenset({"/metrics"}))

    @web.middleware
    async def guard(request: web.Request, handler) -> web.StreamResponse:
        request[REQUEST_ID] = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        if not _authorized(request, config.api_key, open_paths):
            return error_json("missing or wrong API key (send 'Authorization: Bearer <key>')",
                              401, "authentication_error")
        if limiter.enabled and request.path not in open_paths:
            client = request.headers.get("Authorization", "") if config.api_key \
                else request.remote or ""
            wait, meter = limiter.admit(client)
            if wait:
                return error_json("rate limit reached (--rate-limit-rps / "
                                  "--rate-limit-tokens-per-s); retry later", 429,
                                  "rate_limit_error",
                                  headers={"Retry-After": retry_after(wait)})
            TOKEN_METER.set(meter)  # this request's task: its sequences charge their tokens
        if request.body_exists:
            refusal = await _read_body(request, max_bytes, config.body_timeout_s)
            if refusal is not None:
                return refusal
        return await _handle(request, handler)

    return guard


async def _handle(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ZomniError as e:
        return error_json(e.message, e.status, e.type, e.param)
    except asyncio.TimeoutError:
        e = EngineDead("the engine did not answer in time")
        return error_json(e.message, e.status, e.type)
    except web.HTTPException as e:  # unknown route, wrong method
        return error_json(e.reason, e.status)
    except RecursionError:  # input nested too deeply for some parser (JSON, a template)
        return error_json("the request is nested too deeply", 400)
    except ConnectionError:
        raise  # the client went away: nothing to answer
    except Exception:
        logger.exception("request %s failed", request[REQUEST_ID])
        return error_json("internal server error", 500, "internal_error")


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    # Runs for every response, streamed ones included, just before its headers go out.
    response.headers["X-Request-ID"] = request.get(REQUEST_ID) or uuid.uuid4().hex
    if response.status == 429 and "Retry-After" not in response.headers:
        # The engine's queue or this frontend's in-flight bound: no wait is known; clients
        # (the openai library included) back off at least this long.
        response.headers["Retry-After"] = "1"


# ---- below the app: the HTTP parser's own refusals ---------------------------------------


class _Handler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses (a request line or
    header over 8190 bytes, over 128 headers, malformed HTTP) with OpenAI error JSON; those
    never reach the app's middlewares."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None
                     ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # as aiohttp: too late for another response
            raise ConnectionError("the response was already started")
        if status >= 500:
            self.log_exception("error handling a request from %s", request.remote,
                               exc_info=exc)
            text = "internal server error"
        else:
            logger.debug("refused a malformed request from %s: %s", request.remote, exc)
            text = f"malformed HTTP request: {str(exc or message or 'bad request')[:200]}"
        response = error_json(text, status, "internal_error" if status >= 500
                              else "invalid_request_error")
        response.force_close()
        return response


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `_Handler`s."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same object and state; only __call__ differs
        return server


def runner_kwargs(config: FrontendConfig) -> dict[str, Any]:
    """The connection handlers' settings from the config."""
    # aiohttp's keep-alive timer runs from a connection's start and from each response to
    # the next request's headers, closing the connection if they have not come: a header
    # timeout, and the idle keep-alive timeout (uvicorn's is 5 s).
    return {"keepalive_timeout": config.header_timeout_s}
