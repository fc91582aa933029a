"""Admission control: a bound on the slices in flight, so overload is answered at once instead of queued.

A request takes one unit when it arrives (before its body is read) and, once its slices are known, one per
further slice. Beyond the bound it is refused, never queued: every accepted request then waits behind at most
the bound's worth of work, and the latency at the bound stays predictable.
"""

import os
from collections.abc import Callable


def default_capacity() -> int:
    """Two slices per core this process may use: one computing while the other decodes or encodes."""
    return 2 * len(os.sched_getaffinity(0))


class Overloaded(RuntimeError):
    """The bound on slices in flight is reached; the client should retry later (503 with Retry-After)."""


class Admission:
    """Counts slices in flight. Used from the event loop only, so no lock is needed."""

    def __init__(self, capacity: int, on_change: Callable[[int], None], on_reject: Callable[[], None]) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.on_change = on_change
        self.on_reject = on_reject

    @property
    def saturated(self) -> bool:
        return self.in_flight >= self.capacity

    def acquire(self, slices: int, held: int = 0) -> None:
        """Takes `slices` more units, `held` being what the caller holds already; raises Overloaded beyond the bound.

        A request larger than the whole bound is admitted when it is alone, or it could never run.
        """
        if slices and self.in_flight > held and self.in_flight + slices > self.capacity:
            self.on_reject()
            raise Overloaded(
                f"overloaded: {self.in_flight} slices in flight, the bound is {self.capacity}; retry shortly"
            )
        self.in_flight += slices
        self.on_change(self.in_flight)

    def release(self, slices: int) -> None:
        self.in_flight -= slices
        self.on_change(self.in_flight)
