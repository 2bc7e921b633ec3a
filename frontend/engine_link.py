"""The frontend's engines: one `EngineLink` per engine core, and `Engines`, which routes each
request to one of them by model name.

Each link follows its engine's life:

    starting ──READY (an LLM's tokenizer loaded)──► ready ──engine gone──► dead
    (requests to it: 503)                           (served)              (503)

An engine is "gone" when it says ENGINE_DEAD, when the ZMQ connection to it drops (a killed
process closes its sockets; the socket monitor sees it at once), or when a local engine
process exits. The frontend as a whole is healthy only while every link is ready; when any
engine is gone it answers 503 for that engine, and stops after a grace period (exit code 1) so
that a supervisor restarts it, as with one engine. /health also pings every engine: a hung one
(its loop stopped, or a step overdue) keeps its process and its connection, so only an answer
shows that it still works.

Shutdown (SIGINT / SIGTERM) drains: new requests get 503, requests in flight run on for up to
`drain_timeout_s`, then the rest end with EngineDead (a stream: an error event, then
`data: [DONE]`) and are aborted in their engines. A second signal ends the drain at once.

Routing: a request naming a model goes to the engine serving that name; one naming none goes
to the only engine of the kind the endpoint needs (a text model: an LLM or a masked-diffusion
LM; or an image model), else it is a 400 listing the names. Asking an engine for the wrong
kind of work is a 400 naming `model`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zomni.proto import EngineDead, InvalidRequest, ModelKind
from zomni.proto.client import AsyncEngineClient
from zomni.proto.model_info import model_kind

from .image_serving import ImageServing
from .launch import EngineProcess, served_name
from .metrics import Metrics
from .serving import OpenAIServing
from .tokenizer import load_tokenizer

logger = logging.getLogger("zomni.frontend")

DEATH_GRACE_S = 2.0  # time to answer in-flight requests with 503 before exiting
# A PONG takes milliseconds: the engine answers pings between steps and while it waits for one.
HEALTH_PING_TIMEOUT_S = 2.0
Serving = OpenAIServing | ImageServing
_KIND_NAMES = {ModelKind.AR: "an LLM", ModelKind.IMAGE: "an image model",
               ModelKind.DLLM: "a masked-diffusion LM"}
_KIND_PLURALS = {ModelKind.AR: "LLMs", ModelKind.IMAGE: "image models"}
# an endpoint's kind -> the kinds of model that serve it: text endpoints take both LMs
SERVED_BY = {ModelKind.AR: (ModelKind.AR, ModelKind.DLLM), ModelKind.IMAGE: (ModelKind.IMAGE,)}
TEXT_KINDS = SERVED_BY[ModelKind.AR]


class EngineLink:
    """One engine core: its client, what READY said, and the serving object built on it."""

    def __init__(self, address: str, process: EngineProcess | None, served: str | None,
                 tokenizer: str | None, metrics: Metrics, max_inflight: int,
                 ready_timeout: float, on_dead: Callable[[EngineLink, str], None],
                 curve_keys: tuple[Path, Path | None] | None = None):
        self.address = address
        self.process = process
        self.served = served  # --served-model-name; the model path from READY when None
        self.tokenizer_path = tokenizer or None
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.ready_timeout = ready_timeout
        self.on_dead = on_dead
        self.lost = False
        server_key, client_key = curve_keys or (None, None)
        self.client = AsyncEngineClient(address, alive=self._alive, server_key=server_key,
                                        client_key=client_key)
        self.serving: Serving | None = None
        self.dead_reason: str | None = None

    @property
    def kind(self) -> ModelKind | None:
        return None if self.serving is None else self.serving.info.kind

    @property
    def name(self) -> str | None:
        return None if self.serving is None else self.serving.model_names[0]

    def _alive(self) -> bool:
        # The client's reader calls this after a second without messages: returning False
        # fails every open stream with EngineDead.
        return not self.lost and (self.process is None or self.process.alive())

    def ready_serving(self) -> Serving:
        """The serving object, or a 503 while the engine is not ready or is dead."""
        if self.dead_reason is not None:
            raise EngineDead(f"the engine at {self.address} is dead: {self.dead_reason}")
        if self.serving is None:
            raise EngineDead(f"the engine at {self.address} is not ready yet")
        return self.serving

    async def run(self, taken: Callable[[str], bool]) -> None:
        """Connect (and load an LLM's tokenizer), then watch the engine until it is gone.
        `taken(name)` says whether another engine already serves `name`."""
        # The kind is known before READY when the engine is our child: load an LLM's
        # tokenizer while the engine loads its model; unknown, warm up `transformers`.
        known = model_kind(self.process.config.model) if self.process is not None else None
        early = self.tokenizer_path or (self.process.config.model
                                        if known in TEXT_KINDS else None)
        loading = None
        if early or known is None:
            loading = asyncio.create_task(asyncio.to_thread(
                load_tokenizer if early else importlib.import_module, early or "transformers"))
        try:
            ready = await self.client.connect(self.ready_timeout, client_name="http-frontend")
            info = ready.model
            tokenizer = await loading if loading is not None else None
            if info.kind in TEXT_KINDS and not early:
                tokenizer = await asyncio.to_thread(load_tokenizer, info.model)
        except Exception as e:  # noqa: BLE001 - any failure here means we cannot serve
            self._die(f"could not connect: {e}")
            return
        name = self.served or served_name(info.model)
        if taken(name):
            self._die(f"the model name {name!r} is served by another engine already "
                      "(give each engine its own --served-model-name)")
            return
        metrics = self.metrics.model(name, info.kind)
        if info.kind == ModelKind.IMAGE:
            if self.tokenizer_path:
                logger.warning("engine at %s serves an image model: --tokenizer %s is unused",
                               self.address, self.tokenizer_path)
            self.serving = ImageServing(self.client, info, [name],
                                        metrics, self.max_inflight)
            logger.info("engine ready: %s (%s, %s-conditioned, default size %dx%d); serving "
                        "it as %r", info.model, info.architecture, info.details.conditioning,
                        info.details.default_width, info.details.default_height, name)
        else:
            self.serving = OpenAIServing(self.client, tokenizer, info, [name], metrics,
                                         self.max_inflight)
            logger.info("engine ready: %s (%s, %s, max_model_len %d, %d KV blocks); serving "
                        "it as %r", info.model, info.architecture, info.kind,
                        info.details.max_model_len, ready.runner.num_kv_blocks, name)
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
        self.on_dead(self, reason)


class Engines:
    """Every engine of this frontend, and the routing of requests to them."""

    def __init__(self, addresses: list[str], processes: list[EngineProcess | None],
                 served: list[str | None], tokenizers: list[str | None], max_inflight: int,
                 ready_timeout: float, curve_keys: tuple[Path, Path | None] | None = None):
        self.metrics = Metrics()
        self.links = [EngineLink(address, process, name, tokenizer, self.metrics, max_inflight,
                                 ready_timeout, self._on_dead, curve_keys)
                      for address, process, name, tokenizer
                      in zip(addresses, processes, served, tokenizers)]
        self.signalled = False  # a signal started the stop: drain, then exit code 0
        self.stop = asyncio.Event()  # set on SIGINT / SIGTERM, or a grace period after a death
        self._drain_now = asyncio.Event()  # a second signal

    @property
    def dead(self) -> bool:
        return any(link.dead_reason is not None for link in self.links)

    async def run(self) -> None:
        await asyncio.gather(*(link.run(self._taken) for link in self.links))

    def _taken(self, name: str) -> bool:
        return any(link.name == name for link in self.links)

    def _on_dead(self, link: EngineLink, reason: str) -> None:
        first = not self.stop.is_set() and sum(lk.dead_reason is not None
                                               for lk in self.links) == 1
        logger.error("engine is gone (%s; it was at %s): answering 503%s", reason,
                     link.address, f", exiting in {DEATH_GRACE_S:.0f} s" if first else "")
        if first:
            asyncio.get_running_loop().call_later(DEATH_GRACE_S, self.stop.set)

    def on_signal(self) -> None:
        if self.signalled:
            logger.info("second signal: ending the requests in flight now")
            self._drain_now.set()
            return
        logger.info("stopping on a signal: refusing new requests, draining those in flight")
        self.signalled = True
        self.stop.set()

    async def drain(self, timeout: float) -> None:
        """Let the requests in flight finish for up to `timeout` seconds, then end the rest
        with EngineDead (and refuse any that still come)."""
        clients = [link.client for link in self.links if link.serving is not None]
        waits = [asyncio.ensure_future(self._drain_now.wait()),
                 asyncio.ensure_future(asyncio.gather(*(c.wait_idle() for c in clients)))]
        done, _ = await asyncio.wait(waits, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        if waits[1] not in done:
            logger.info("drain over: ending the requests still in flight")
        error = EngineDead("the server shut down before this request finished "
                           f"(drain_timeout_s = {timeout:g})")
        for client in clients:
            client.end_requests(error)

    async def check_health(self, timeout: float = HEALTH_PING_TIMEOUT_S) -> None:
        """Raise EngineDead (a 503) unless the server is up, every engine is ready, and each
        answers a ping within `timeout` seconds."""
        if self.signalled:
            raise EngineDead("the server is shutting down")
        servings = self.ready_servings()
        answers = await asyncio.gather(*(s.client.ping(timeout) for s in servings))
        for link, answered in zip(self.links, answers):
            if not answered:
                raise EngineDead(f"the engine at {link.address} did not answer a ping within "
                                 f"{timeout:g} s")

    def ready_servings(self) -> list[Serving]:
        """Every engine's serving object, or a 503 unless all of them are ready."""
        return [link.ready_serving() for link in self.links]

    def names(self) -> str:
        return ", ".join(repr(link.name) for link in self.links if link.name is not None)

    def route(self, model: str | None, kind: ModelKind, endpoint: str) -> Serving:
        """The serving object for a request to `endpoint` (which needs a model of `kind`)
        naming `model` (or None)."""
        if self.signalled:
            raise EngineDead("the server is shutting down: no new requests")
        if model is not None:
            link = next((lk for lk in self.links
                         if lk.serving is not None and model in lk.serving.model_names), None)
            if link is None:
                self._all_started()
                raise InvalidRequest(f"the model {model!r} does not exist; this server "
                                     f"serves {self.names()}", param="model")
        else:
            self._all_started()
            of_kind = [lk for lk in self.links if lk.kind in SERVED_BY[kind]]
            if not of_kind:
                raise InvalidRequest(f"{endpoint} needs {_KIND_NAMES[kind]}; this server "
                                     f"serves none (models: {self.names()})", param="model")
            if len(of_kind) > 1:
                raise InvalidRequest(f"this server serves several {_KIND_PLURALS[kind]}: name "
                                     f"one with `model` (models: {self.names()})",
                                     param="model")
            link = of_kind[0]
        serving = link.ready_serving()
        if link.kind not in SERVED_BY[kind]:
            raise InvalidRequest(f"the model {link.name!r} is {_KIND_NAMES[link.kind]}; "
                                 f"{endpoint} needs {_KIND_NAMES[kind]}", param="model")
        return serving

    def _all_started(self) -> None:
        """A 503 while some engine is not ready: the name asked for may be its."""
        for link in self.links:
            if link.serving is None:
                link.ready_serving()

    def close(self) -> None:
        for link in self.links:
            link.client.close()
