"""The engine core's client side: its ROUTER socket, and the table of who said HELLO and
which requests are whose.

`ClientSocket` is the ROUTER clients connect to: optionally a CURVE server (`proto/keys.py`),
with a bound on inbound messages, and never blocking on a client that does not read.

A request id belongs to the client that sent it: client A's "r1" and client B's "r1" are two
requests. The engine hands the scheduler (and so the workers) scoped ids, `<client number>:<id>`,
and gives each output back under its client's own id:

    client A (#3)  REQUEST "r1"   ──► scheduler "3:r1" ──► A's outputs "3:r1" ──► A gets "r1"
    client B (#4)  REQUEST "r1"   ──► scheduler "4:r1" ──► B's outputs "4:r1" ──► B gets "r1"
    client B       ABORT ["r1"]   ──► "4:r1" only: no client can name another's request

So ids may collide across clients, and no client learns anything of another's requests (refusing
B's "r1" as a duplicate would tell B that someone uses "r1"). Within one client a duplicate of
an unfinished id is refused.

Invariants:
- `Client.open` holds the client's ids that the scheduler accepted and whose final output
  (finish_reason set) has not been sent; `unscope` is the only place that removes them.
- Client numbers are never reused, so a scoped id names one request of one client forever.
- A client stays in the table from its HELLO until it is evicted: only when a HELLO finds the
  table full, and only clients with no open request, least recently active first. (ZMQ does not
  tell a ROUTER which identity disconnected, so the bound is what keeps the table finite.)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec
import zmq

from zomni._process import ipc_path
from zomni.proto import EngineConfig, InvalidRequest, MsgType, ZomniError, decode, encode
from zomni.proto.keys import apply_server
from zomni.proto.messages import Output

logger = logging.getLogger("zomni.engine")

MAX_CLIENTS = 4096
# Inbound message bound: a request is token ids or a prompt (a 128k-token prompt is ~0.6 MB);
# a bigger message is a mistake or an attack, and ZMQ drops its sender's connection.
MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass
class Refusal:
    """Why a message could not be decoded, and what its sender is told."""

    error: InvalidRequest
    msg_type: int  # its type byte; 0 when there is none
    request_id: str | None  # a REQUEST's id, when it can be read: it then gets an error output


class _RequestHead(msgspec.Struct, array_like=True):
    """The first two elements of any REQUEST body (kind tag, request_id): enough to answer a
    malformed request under its id. The rest is skipped unread."""

    kind: int
    request_id: str


_request_head = msgspec.msgpack.Decoder(_RequestHead)


def decode_client_message(frames: list) -> tuple[MsgType, object, list] | Refusal:
    """`codec.decode`, or a `Refusal`: no bytes a client sends may raise out of here (deep
    nesting raises RecursionError in msgspec, for one)."""
    try:
        return decode(frames)
    except Exception as e:  # noqa: BLE001
        error = e if isinstance(e, ZomniError) else InvalidRequest(
            f"undecodable message: {type(e).__name__}: {str(e)[:200]}")
    type_byte = frames[0][0] if frames and len(frames[0]) == 1 else 0
    request_id = None
    if type_byte == MsgType.REQUEST and len(frames) >= 2:
        with contextlib.suppress(msgspec.MsgspecError, RecursionError):
            request_id = _request_head.decode(frames[1]).request_id
    return Refusal(error, type_byte, request_id)


class ClientSocket:
    """The ROUTER at `config.listen`; frames in and out, nothing decoded here."""

    def __init__(self, ctx: zmq.Context, config: EngineConfig):
        self.address = config.listen
        self.curve = config.curve_keys_dir is not None
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.authenticator = (apply_server(self.router, config.curve_keys_dir)
                              if config.curve_keys_dir else None)
        self.router.bind(config.listen)

    def receive(self, timeout_ms: int) -> Iterator[tuple[bytes, list]]:
        """(identity, frames) of every waiting message, after waiting up to `timeout_ms` for
        the first."""
        if not self.router.poll(timeout_ms):
            return
        while True:
            try:
                identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            yield identity, frames

    def send(self, identity: bytes, msg_type: MsgType, msg, arrays=()) -> None:
        try:
            self.router.send_multipart([identity, *encode(msg_type, msg, arrays)],
                                       flags=zmq.NOBLOCK, copy=not arrays)
        except zmq.ZMQError as e:  # a client that went away must not take the engine down
            logger.warning("dropping %s for a client that is gone: %s", msg_type.name, e)

    def close(self) -> None:
        """Close, lingering so the last messages (ENGINE_DEAD) can leave; the caller then
        terminates the context."""
        if self.authenticator is not None:
            self.authenticator.stop()
        self.router.close(linger=500)

    def remove_file(self) -> None:
        """Remove an ipc:// socket file (ZMQ leaves it behind); after the context ended."""
        path = ipc_path(self.address)
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


@dataclass(eq=False)
class Client:
    number: int
    name: str  # Hello.client_name, for logs
    open: set[str] = field(default_factory=set)  # the client's own ids, see the invariants

    @property
    def prefix(self) -> str:
        return f"{self.number}:"

    def scoped(self, request_id: str) -> str:
        """The id the scheduler and the workers know this client's `request_id` by."""
        return self.prefix + request_id


class ClientTable:
    def __init__(self, max_clients: int = MAX_CLIENTS):
        self.max_clients = max_clients
        self._clients: dict[bytes, Client] = {}  # by ZMQ identity, least recently active first
        self._numbers = itertools.count(1)

    def __len__(self) -> int:
        return len(self._clients)

    def __iter__(self) -> Iterator[tuple[bytes, Client]]:
        return iter(list(self._clients.items()))

    def get(self, identity: bytes) -> Client | None:
        """The client that said HELLO from `identity`, marked active; None if none did."""
        client = self._clients.pop(identity, None)
        if client is not None:
            self._clients[identity] = client
        return client

    def peek(self, identity: bytes) -> Client | None:
        return self._clients.get(identity)

    def hello(self, identity: bytes, name: str) -> Client | None:
        """The client for `identity` (a new one on its first HELLO); None when the table is
        full of clients with open requests."""
        client = self.get(identity)
        if client is not None:
            return client
        if len(self._clients) >= self.max_clients and not self._evict_one():
            return None
        client = self._clients[identity] = Client(next(self._numbers), name)
        logger.info("client #%d %r said HELLO", client.number, name[:64])
        return client

    def _evict_one(self) -> bool:
        for identity, client in self._clients.items():
            if not client.open:
                del self._clients[identity]
                logger.info("forgetting idle client #%d %r (%d clients)", client.number,
                            client.name[:64], len(self._clients))
                return True
        return False

    @staticmethod
    def unscope(client: Client, outputs: list[Output]) -> list[Output]:
        """`outputs` (of `client`'s requests, under scoped ids) under the client's own ids;
        finished requests leave `client.open`. Outputs not of this client are dropped."""
        prefix = client.prefix
        mine = []
        for out in outputs:
            if not out.request_id.startswith(prefix):
                logger.error("dropping an output of %r routed to client #%d", out.request_id,
                             client.number)
                continue
            out.request_id = out.request_id[len(prefix):]
            if out.finish_reason is not None:
                client.open.discard(out.request_id)
            mine.append(out)
        return mine
