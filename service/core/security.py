"""The API key that guards the endpoints which change the server (training, model switching)."""

import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute
from starlette.types import Scope

from service.core.config import Settings
from service.deps import get_settings

bearer = HTTPBearer(auto_error=False, description="the key set in ALEXNET_API_KEY")


async def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    if settings.api_key is None or not settings.api_key.get_secret_value():
        # Secure by default: with no key configured nobody may change the server.
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this endpoint is disabled: set ALEXNET_API_KEY on the server and send "
            "`Authorization: Bearer <key>`",
        )
    expected = settings.api_key.get_secret_value().encode()
    # Header values reach the app decoded as latin-1: encode back to the bytes the client sent, so
    # that a key with non-ASCII characters (UTF-8 on the wire) matches its UTF-8 encoding.
    given = credentials.credentials.encode("latin-1") if credentials is not None else b""
    if not secrets.compare_digest(given, expected):  # constant time: no timing oracle on the key
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong API key (Authorization: Bearer <key>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


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


def scope_checker(settings: Settings) -> Callable[[Scope], Awaitable[None]]:
    """The dependency above on a raw ASGI scope, for ``ApiKeyGate``: a ``Request`` made from the
    scope reads the headers only, never the body."""

    async def check(scope: Scope) -> None:
        await require_api_key(settings, await bearer(Request(scope)))

    return check


ApiKey = Depends(require_api_key)
