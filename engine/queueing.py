"""The model lock as a first-come, first-served queue.

One model does one thing at a time. A plain `threading.Lock` polled with a
timeout hands the model to whichever waiter happens to wake first: under 20
clients some waited minutes while others went three times. `FairLock` gives
each waiter a ticket and wakes them in arrival order, can say where a waiter
stands, and refuses new waiters beyond a depth instead of letting them wait
for minutes (the API answers that with 429).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable


class QueueFull(RuntimeError):
    """More requests are waiting for the model than the configured depth allows."""


class FairLock:
    """A FIFO lock: `with lock:` waits its turn; `acquire(cancelled=..., refuse_when_full=True)`
    for callers that can give up (a cancelled turn) or be refused (a full queue)."""

    def __init__(self, max_waiting: int = 0) -> None:
        self.max_waiting = max_waiting  # 0: no limit
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    @property
    def waiting(self) -> int:
        """How many callers wait for the model now (not counting the one that holds it)."""
        with self._cond:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._held

    def locked(self) -> bool:
        return self.busy

    def full(self) -> bool:
        return bool(self.max_waiting) and self.waiting >= self.max_waiting

    def acquire(self, cancelled: Callable[[], bool] | None = None, refuse_when_full: bool = False,
                poll_s: float = 0.05) -> bool:
        """Wait for the model in arrival order. False when `cancelled()` turned true first;
        QueueFull when `refuse_when_full` and the queue is at its depth."""
        ticket = object()
        with self._cond:
            if not self._held and not self._waiting:
                self._held = True
                return True
            if refuse_when_full and self.max_waiting and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model")
            self._waiting.append(ticket)
            try:
                while self._held or self._waiting[0] is not ticket:
                    if cancelled is not None and cancelled():
                        return False
                    self._cond.wait(poll_s if cancelled is not None else None)
                self._held = True
                return True
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            if not self._held:
                raise RuntimeError("release of an unheld FairLock")
            self._held = False
            self._cond.notify_all()

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
