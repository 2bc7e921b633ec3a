"""Per-client rate limits: a token bucket on requests and one on model tokens.

A client is its API key when the server has one, else its IP address. Each client has

    requests bucket: `rps` per second, holds at most max(1, rps); a request takes 1 or is
                     refused (429, Retry-After: seconds until 1 is back)
    tokens bucket:   `tokens_per_s` per second, holds at most max(1, tokens_per_s); a request
                     is admitted unless it is overdrawn, and pays afterwards: its prompt
                     and generated tokens are charged as the engine produces them
                     (`charge_tokens`, called by the sequences' metrics timers), so the level
                     may go below zero and later requests wait until it is back above it.

Charging what was actually computed (not an estimate taken at admission, as OpenAI does)
keeps a chat request without `max_tokens` from being priced at the whole context. The price:
a client may overshoot by what its requests in flight generate before they finish.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar


class TokenBucket:
    """`rate` units per second up to `capacity`; starts full; `charge` may overdraw it."""

    __slots__ = ("rate", "capacity", "level", "stamp", "clock")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = max(1.0, rate)  # one second's worth, and at least one unit
        self.level = self.capacity
        self.clock = clock
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (0: it does now)."""
        self._refill()
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> float:
        """Take `amount` if the bucket holds it: 0; else the seconds to wait, taking nothing."""
        wait = self.wait_s(amount)
        if wait == 0:
            self.level -= amount
        return wait

    def charge(self, amount: float) -> None:
        """Take `amount` whatever the level (tokens already computed must be paid)."""
        self._refill()
        self.level -= amount

    @property
    def full(self) -> bool:
        self._refill()
        return self.level >= self.capacity


# The tokens bucket of the request being handled: set by the HTTP middleware, read by the
# code that sees tokens computed (in the handler's task and the tasks it starts).
TOKEN_METER: ContextVar[TokenBucket | None] = ContextVar("zomni_token_meter", default=None)


def current_token_meter() -> TokenBucket | None:
    return TOKEN_METER.get()


def charge_tokens(meter: TokenBucket | None, num_tokens: int) -> None:
    if meter is not None and num_tokens:
        meter.charge(num_tokens)


_MAX_IDLE_CLIENTS = 4096  # beyond: forget clients whose buckets are full again


class RateLimiter:
    """The buckets of every client; a rate of 0 turns its bucket off."""

    def __init__(self, rps: float = 0.0, tokens_per_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.rps = rps
        self.tokens_per_s = tokens_per_s
        self.clock = clock
        self._clients: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    @property
    def enabled(self) -> bool:
        return self.rps > 0 or self.tokens_per_s > 0

    def _buckets(self, client: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        buckets = self._clients.get(client)
        if buckets is None:
            if len(self._clients) >= _MAX_IDLE_CLIENTS:
                self._forget_idle()
            buckets = (TokenBucket(self.rps, self.clock) if self.rps > 0 else None,
                       TokenBucket(self.tokens_per_s, self.clock)
                       if self.tokens_per_s > 0 else None)
            self._clients[client] = buckets
        return buckets

    def _forget_idle(self) -> None:
        # A full bucket is what a new client gets: dropping it changes nothing.
        self._clients = {c: b for c, b in self._clients.items()
                         if not all(x is None or x.full for x in b)}

    def admit(self, client: str) -> tuple[float, TokenBucket | None]:
        """(seconds to wait before retrying, 0 if admitted; the tokens bucket to charge)."""
        requests, tokens = self._buckets(client)
        # Tokens first: a request refused for its tokens must not also spend a request.
        wait = tokens.wait_s(0) if tokens is not None else 0.0  # not overdrawn
        if wait == 0 and requests is not None:
            wait = requests.take(1)
        return wait, tokens


def retry_after(wait_s: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
