"""Admitted work runs nicer than the event loop (app/core/work_priority.py). In a subprocess: the hook is
process-wide."""

import subprocess
import sys

from tests.conftest import REPO_ROOT

PROBE = """
import os, threading
from app.core.work_priority import lower_work_threads

def nice():
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

seen = []
def record():
    seen.append(nice())
    inner = threading.Thread(target=lambda: seen.append(nice()))  # started by a work thread: inherits, no more
    inner.start()
    inner.join()

lower_work_threads({niceness})
worker = threading.Thread(target=record)
worker.start()
worker.join()
print(nice(), *seen)
"""


def nice_values(niceness: int) -> list[int]:
    code = PROBE.format(niceness=niceness)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [int(v) for v in result.stdout.split()]


def test_threads_started_after_run_nicer_and_the_event_loops_thread_keeps_its_priority() -> None:
    main, worker, inner = nice_values(10)
    assert worker == main + 10 and inner == main + 10


def test_niceness_0_changes_nothing() -> None:
    assert len(set(nice_values(0))) == 1
