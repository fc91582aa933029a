"""Dependencies shared by routes: the settings, the ready service, the API key schemes for OpenAPI."""

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.core.deadline import Deadline
from app.core.service import InferenceService

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key.")
bearer = HTTPBearer(auto_error=False, description="The service's API key as a bearer token.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


def get_deadline(request: Request) -> Deadline:
    """The request's time budget, set by AdmissionMiddleware on every prediction request."""
    return request.state.deadline


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
DeadlineDep = Annotated[Deadline, Depends(get_deadline)]


def declare_api_key(
    key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    """Puts the API key schemes in the OpenAPI document (only when a key is configured); the check itself is
    ApiKeyMiddleware's, on the headers, before FastAPI reads the body for the route."""
