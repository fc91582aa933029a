"""Every failure answers JSON `{"detail": "<what went wrong, for a person>"}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app.api.overload import overloaded_response, timed_out_response
from app.core.admission import Overloaded
from app.core.batching import ShuttingDown
from app.core.codecs import ImageRejected
from app.core.deadline import DeadlineExceeded
from app.core.service import NotReady
from app.core.triton import TritonUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "5"
LOCATION_NAMES = {"query": "query parameter", "body": "form field", "header": "header", "path": "path parameter"}


def describe_validation_error(error: RequestValidationError) -> str:
    """[{'loc': ('body', 'file'), 'msg': 'Field required'}] -> "form field 'file': Field required"."""
    parts = []
    for item in error.errors():
        location = [str(x) for x in item.get("loc", ())]
        where = LOCATION_NAMES.get(location[0], location[0]) if location else "request"
        name = ".".join(location[1:])
        parts.append(f"{where} {name!r}: {item.get('msg', 'invalid')}" if name else f"{where}: {item.get('msg')}")
    return "; ".join(parts) or "the request is invalid"


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": describe_validation_error(error)}, status_code=422)


async def image_rejected(request: Request, error: ImageRejected) -> JSONResponse:
    return JSONResponse({"detail": error.detail}, status_code=error.status_code)


async def not_ready(request: Request, error: NotReady | ShuttingDown) -> JSONResponse:
    return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": RETRY_AFTER_SECONDS})


async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
    return overloaded_response(error)


async def timed_out(request: Request, error: DeadlineExceeded) -> JSONResponse:
    return timed_out_response(error)


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Only genuine bugs end here: bad input has its own 4xx above. Tests fail on any of these.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal error; it has been logged"}, status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ImageRejected, image_rejected)
    app.add_exception_handler(NotReady, not_ready)
    app.add_exception_handler(ShuttingDown, not_ready)
    app.add_exception_handler(TritonUnavailable, not_ready)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(DeadlineExceeded, timed_out)
    app.add_exception_handler(Exception, unexpected_error)
