"""Admitted work runs at a lower CPU priority than the event loop, so refusals (503) and readiness answer at once.

The event loop admits or refuses every request; the threads that do the admitted requests' work (Starlette's
thread pool: decoding, preprocessing, encoding; ONNX Runtime's intra-op threads; the batcher) compete with it
for the cores. At equal priority the kernel shares the cores among all of them, and a burst of requests beyond
the bound waits tens of milliseconds for its 503 (docs/limits.md has the measurement). Linux nice values are
per thread and inherited by the threads (and processes) a thread starts: after `lower_work_threads`, every
Python thread lowers its own priority before it runs, and what it starts (ONNX Runtime's thread pool, the
DICOM decoder processes) inherits that. The event loop's thread, started before, keeps its priority.
"""

import os
import sys
import threading
from types import FrameType


def lower_work_threads(niceness: int) -> None:
    """Threads started from now on run `niceness` steps nicer than the process (0: unchanged).

    Only when called from the process's main thread, where uvicorn runs the event loop: an in-process test
    client runs the app in a thread of its own, and the rest of that process is not the service's work.
    """
    if not niceness or threading.current_thread() is not threading.main_thread():
        return

    work = min(19, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + niceness)

    def lower(frame: FrameType, event: str, arg: object) -> None:  # the thread's first event, then never again
        sys.setprofile(None)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), work)

    threading.setprofile(lower)
