"""A request's time budget (LGG_REQUEST_TIMEOUT_S), passed down its one data flow and checked between steps.

Threads cannot be cancelled, so the budget is cooperative: the work calls `check(stage)` between stages, between
slices (decode, preprocess, postprocess) and between inference batches, and a check past the deadline raises
DeadlineExceeded, which ends the work there. The HTTP side (app/api/overload.py) answers 504 at the deadline
itself, whatever the work is doing, and keeps the request's admission until the work has really stopped.
"""

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(RuntimeError):
    """The time budget ran out; `stage` says where the work was (504)."""

    def __init__(self, budget_s: float, stage: str) -> None:
        super().__init__(f"the work took more than its time budget of {budget_s:g} s and was stopped during {stage}")
        self.stage = stage


class Deadline:
    """One request's budget; `on_expire` runs once, when the budget is first found spent (a metrics counter)."""

    def __init__(self, budget_s: float, on_expire: Callable[[], None] = lambda: None) -> None:
        self.budget_s = budget_s
        self.expires = time.monotonic() + budget_s
        self.stage = "upload"  # the last stage checked in: what the work was doing when the budget ran out
        self._on_expire = on_expire
        self._expired = False
        self._lock = threading.Lock()  # the work's thread and the event loop may both find it spent

    def remaining(self) -> float:
        return self.expires - time.monotonic()

    def check(self, stage: str) -> None:
        """Enter `stage`; DeadlineExceeded if the budget is spent."""
        self.stage = stage
        if self.remaining() <= 0:
            raise self.exceeded()

    def each(self, items: Iterable[T], stage: str) -> Iterator[T]:
        """The items, with a check before each: a loop over slices stops at the first one past the deadline."""
        for item in items:
            self.check(stage)
            yield item

    def exceeded(self) -> DeadlineExceeded:
        """The error to raise or answer; counts the expiry once."""
        with self._lock:
            first, self._expired = not self._expired, True
        if first:
            self._on_expire()
        return DeadlineExceeded(self.budget_s, self.stage)


UNLIMITED = Deadline(math.inf)  # for callers without a request (benchmarks, the bulk CLI, in-process tests)
