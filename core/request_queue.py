"""`RequestQueue`: the waiting queue, served in `(priority, arrival_time, seq)` order.

A preempted request is pushed back with its original key, so it goes ahead of every request
of the same priority that arrived after it, and keeps its place relative to older ones.
`seq` (the order of pushes) only breaks exact ties of arrival time, so the order is total and
requests themselves are never compared.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from .request import Request


class RequestQueue:
    """A min-heap of waiting requests with O(n) removal (only aborts remove from the middle)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def push(self, request: Request) -> None:
        key = (request.priority, request.arrival_time, next(self._counter))
        heapq.heappush(self._heap, (*key, request))

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> bool:
        """Remove `request` if it is queued; True when it was."""
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Request]:
        """Requests in service order (sorts a copy; for stats and tests, not the hot path)."""
        return (entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))
