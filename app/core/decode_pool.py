"""Compressed DICOM pixel data are decoded in supervised worker processes, so a native crash costs one request.

The JPEG 2000, JPEG and JPEG-LS decoders pydicom calls (GDCM, OpenJPEG via Pillow, CharLS) are C/C++: on
crafted data GDCM throws a C++ exception through Python and abort()s the whole process. Here each decode
runs in a worker process (forkserver: never a fork of the threaded server) with an address-space limit
(RLIMIT_AS) and a time limit; a worker that dies, overruns or runs out of memory is dropped (a fresh one
starts for the next decode) and the request is refused with a 4xx. One worker decodes one file at a time,
so a crash takes no other request down.
docs/limits.md has the measured cost per decode (in process vs in a worker).
"""

import atexit
import multiprocessing
import queue
import resource
import threading
from multiprocessing.connection import Connection

import numpy as np

from app.core.limits import ImageRejected

# Imported once in the forkserver, so each new worker starts with the decoders loaded (milliseconds, not seconds).
PRELOAD = ["app.core.dicom"]


def serve(connection: Connection, memory_bytes: int) -> None:
    """Worker loop: DICOM bytes in, ("ok", stored pixel array) or ("error", reason) out; exits when the pipe closes."""
    from app.core.dicom import decode_stored_pixels  # in the worker: the decoders run here

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file with patient pixels
    while True:
        try:
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[str, object] = ("ok", decode_stored_pixels(data))
        except MemoryError:
            reply = ("memory", None)
        # Decoder errors on corrupt data have many types; the parent answers 400 without quoting them.
        except Exception as error:
            reply = ("error", type(error).__name__)
        connection.send(reply)


class Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, memory_bytes: int) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, memory_bytes), daemon=True)
        self.process.start()
        child.close()

    def stop(self) -> None:
        self.connection.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


class DecoderPool:
    """`workers` decoder slots; decode() borrows one, starting its process when it has none (first use, or after
    the last one died, overran or ran out of memory), so a process that cannot start costs a 503, not a 500."""

    def __init__(self, workers: int, timeout_s: float, memory_bytes: int) -> None:
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.idle: queue.Queue[Worker | None] = queue.Queue()
        self.replaced = 0  # workers lost to crashes, overruns or memory (for tests and logs)
        for _ in range(workers):
            self.idle.put(None)

    def start_worker(self) -> Worker:
        try:
            return Worker(self.context, self.memory_bytes)
        except Exception as error:  # fork refused (process or memory limits), forkserver gone
            raise ImageRejected(503, "a DICOM decoder process could not be started; retry in a few seconds") from error

    def decode(self, data: bytes, syntax_name: str) -> np.ndarray:
        """The file's stored pixel array, decoded in a worker; ImageRejected (400/413/503) when that fails."""
        try:
            worker = self.idle.get(timeout=self.timeout_s)
        except queue.Empty as error:
            raise ImageRejected(503, "every DICOM decoder is busy; retry in a few seconds") from error
        status, payload = "died", None
        try:
            worker = worker or self.start_worker()
            worker.connection.send_bytes(data)
            if worker.connection.poll(self.timeout_s):
                status, payload = worker.connection.recv()
            else:
                status = "timeout"
        except (EOFError, OSError):  # the worker died: a native crash (abort, segfault) or the memory limit
            status = "died"
        finally:
            if worker is not None and status not in ("ok", "error"):  # dead, hung or out of memory
                worker.stop()
                worker = None  # the next decode in this slot starts a fresh process
                self.replaced += 1
            self.idle.put(worker)
        what = f"the DICOM pixel data ({syntax_name})"
        if status == "ok":
            return payload  # type: ignore[return-value]
        if status == "timeout":
            raise ImageRejected(400, f"decoding {what} took more than {self.timeout_s:g} s; refused")
        if status == "memory":
            raise ImageRejected(413, f"decoding {what} needs more memory than a decoder may use")
        if status == "died":
            raise ImageRejected(400, f"cannot decode {what}: the decoder failed on corrupt data")
        raise ImageRejected(400, f"cannot decode {what}: truncated or corrupt")

    def close(self) -> None:
        while True:
            try:
                worker = self.idle.get_nowait()
            except queue.Empty:
                return
            if worker is not None:
                worker.stop()


_pool: DecoderPool | None = None
_pool_lock = threading.Lock()


def decoder_pool(workers: int, timeout_s: float, memory_bytes: int) -> DecoderPool:
    """The process's one pool, made on the first compressed decode with that caller's settings (later calls share
    it: one service per process); most requests never need it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = DecoderPool(workers, timeout_s, memory_bytes)
            atexit.register(_pool.close)
        return _pool
