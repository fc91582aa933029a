"""Admission before any work, and the time budget while it runs.

A prediction request over the bound on slices in flight gets a 503 at once, before its body is read, so shedding
load costs almost nothing. An admitted request gets a Deadline (LGG_REQUEST_TIMEOUT_S, counted from its headers)
that its work checks between steps; at the deadline the client gets a 504 whatever the work is doing, and the
request's unit of admission stays taken until the work has really stopped (its thread returned), so timed-out
work never piles up beyond the bound.
"""

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.admission import Admission, Overloaded
from app.core.deadline import Deadline, DeadlineExceeded

RETRY_AFTER_SECONDS = "1"  # one slice takes tens of milliseconds: a slot frees up well within a second


def overloaded_response(error: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


def timed_out_response(error: DeadlineExceeded) -> JSONResponse:
    # 504, not 503: the request itself took too long; sent again unchanged it would likely take as long.
    detail = f"{error} (LGG_REQUEST_TIMEOUT_S); send fewer or smaller slices per request, or retry later"
    return JSONResponse({"detail": detail}, status_code=504)


class AdmissionMiddleware:
    """Holds one unit of admission for each prediction request (POST under `prefix`) until its work has ended;
    answers 504 when the request's time budget runs out first."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        timeout_s: float,
        on_timeout: Callable[[], None],
        prefix: str = "/v1/",
    ) -> None:
        self.app = app
        self.admission = admission
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout  # once per request whose budget ran out (a metrics counter)
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        try:
            self.admission.acquire(1)
        except Overloaded as error:
            await overloaded_response(error)(scope, receive, send)
            return
        try:
            deadline = Deadline(self.timeout_s, self.on_timeout)
            scope.setdefault("state", {})["deadline"] = deadline  # request.state.deadline for the routes
            await self.run_within(deadline, scope, receive, send)
        finally:
            self.admission.release(1)

    async def run_within(self, deadline: Deadline, scope: Scope, receive: Receive, send: Send) -> None:
        """Runs the app in this task (its unit is released the moment it returns, as it was without a budget); at
        the deadline a timer answers 504 if the app has not started answering, and the app's own answer is dropped."""
        started = False
        answer: asyncio.Task | None = None

        async def send_once(message: Message) -> None:
            nonlocal started
            if answer is not None:  # the 504 went out: what the work answers after it is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        def on_deadline() -> None:  # in the event loop, between two of the app's steps: no send is half done
            nonlocal answer
            if not started:
                answer = asyncio.ensure_future(timed_out_response(deadline.exceeded())(scope, receive, send))

        timer = asyncio.get_running_loop().call_later(deadline.remaining(), on_deadline)
        try:
            await self.app(scope, receive, send_once)  # the work stops at its next deadline check
        finally:
            timer.cancel()
            if answer is not None:
                await answer
