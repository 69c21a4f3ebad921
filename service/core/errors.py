"""Exception handlers: every error is JSON with a readable ``detail`` (FastAPI's documented
``app.exception_handler`` hook, one per kind of error)."""

import logging
from contextlib import suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from alexnet_core.errors import StatusError
from alexnet_core.images import ImageInputError
from service.database import DatabaseError, unavailable_detail
from service.database.engine import RETRY_AFTER_S
from service.image_admission import ServiceUnavailable
from service.training_cluster import ClusterRefused
from service.training_jobs import JobError

log = logging.getLogger("service")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def error(
    status: int, detail: str, headers: dict[str, str] | None = None, key: str = "detail"
) -> JSONResponse:
    return JSONResponse({key: detail}, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One sentence in `detail`, the structured list beside it; a problem with the body as a whole
    # (missing, not an object) has no field name: say "body".
    errors = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    where = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
    problems = "; ".join(f"{w}: {e['msg']}" for w, e in zip(where, errors, strict=True))
    return JSONResponse({"detail": f"invalid request: {problems}", "errors": errors}, status_code=422)


def _allowed_methods(request: Request) -> list[str]:
    return [
        m
        for m in HTTP_METHODS
        if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in request.app.routes)
    ]


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if isinstance(exc.__context__, MultiPartException):
        # Starlette's 400 for a form it cannot parse, often from the body's first bytes. The size
        # comes first, as it does for a body whose Content-Length says it: the rest is read (the
        # body limit counts it), and one over the limit gets its 413 in place of this answer.
        # RuntimeError: Starlette's "Stream consumed", the body was read to its end already.
        with suppress(ClientDisconnect, RuntimeError):
            async for _ in request.stream():
                pass
    headers = exc.headers
    if exc.status_code == 405 and headers and "Allow" in headers and (allowed := _allowed_methods(request)):
        # Starlette's router names the methods of the first route with this path only, and has no
        # option to merge them; GET and POST /train are two routes (two handlers, two schemas),
        # and a 405 must list every method of the resource (RFC 9110, 15.5.6). No route matching
        # in full: StaticFiles' own 405, whose header is right.
        headers = {**headers, "Allow": ", ".join(allowed)}
    return error(exc.status_code, str(exc.detail), headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error(500, f"internal error: {type(exc).__name__}")


async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
    """A database that is down or refuses, wherever a route met it: 503 naming it, never a 500."""
    database = getattr(request.app.state, "database", None)
    detail = unavailable_detail(exc, database.name if database else "the state database")
    if detail is None:
        return await _unexpected(request, exc)
    log.warning("%s %s: %s", request.method, request.url.path, detail)
    return error(503, detail, {"Retry-After": str(RETRY_AFTER_S)})


def install(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: StatusError) -> JSONResponse:
        retry = getattr(exc, "retry_after_s", None)
        return error(exc.status_code, exc.detail, {"Retry-After": str(retry)} if retry else None)

    async def unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return error(503, str(exc), {"Retry-After": "1"})

    app.add_exception_handler(ImageInputError, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(JobError, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClusterRefused, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(DatabaseError, domain_error)  # type: ignore[arg-type]
    app.add_exception_handler(SQLAlchemyError, _database_error)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceUnavailable, unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # Starlette's own (404 no route, 405 wrong method) as well as FastAPI's subclass.
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
