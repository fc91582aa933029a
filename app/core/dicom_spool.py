"""The DICOM node's on-disk spool: every received instance stays on disk until its series' SEG was sent.

    root/incoming/<series key>/<instance key>.dcm   arriving; a series is due after the quiet time
    root/processing/<batch>/...                     being run (moved back to due after a crash)
    root/failed/<batch>/... + error.json            kept with the error until retried (route or restart)

Keys are hashes of the Series/SOP Instance UIDs, so no directory name, log line or listing carries an
identifier from the images. The spool is bounded: a store that would pass max_bytes is refused, and the
sender (which still has the instance) is told "out of resources". Thread-safe: pynetdicom's threads store,
the event loop takes due series.
"""

import hashlib
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KEY_CHARS = 16
ERROR_FILE = "error.json"


def key(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:KEY_CHARS]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@dataclass(frozen=True)
class FailedSeries:
    batch: str
    instances: int
    bytes: int
    error: str
    attempts: int
    failed_at: float  # Unix time


class DicomSpool:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.incoming, self.processing, self.failed_dir = root / "incoming", root / "processing", root / "failed"
        for folder in (self.incoming, self.processing, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._last_received: dict[str, float] = {}  # series key -> monotonic time of its last instance
        self._ready: list[str] = []  # batches to run now (recovered after a restart)
        self.bytes = sum(folder_bytes(b) for top in (self.incoming, self.processing, self.failed_dir)
                         for b in top.iterdir())  # fmt: skip
        now = time.monotonic()
        for series in self.incoming.iterdir():  # interrupted arrivals: due after a quiet time from now
            self._last_received[series.name] = now
        self._ready = sorted(b.name for b in self.processing.iterdir())  # interrupted runs: run again

    def store(self, series_uid: str, sop_instance_uid: str, data: bytes) -> bool:
        """Write one instance; False (nothing written) when the spool would pass its cap."""
        series = key(series_uid)
        path = self.incoming / series / f"{key(sop_instance_uid)}.dcm"
        with self._lock:
            replaced = path.stat().st_size if path.exists() else 0  # the same instance sent again
            if self.bytes - replaced + len(data) > self.max_bytes:
                return False
            path.parent.mkdir(exist_ok=True)
            partial = path.with_suffix(".part")
            partial.write_bytes(data)
            partial.replace(path)  # a crash never leaves half an instance under its name
            self.bytes += len(data) - replaced
            self._last_received[series] = time.monotonic()
        return True

    def take_due(self, quiet_s: float) -> list[str]:
        """Series quiet for quiet_s move to processing/ as batches; returns the batches to run."""
        now = time.monotonic()
        with self._lock:
            due, self._ready = self._ready, []
            for series, last in list(self._last_received.items()):
                if now - last >= quiet_s:
                    batch = f"{series}-{time.time_ns()}"
                    (self.incoming / series).rename(self.processing / batch)
                    del self._last_received[series]
                    due.append(batch)
        return due

    def requeue(self, batch: str) -> None:
        """Run this batch again at the next look (the models were not ready yet)."""
        with self._lock:
            self._ready.append(batch)

    def files(self, batch: str) -> list[Path]:
        return sorted(p for p in (self.processing / batch).iterdir() if p.suffix == ".dcm")

    def done(self, batch: str) -> None:
        folder = self.processing / batch
        with self._lock:
            self.bytes -= folder_bytes(folder)
            shutil.rmtree(folder)

    def fail(self, batch: str, error: str) -> None:
        """Keep the batch with its error; the attempt count survives retries."""
        previous = self.failed_dir / batch / ERROR_FILE
        source = self.processing / batch
        attempts = 1
        record = source / ERROR_FILE
        if record.exists():
            attempts = json.loads(record.read_text())["attempts"] + 1
        record.write_text(json.dumps({"error": error, "attempts": attempts, "failed_at": time.time()}))
        with self._lock:
            if previous.parent.exists():
                shutil.rmtree(previous.parent)
            source.rename(self.failed_dir / batch)

    def list_failed(self) -> list[FailedSeries]:
        result = []
        for folder in sorted(self.failed_dir.iterdir()):
            record = json.loads((folder / ERROR_FILE).read_text())
            instances = [p for p in folder.iterdir() if p.suffix == ".dcm"]
            result.append(
                FailedSeries(
                    folder.name, len(instances), sum(p.stat().st_size for p in instances), record["error"],
                    record["attempts"], record["failed_at"],
                )
            )  # fmt: skip
        return result

    def retry(self, batch: str) -> bool:
        """Move a failed batch back to processing/ and queue it; False when there is no such failed batch."""
        folder = self.failed_dir / batch
        if "/" in batch or batch.startswith(".") or not folder.is_dir():
            return False
        with self._lock:
            folder.rename(self.processing / batch)
            self._ready.append(batch)
        return True

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "incoming": len(self._last_received),
                "processing": sum(1 for _ in self.processing.iterdir()),
                "failed": sum(1 for _ in self.failed_dir.iterdir()),
            }
