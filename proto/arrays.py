"""Arrays on the wire: an `ArrayRef` in the body, the bytes in an extra frame of the message.

    frames:  [type byte, msgpack body, extra 0, extra 1, ...]
    body:    ... ArrayRef(dtype="uint8", shape=[2, 64, 64, 3], frame=0) ...

The bytes are C-contiguous, in the dtype's native (little-endian on every machine we run on)
byte order. Frames are sent with `copy=False`, so a large array is never copied into the
message. A reader checks the reference against what arrived before viewing the bytes:
`read_array` raises `InvalidRequest` for a missing frame, a wrong size or an unknown dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np

from .errors import InvalidRequest
from .messages import ArrayRef

# The dtypes an array may have on the wire: no object arrays, nothing numpy would interpret.
WIRE_DTYPES = frozenset({"uint8", "int32", "int64", "float16", "float32", "float64"})


def add_array(array: np.ndarray, frames: list) -> ArrayRef:
    """Append `array`'s bytes to `frames` (a message's extra frames); the reference to them."""
    array = np.ascontiguousarray(array)
    if array.dtype.name not in WIRE_DTYPES:
        raise ValueError(f"dtype {array.dtype.name} cannot travel on the wire")
    frames.append(memoryview(array).cast("B"))
    return ArrayRef(array.dtype.name, list(array.shape), len(frames) - 1)


def read_array(ref: ArrayRef, frames: Sequence) -> np.ndarray:
    """The array `ref` names in a message's extra `frames` (a read-only view, no copy)."""
    if ref.dtype not in WIRE_DTYPES:
        raise InvalidRequest(f"unknown array dtype {ref.dtype!r}")
    if not 0 <= ref.frame < len(frames):
        raise InvalidRequest(f"array frame {ref.frame} missing: the message has "
                             f"{len(frames)} extra frames")
    if any(d < 0 for d in ref.shape):
        raise InvalidRequest(f"negative array shape {ref.shape}")
    dtype = np.dtype(ref.dtype)
    buffer = memoryview(frames[ref.frame])
    size = buffer.nbytes
    needed = math.prod(ref.shape) * dtype.itemsize
    if size != needed:
        raise InvalidRequest(f"array frame {ref.frame} holds {size} bytes, its reference "
                             f"{ref.dtype} {ref.shape} needs {needed}")
    return np.frombuffer(buffer, dtype=dtype).reshape(ref.shape)


def regroup(messages: Sequence[msgspec.Struct], frames: Sequence) -> list:
    """The extra frames `messages` refer to, renumbered: each `ArrayRef` field of each message
    is pointed at its frame's place in the returned list (messages are updated in place).

    The engine core forwards the workers' arrays to clients this way: one step's result holds
    every finished request's pixels, and each client's message gets only its own.
    """
    picked: list = []
    for msg in messages:
        for name in msg.__struct_fields__:
            ref = getattr(msg, name)
            if isinstance(ref, ArrayRef):
                picked.append(frames[ref.frame])
                ref.frame = len(picked) - 1
    return picked
