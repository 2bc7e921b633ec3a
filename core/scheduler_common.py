"""What the kinds' schedulers share: the checks before a request is queued, taking aborted
requests out of the queues, and the recent-rate window behind their stats."""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

from zomni.proto import EngineOverloaded, InvalidRequest

from .request import RequestStatus
from .request_queue import RequestQueue


def check_can_queue(request_id: str, requests: dict[str, Any], waiting: RequestQueue,
                    max_waiting_requests: int) -> None:
    """`EngineOverloaded` when the waiting queue is full; `InvalidRequest` for an id in use."""
    if len(waiting) >= max_waiting_requests:
        raise EngineOverloaded(f"{len(waiting)} requests are already waiting; retry later")
    if request_id in requests:
        raise InvalidRequest(f"request id {request_id!r} is already in use",
                             param="request_id")


def take_out(request_ids: Sequence[str], requests: dict[str, Any], running: list,
             waiting: RequestQueue) -> list:
    """The unfinished requests among `request_ids`, in that order and each once, removed from
    `running` or `waiting` (by its status) but still in `requests`, its status unchanged."""
    taken = []
    for request_id in dict.fromkeys(request_ids):
        request = requests.get(request_id)
        if request is None:
            continue
        if request.status == RequestStatus.RUNNING:
            running.remove(request)
        else:
            waiting.remove(request)
        taken.append(request)
    return taken


class RecentRate:
    """Items per second over the last 10 s: (monotonic time, count) pairs, oldest first."""

    WINDOW_S = 10.0

    def __init__(self):
        self._counts: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, count: int) -> None:
        self._counts.append((time.monotonic(), count))

    def per_s(self) -> float:
        now = time.monotonic()
        while self._counts and now - self._counts[0][0] > self.WINDOW_S:
            self._counts.popleft()
        span = now - self._counts[0][0] if len(self._counts) > 1 else 0.0
        return sum(n for _, n in self._counts) / span if span > 0 else 0.0
