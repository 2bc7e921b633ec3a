"""Why a connection to an engine gets nowhere: its failed security handshakes.

A client whose CURVE keys do not fit the engine's (none for a CURVE engine, some for a plain
one, a server key of another engine, a client key the engine does not list) never gets a
message through: ZMQ retries the handshake forever, and the client would wait out its whole
ready timeout. The socket monitor sees each failed handshake at once; `HandshakeWatch` turns
the first conclusive one into an EngineDead that says what to fix.
"""

from __future__ import annotations

import uuid

import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import EngineDead

_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                       | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


_UNEXPLAINED_LIMIT = 10


class HandshakeWatch:
    """Failed security handshakes of a socket, watched until READY (then the monitor goes, so
    that a link can watch for disconnects with its own)."""

    def __init__(self, sock: zmq.Socket, address: str, curve: bool):
        self.sock, self.address, self.curve = sock, address, curve
        self.unexplained = 0  # HANDSHAKE_FAILED_NO_DETAIL events seen
        # An address of its own: a later monitor of the socket (EngineLink's) cannot reuse the
        # default one at once, as libzmq unbinds it asynchronously.
        self.monitor: zmq.Socket | None = sock.get_monitor_socket(
            _HANDSHAKE_FAILURES, addr=f"inproc://handshakes-{uuid.uuid4().hex}")

    def check(self) -> None:
        """Raise EngineDead saying why, if a handshake with the engine failed."""
        while self.monitor is not None and self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                raise EngineDead(self._reason(event["event"], event["value"]))
            # EPIPE, mostly: the engine closed first, having found the handshake wrong. It
            # comes before the conclusive event (which the client gets on some reconnection,
            # every 100 ms), or instead of it for a wrong server key: a run of them decides.
            self.unexplained += 1
        if self.unexplained >= _UNEXPLAINED_LIMIT:
            raise EngineDead(self._reason(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 0))

    def _reason(self, event: int, value: int) -> str:
        where = f"the engine at {self.address}"
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{where} refused this client's CURVE key: its public key must be in the "
                    "engine's keys directory, under clients/ (`zomni keys generate DIR "
                    "--client NAME`, then give the client DIR/clients/NAME.key_secret)")
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and self.curve:
            return f"{where} does not use CURVE: connect without keys"
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return (f"{where} uses CURVE and this client has no keys: give it the engine's "
                    "server.key (zomni frontend / serve: --curve-keys DIR)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return f"the handshake with {where} failed (ZMQ protocol error {value:#x})"
        if self.curve:
            return (f"the CURVE handshake with {where} keeps failing: is the server key given "
                    "(DIR/server.key) that engine's, and does it use CURVE?")
        return (f"{where} drops every connection during the handshake: it likely uses CURVE "
                "and this client has no keys (zomni frontend / serve: --curve-keys DIR)")

    def close(self) -> None:
        if self.monitor is not None:
            if not self.sock.closed:
                self.sock.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
