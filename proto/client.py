"""Engine clients: what a frontend needs to talk to an engine core, and nothing more.

A client is a DEALER with a unique identity connected to the engine's ROUTER. It says HELLO and
waits for READY (which carries the model info), then sends REQUEST / ABORT and receives one
OUTPUTS message per engine step holding the outputs of its own requests only. Outputs come with
their message's extra frames (raw arrays: an image output's pixels); an output's `ArrayRef`s
index them (`arrays.read_array`).

`EngineClient` is blocking (the offline `LLM` uses it); `AsyncEngineClient` runs on asyncio and
routes outputs to one queue per request (the HTTP frontend and `AsyncLLM` use it).

Request ids are the client's own (the engine scopes them per client). Both clients remember
their unfinished requests and abort them on `close()`, so an engine draining for a shutdown
does not wait for requests nobody reads. For an engine with CURVE on (`curve_keys_dir`), pass
`server_key` (the server's public key: z85 text, its server.key file, or the keys directory)
and optionally `client_key` (a NAME.key_secret file; a fresh key pair otherwise): see
`keys.py` (its `keys_from_dir` finds both in a directory laid out as `zomni keys generate` makes
it). A handshake the engine refuses (no keys for a CURVE engine, keys for a plain one, a
client key it does not list) fails `connect` at once with an EngineDead saying which
(`handshakes.py`): ZMQ would
otherwise retry the handshake forever and no message would ever arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable

import zmq

from .codec import SCHEMA_HASH, decode, encode
from .errors import EngineDead, InvalidRequest, ProtocolMismatch, ZomniError, error_from_wire
from .handshakes import HandshakeWatch
from .keys import apply_client
from .messages import (
    PROTOCOL_VERSION,
    Abort,
    Empty,
    ErrorMsg,
    FinishReason,
    Hello,
    MsgType,
    Output,
    Ready,
    Request,
    Stats,
)

KeySource = str | bytes | os.PathLike


def _new_socket(ctx: zmq.Context, address: str, server_key: KeySource | None = None,
                client_key: KeySource | None = None) -> tuple[zmq.Socket, HandshakeWatch]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"client-{uuid.uuid4().hex}".encode())
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        apply_client(sock, server_key, client_key)
    handshakes = HandshakeWatch(sock, address, curve=server_key is not None)  # before connect
    sock.connect(address)
    return sock, handshakes


def _close_aborting(sock: zmq.Socket, request_ids: list[str]) -> None:
    """Abort `request_ids` (if any) and close, lingering briefly so the ABORT leaves."""
    linger = 0
    if request_ids and not sock.closed:
        with contextlib.suppress(zmq.ZMQError):
            sock.send_multipart(encode(MsgType.ABORT, Abort(request_ids)), zmq.NOBLOCK)
            linger = 200
    sock.close(linger=linger)


def _check_ready(msg_type: MsgType, msg) -> Ready:
    if msg_type == MsgType.READY:
        return msg
    if msg_type == MsgType.ERROR:
        raise error_from_wire(msg.kind, msg.message)
    if msg_type == MsgType.ENGINE_DEAD:
        raise EngineDead(msg.reason)
    raise ProtocolMismatch(f"expected READY, got {msg_type.name}")


def output_error(out: Output) -> ZomniError | None:
    """The typed error an ERROR output carries, or None."""
    if out.finish_reason == FinishReason.ERROR:
        return error_from_wire(out.error_kind, out.error, out.error_param)
    return None


class EngineClient:
    """Blocking client. `alive` lets the caller fail fast when a local engine process died."""

    def __init__(self, address: str, alive: Callable[[], bool] | None = None,
                 server_key: KeySource | None = None, client_key: KeySource | None = None):
        self.ctx = zmq.Context()
        self.socket, self._handshakes = _new_socket(self.ctx, address, server_key, client_key)
        self.alive = alive or (lambda: True)
        self.ready: Ready | None = None
        self.open: set[str] = set()  # ids sent and not finished yet

    def connect(self, timeout: float = 600.0, client_name: str = "") -> Ready:
        self._send(MsgType.HELLO, Hello(PROTOCOL_VERSION, SCHEMA_HASH, client_name))
        deadline = time.monotonic() + timeout
        while True:
            got = self.recv(timeout_ms=200)
            if got is not None:
                self.ready = _check_ready(*got[:2])
                self._handshakes.close()
                return self.ready
            self._handshakes.check()
            if time.monotonic() > deadline:
                raise EngineDead(f"engine not ready after {timeout:.0f} s")

    def add_request(self, request: Request) -> None:
        self._send(MsgType.REQUEST, request)
        self.open.add(request.request_id)

    def abort(self, request_ids: list[str]) -> None:
        self._send(MsgType.ABORT, Abort(request_ids))

    def get_stats(self, timeout: float = 30.0) -> Stats:
        """Engine statistics; call it between generations (outputs received meanwhile are lost)."""
        self._send(MsgType.GET_STATS, Empty())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv(timeout_ms=200)
            if got is not None and got[0] == MsgType.STATS:
                return got[1]
        raise EngineDead(f"no stats from the engine in {timeout:.0f} s")

    def recv(self, timeout_ms: int) -> tuple[MsgType, object, list] | None:
        """(type, message, extra frames) of one message, or None after `timeout_ms`; raises
        EngineDead if the engine died."""
        if self.socket.poll(timeout_ms):
            msg_type, msg, arrays = decode(self.socket.recv_multipart())
            if msg_type == MsgType.ENGINE_DEAD:
                self.open.clear()
                raise EngineDead(msg.reason)
            if msg_type == MsgType.OUTPUTS:
                self.open.difference_update(o.request_id for o in msg.outputs
                                            if o.finish_reason is not None)
            return msg_type, msg, arrays
        if not self.alive():
            raise EngineDead("the engine process exited")
        return None

    def _send(self, msg_type: MsgType, msg) -> None:
        self.socket.send_multipart(encode(msg_type, msg))

    def close(self) -> None:
        self._handshakes.close()
        _close_aborting(self.socket, sorted(self.open))
        self.open.clear()
        self.ctx.term()


class AsyncEngineClient:
    """asyncio client: `generate()` yields a request's outputs as the engine produces them.

    The socket is a plain one read from the event loop's reader callback: zmq.asyncio's
    futures cost more per message than the rest of the frontend's work on it. The socket's FD
    is edge-triggered, so every wake-up (and every send, which may consume the edge) drains it.
    """

    def __init__(self, address: str, alive: Callable[[], bool] | None = None,
                 server_key: KeySource | None = None, client_key: KeySource | None = None):
        self.ctx = zmq.Context()
        self.socket, self._handshakes = _new_socket(self.ctx, address, server_key, client_key)
        # Unbounded, so a send never blocks the loop; requests in flight are bounded upstream.
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.alive = alive or (lambda: True)
        self.ready: Ready | None = None
        self.dead: EngineDead | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._replies: dict[MsgType, asyncio.Queue] = {MsgType.PONG: asyncio.Queue(),
                                                       MsgType.STATS: asyncio.Queue()}
        self._hello: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._ping: asyncio.Task | None = None  # the one PING on the wire, if any
        self._refusal: ZomniError | None = None  # set by end_requests
        self._idle = asyncio.Event()  # no request in flight
        self._idle.set()

    async def connect(self, timeout: float = 600.0, client_name: str = "") -> Ready:
        self._loop = asyncio.get_running_loop()
        self._hello = self._loop.create_future()
        self._loop.add_reader(self.socket.getsockopt(zmq.FD), self._drain)
        await self._send(MsgType.HELLO, Hello(PROTOCOL_VERSION, SCHEMA_HASH, client_name))
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ready = _check_ready(*await asyncio.wait_for(asyncio.shield(self._hello),
                                                                  0.2))
                break
            except asyncio.TimeoutError:
                if not self.alive():
                    raise EngineDead("the engine process exited before it was ready") from None
                self._handshakes.check()
                if time.monotonic() > deadline:
                    raise EngineDead(f"engine not ready after {timeout:.0f} s") from None
        self._handshakes.close()
        self._watchdog = self._loop.call_later(1.0, self._check_alive)
        return self.ready

    async def generate(self, request: Request) -> AsyncIterator[tuple[Output, list]]:
        """Yield (output, its message's extra frames) until the request finishes; abort it if
        the caller stops early."""
        if self.dead or self._refusal:
            raise self.dead or self._refusal
        if request.request_id in self._queues:
            raise ZomniError(f"request id {request.request_id!r} is already in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._idle.clear()
        finished = False
        try:
            await self._send(MsgType.REQUEST, request)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                out = item[0]
                if (err := output_error(out)) is not None:
                    raise err
                finished = out.finish_reason is not None
                yield item
        finally:
            self._queues.pop(request.request_id, None)
            if not self._queues:
                self._idle.set()
            if not finished and not self.dead:
                await self.abort([request.request_id])

    async def abort(self, request_ids: list[str]) -> None:
        await self._send(MsgType.ABORT, Abort(request_ids))

    async def get_stats(self) -> Stats:
        await self._send(MsgType.GET_STATS, Empty())
        return await self._reply(MsgType.STATS)

    async def ping(self, timeout: float = 5.0) -> bool:
        """True when the engine answers PONG within `timeout`: its loop runs and no step is
        overdue. False when it does not, is dead, or is shutting down (it answers an
        EngineDead ERROR then).

        Pings at the same time share one PING on the wire, and a new PING goes out only once
        the last one is answered: each PONG then answers the PING outstanding, never a later
        one (a late PONG must not pass for a fresh answer from an engine hung since)."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.ensure_future(self._ping_once())
        try:
            return await asyncio.wait_for(asyncio.shield(self._ping), timeout)
        except asyncio.TimeoutError:
            return False

    async def _ping_once(self) -> bool:
        try:
            await self._send(MsgType.PING, Empty())
            await self._reply(MsgType.PONG)
        except ZomniError:
            return False
        return True

    def end_requests(self, error: ZomniError) -> None:
        """End every request in flight with `error` (each stream raises it, and aborts its
        request in the engine as it closes), and refuse new ones with it: how a frontend's
        drain ends what did not finish in time."""
        self._refusal = error
        for queue in self._queues.values():
            queue.put_nowait(error)

    async def wait_idle(self) -> None:
        """Return once no request of this client is in flight."""
        await self._idle.wait()

    async def _reply(self, msg_type: MsgType):
        got = await self._replies[msg_type].get()
        if isinstance(got, Exception):
            raise got
        return got

    def _drain(self) -> None:
        """Route every waiting message to whoever waits for it (the only reader of the socket)."""
        if self.socket.closed:
            return
        # Asking for EVENTS is cheaper than the zmq.Again a non-blocking read ends with.
        while self.dead is None and self.socket.get(zmq.EVENTS) & zmq.POLLIN:
            frames = self.socket.recv_multipart()
            try:
                msg_type, msg, arrays = decode(frames)
            except InvalidRequest as e:
                self._fail(EngineDead(f"the engine sent an undecodable message: {e}"))
                return
            if msg_type == MsgType.OUTPUTS:
                for out in msg.outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait((out, arrays))
            elif self.ready is None and self._hello is not None:
                if not self._hello.done():
                    self._hello.set_result((msg_type, msg))
            elif msg_type in self._replies:
                self._replies[msg_type].put_nowait(msg)
            elif msg_type == MsgType.ERROR:
                self._route_error(msg)
            elif msg_type == MsgType.ENGINE_DEAD:
                self._fail(EngineDead(msg.reason))

    def _route_error(self, msg: ErrorMsg) -> None:
        """An ERROR goes to whoever waits for what it answers: a request's stream, or a PING
        or GET_STATS reply."""
        error = error_from_wire(msg.kind, msg.message)
        queue = self._queues.get(msg.request_id) if msg.request_id else None
        if queue is None:
            queue = self._replies.get({MsgType.PING: MsgType.PONG,
                                       MsgType.GET_STATS: MsgType.STATS}.get(msg.reply_to, 0))
        if queue is not None:
            queue.put_nowait(error)

    def _check_alive(self) -> None:
        if self.dead is not None:
            return
        if not self.alive():
            self._fail(EngineDead("the engine process exited"))
            return
        self._watchdog = self._loop.call_later(1.0, self._check_alive)

    def _fail(self, error: EngineDead) -> None:
        self.dead = error
        for queue in [*self._queues.values(), *self._replies.values()]:
            queue.put_nowait(error)

    async def _send(self, msg_type: MsgType, msg) -> None:
        if self.dead and msg_type != MsgType.ABORT:
            raise self.dead
        self.socket.send_multipart(encode(msg_type, msg), zmq.NOBLOCK)
        self._loop.call_soon(self._drain)

    def close(self) -> None:
        self._handshakes.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._ping is not None:
            self._ping.cancel()
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may be gone with its thread
                self._loop.remove_reader(self.socket.getsockopt(zmq.FD))
        _close_aborting(self.socket, [] if self.dead else sorted(self._queues))
        self.ctx.term()
