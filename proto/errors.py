"""Typed errors shared by every process.

Each error carries what the user needs to fix the call, and an HTTP status and OpenAI error type
so the frontend can map it to `{"error": {...}}` without a lookup table elsewhere.
"""

from __future__ import annotations


class ZomniError(Exception):
    """Base class of every error zomni raises on purpose."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ZomniError, ValueError):
    """The request is malformed or asks for something impossible (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus the tokens asked for) does not fit in the model's context."""


class EngineOverloaded(ZomniError):
    """The bounded waiting queue is full; retry later (HTTP 429)."""

    status = 429
    type = "rate_limit_error"


class EngineDead(ZomniError):
    """The engine core or one of its workers died; nothing more will be served (HTTP 503)."""

    status = 503
    type = "service_unavailable"


class ProtocolMismatch(ZomniError):
    """A peer speaks another protocol version or schema; refused at HELLO."""

    status = 500
    type = "protocol_error"


ERRORS_BY_NAME: dict[str, type[ZomniError]] = {
    cls.__name__: cls
    for cls in (ZomniError, InvalidRequest, ContextLengthExceeded, EngineOverloaded, EngineDead,
                ProtocolMismatch)
}


def error_from_wire(kind: str, message: str, param: str = "") -> ZomniError:
    """Rebuild a typed error sent by a peer as (class name, message, parameter)."""
    return ERRORS_BY_NAME.get(kind, ZomniError)(message, param=param or None)
