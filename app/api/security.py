"""Security defaults at the HTTP layer: the API key checked on the headers before any body is read, response
headers that keep prediction data out of caches and the viewer out of frames, no credentials in logs."""

import hmac
import logging
import re

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNAUTHORIZED = "missing or wrong API key: send it as the X-API-Key header or as 'Authorization: Bearer <key>'"
# The viewer loads only its own script and style and shows masks as data: URLs.
VIEWER_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# Query parameters that may carry a secret, whatever the route: their values never reach the access log.
SECRET_QUERY = re.compile(r"(?i)((?:[\w-]*(?:key|token|secret|password|passwd|auth)[\w-]*)=)[^&\s]*")


class ApiKeyMiddleware:
    """401 on the headers alone for every route under `prefix`: an unauthenticated upload is never read."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1/") -> None:
        self.app = app
        self.expected = api_key.encode()
        self.prefix = prefix

    def authorized(self, headers: Headers) -> bool:
        supplied = headers.get("x-api-key")
        if supplied is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            supplied = token if scheme.lower() == "bearer" else None
        # Constant time: how long the comparison takes says nothing about how much of the key was right.
        return supplied is not None and hmac.compare_digest(supplied.encode(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and scope["path"].startswith(self.prefix)
        if protected and not self.authorized(Headers(scope=scope)):
            response = JSONResponse({"detail": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """nosniff and no framing everywhere; no-store on the API (patient-derived data); a strict CSP on the viewer."""

    def __init__(self, app: ASGIApp, api_prefix: str = "/v1/") -> None:
        self.app = app
        self.api_prefix = api_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["X-Frame-Options"] = "DENY"
                if path.startswith(self.api_prefix):
                    headers["Cache-Control"] = "no-store"
                elif path == "/" or path.startswith("/static/"):
                    headers["Content-Security-Policy"] = VIEWER_CSP
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RedactCredentials(logging.Filter):
    """For uvicorn's access log: the request line's query values named like a key or token become [redacted]."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                SECRET_QUERY.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True
