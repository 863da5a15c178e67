"""Scheduler: which requests run in the next step. Plain Python, no torch, so the policy is unit-testable.

First come, first served: a waiting request takes a free cache slot as soon as one exists (continuous batching);
a finished or aborted request returns its slot at once.
"""

from __future__ import annotations

from collections import deque

from calm_engine.engine.request import Request, Status


class Scheduler:
    def __init__(self, slots: int):
        self.free_slots = list(range(slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots; returns the newly admitted ones (they need a prefill)."""
        admitted = []
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            request.slot = self.free_slots.pop()
            request.status = Status.RUNNING
            self.running[request.request_id] = request
            admitted.append(request)
        return admitted

    def finish(self, request: Request, reason: str) -> None:
        """Mark finished and free its slot (or take it off the queue)."""
        if request.status is Status.RUNNING:
            del self.running[request.request_id]
            self.free_slots.append(request.slot)
            self.free_slots.sort(reverse=True)
        elif request.status is Status.WAITING:
            self.waiting.remove(request)
        request.status = Status.FINISHED
        request.slot = None
        request.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
