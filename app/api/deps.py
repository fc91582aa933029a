"""Dependencies shared by routes: the settings, the ready service, the API key check."""

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.core.config import Settings
from app.core.service import InferenceService

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The service's API key.")
bearer = HTTPBearer(auto_error=False, description="The service's API key as a bearer token.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]


def require_api_key(
    settings: SettingsDep,
    key: Annotated[str | None, Security(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> None:
    if settings.api_key is None:
        return
    supplied = key if key is not None else credentials.credentials if credentials is not None else None
    expected = settings.api_key.get_secret_value()
    if supplied is None or not secrets.compare_digest(supplied.encode(), expected.encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong API key: send it as the X-API-Key header or as 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
