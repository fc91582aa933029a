"""Admission before any work: a prediction request over the bound on slices in flight gets a 503 at once,
before its body is read, so shedding load costs almost nothing."""

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.admission import Admission, Overloaded

RETRY_AFTER_SECONDS = "1"  # one slice takes tens of milliseconds: a slot frees up well within a second


def overloaded_response(error: Overloaded) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


class AdmissionMiddleware:
    """Holds one unit of admission for each prediction request (POST under `prefix`) while it runs."""

    def __init__(self, app: ASGIApp, admission: Admission, prefix: str = "/v1/") -> None:
        self.app = app
        self.admission = admission
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
            await self.app(scope, receive, send)
        finally:
            self.admission.release(1)
