"""The value checks every wire struct's `__post_init__` runs on what it decoded."""

from __future__ import annotations

import math

from .errors import InvalidRequest

FLOAT32_MAX = 3.4028234663852886e38


def finite_float32(value: float) -> bool:
    """True for a number that is finite as a float32 (what the workers compute with)."""
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except (TypeError, OverflowError):  # not a number, or an int too large for a float
        return False


def check(ok: bool, param: str, message: str) -> None:
    """Refuse the request (`InvalidRequest` naming `param`) unless `ok`."""
    if not ok:
        raise InvalidRequest(message, param=param)
