"""Framing: `[type byte, msgpack body, *extra frames]`, decoded only into the struct that type
names.

The receiver looks at frame 0 before decoding anything, so bytes from an untrusted peer are
only ever turned into one of the typed structs in `messages.py`, never into arbitrary objects.
Extra frames are raw array bytes that an `ArrayRef` in the body points at (`arrays.py`); they
are handed back undecoded.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Sequence
from typing import Any

import msgspec

from .errors import InvalidRequest
from .messages import CLIENT_MESSAGES, WORKER_MESSAGES, MsgType

_encoder = msgspec.msgpack.Encoder()
_decoders = {t: msgspec.msgpack.Decoder(cls) for t, cls in {**CLIENT_MESSAGES,
                                                             **WORKER_MESSAGES}.items()}


def _schema_hash() -> str:
    """A hash of every message's JSON schema: two peers with the same hash read each other's
    bytes the same way. Union bodies (one struct per model kind) count each member."""
    types = []
    for _, body in sorted({**CLIENT_MESSAGES, **WORKER_MESSAGES}.items()):
        types.extend(typing.get_args(body) or [body])
    _, components = msgspec.json.schema_components(types)
    return hashlib.sha256(msgspec.json.encode(components, order="sorted")).hexdigest()[:16]


SCHEMA_HASH = _schema_hash()


def encode(msg_type: MsgType, msg: Any, extra: Sequence = ()) -> list:
    """Frames for one message: the type byte, the msgpack body, then `extra` raw frames."""
    return [bytes((msg_type,)), _encoder.encode(msg), *extra]


def decode(frames: Sequence) -> tuple[MsgType, Any, list]:
    """(type, struct, extra frames) of `[type byte, body, *extra]`; `InvalidRequest` for
    anything else.

    Validation errors raised by a struct's `__post_init__` (bad sampling values) keep their
    message, so the sender learns exactly which field was wrong.
    """
    if len(frames) < 2 or len(frames[0]) != 1:
        raise InvalidRequest(f"expected frames [type, body, *arrays], got {len(frames)} frames")
    try:
        msg_type = MsgType(bytes(frames[0])[0])
    except ValueError:
        raise InvalidRequest(f"unknown message type {bytes(frames[0])[0]}") from None
    try:
        return msg_type, _decoders[msg_type].decode(frames[1]), list(frames[2:])
    except msgspec.ValidationError as e:
        raise InvalidRequest(f"invalid {msg_type.name} message: {e}") from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"undecodable {msg_type.name} message: {e}") from None
    except RecursionError:  # msgspec recurses per nesting level of the bytes it reads
        raise InvalidRequest(f"undecodable {msg_type.name} message: nested too deeply") from None
