"""Graceful shutdown on SIGTERM, in three steps:

1. drain: /readyz answers 503 (load balancers stop routing here) while requests, new ones included, are still
   answered, each with `Connection: close` so clients reconnect elsewhere; this lasts `shutdown_drain_s`;
2. uvicorn stops accepting connections and waits up to `shutdown_grace_s` for the requests in flight;
3. the lifespan's shutdown stops the service, and the process exits with code 0.

uvicorn's own SIGTERM handler would skip step 1 and, since uvicorn 0.29, re-raise the signal once it is done,
so the process would end with code 143: the handler is replaced for as long as the app runs.
"""

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings
from app.core.service import InferenceService

log = logging.getLogger(__name__)


def drain_on_sigterm(service: InferenceService, settings: Settings) -> Callable[[], None]:
    """Installs the SIGTERM handler when running under uvicorn's main thread; returns what restores the previous one."""
    previous = signal.getsignal(signal.SIGTERM)
    # uvicorn installs its Server's bound handle_exit; anything else (a test client, another server) keeps its own.
    server = getattr(previous, "__self__", None)
    if not isinstance(server, uvicorn.Server) or threading.current_thread() is not threading.main_thread():
        return lambda: None
    if server.config.timeout_graceful_shutdown is None:  # an explicit --timeout-graceful-shutdown wins
        server.config.timeout_graceful_shutdown = settings.shutdown_grace_s
    loop = asyncio.get_running_loop()

    def stop_accepting() -> None:
        grace = server.config.timeout_graceful_shutdown
        log.info("drain over: no new connections; waiting up to %g s for the requests in flight", grace)
        server.should_exit = True  # not handle_exit(): it would re-raise SIGTERM at exit

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if service.draining:  # a second SIGTERM cuts the drain short
            loop.call_soon_threadsafe(stop_accepting)
            return
        service.draining = True
        log.info("SIGTERM: not ready any more; answering for %g s more, then draining", settings.shutdown_drain_s)
        loop.call_soon_threadsafe(loop.call_later, settings.shutdown_drain_s, stop_accepting)

    signal.signal(signal.SIGTERM, on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


class CloseWhenDrainingMiddleware:
    """While draining, every response closes its connection: no keep-alive connection is left to be cut."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = getattr(scope["app"].state, "service", None) if scope["type"] == "http" else None
        if service is None:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and service.draining:
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        await self.app(scope, receive, send_closing)
