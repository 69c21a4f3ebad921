"""The API key that guards the endpoints which change the server (training, model switching)."""

import secrets
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.routing import BaseRoute
from starlette.types import Scope

from service.core.config import Settings
from service.deps import get_settings

bearer = HTTPBearer(auto_error=False, description="the key set in ALEXNET_API_KEY")


def check_key(settings: Settings, authorization: str | None) -> None:
    """Raises 403 when no key is configured, 401 when ``authorization`` does not carry it."""
    if settings.api_key is None or not settings.api_key.get_secret_value():
        # Secure by default: with no key configured nobody may change the server.
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this endpoint is disabled: set ALEXNET_API_KEY on the server and send "
            "`Authorization: Bearer <key>`",
        )
    expected = settings.api_key.get_secret_value().encode()
    scheme, credentials = get_authorization_scheme_param(authorization)  # as HTTPBearer reads it
    # Header values reach the app decoded as latin-1: encode back to the bytes the client sent, so
    # that a key with non-ASCII characters (UTF-8 on the wire) matches its UTF-8 encoding.
    given = credentials.encode("latin-1") if scheme.lower() == "bearer" else b""
    if not secrets.compare_digest(given, expected):  # constant time: no timing oracle on the key
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    check_key(settings, f"Bearer {credentials.credentials}" if credentials is not None else None)


def needs_key(route: BaseRoute) -> bool:
    """Whether ``route`` depends on ``require_api_key`` (directly or through its dependencies)."""
    stack = [getattr(route, "dependant", None)]
    while stack:
        if (dependant := stack.pop()) is None:
            continue
        if dependant.call is require_api_key:
            return True
        stack.extend(dependant.dependencies)
    return False


def scope_checker(settings: Settings) -> Callable[[Scope], None]:
    """``check_key`` on a raw ASGI scope, for ``ApiKeyGate``."""

    def check(scope: Scope) -> None:
        headers = dict(scope["headers"])
        value = headers.get(b"authorization")
        check_key(settings, value.decode("latin-1") if value is not None else None)

    return check


ApiKey = Depends(require_api_key)
