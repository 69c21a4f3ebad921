"""Pure ASGI middleware: they see the raw request stream, so they can answer before (or while) a
body is read, which the limits and the key check depend on. Their answers are Starlette
``Response`` objects, as from a route."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.errors import error as error_response
from service.core.metrics import Metrics
from service.image_admission import Overloaded

# Set on the scope by a middleware that answers a route's request itself, so that the request is
# counted under that route in the metrics (Starlette sets scope["route"] only when routing ran).
ROUTE_KEY = "alexnet.route"

# The unread rest of a refused body is not worth receiving: the connection is closed instead.
CLOSE = {"Connection": "close"}


class _HttpOnly:
    """Base of the middleware that act on HTTP requests only: other scopes (lifespan) pass through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
        else:
            await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class ReceiveGuard:
    """Wraps ``receive`` so that a middleware can answer while the app is still reading the
    body: the app then sees a disconnected client, and whatever it sends later is dropped."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send
        self.responded = False
        self.started = False

    async def answer(self, response: JSONResponse) -> Message:
        if not self.started:  # a response already under way cannot be replaced
            await response(self.scope, self.receive, self.send)
        self.responded = True
        return {"type": "http.disconnect"}

    async def guarded_send(self, message: Message) -> None:
        if not self.responded:
            self.started = self.started or message["type"] == "http.response.start"
            await self.send(message)

    def counting(self, check: Callable[[int], JSONResponse | None]) -> Receive:
        """``receive`` that adds up the body's bytes; after each part, ``check(bytes so far)`` may
        return an answer, sent in the app's place (the app then sees a disconnected client)."""
        received = 0

        async def receive() -> Message:
            nonlocal received
            if self.responded:
                return {"type": "http.disconnect"}
            message = await self.receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if (answer := check(received)) is not None:
                    return await self.answer(answer)
            return message

        return receive


class BodySizeLimit(_HttpOnly):
    """413 for a body over ``max_bytes``: at once from Content-Length, else counted while it
    streams in, so an unbounded (chunked) upload is cut off instead of buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.max_bytes
        # The Open Inference Protocol's error shape on its routes (tritonclient reads `error`).
        key = "error" if scope["path"].startswith("/v2/") else "detail"
        too_large = error_response(
            413, f"request body over the upload limit of {limit} bytes ({limit / 2**20:.1f} MiB)", CLOSE, key
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        guard = ReceiveGuard(scope, receive, send)
        limited_receive = guard.counting(lambda received: too_large if received > limit else None)
        await self.app(scope, limited_receive, guard.guarded_send)


class BodyTimeout(_HttpOnly):
    """408 for a body that is not complete ``timeout_s`` after the request began: an upload that
    stalls (or trickles) would otherwise hold its connection and buffers for as long as the client
    likes. uvicorn has no body timeout of its own (its keep-alive timeout runs between requests)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        super().__init__(app)
        self.timeout_s = timeout_s

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        guard = ReceiveGuard(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if guard.responded:
                return {"type": "http.disconnect"}
            if body_done:  # after the body: waiting for a disconnect is not bounded here
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                detail = f"request body not received within {self.timeout_s:g} s"
                return await guard.answer(error_response(408, detail, CLOSE))
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, guard.guarded_send)


class ApiKeyGate:
    """The key check of the routes that need one, before their body is read: an anonymous
    request then costs no upload and no JSON parse on the event loop, and a malformed body from
    someone without the key gets 401, not a validation error. The routes keep their dependency
    too (OpenAPI documents it, and it guards a route this gate would miss)."""

    def __init__(
        self, app: ASGIApp, routes: list[BaseRoute], check: Callable[[Scope], Awaitable[None]]
    ) -> None:
        self.app = app
        self.routes = routes  # those that need the key, with their full paths
        self.check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            route = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
            if route is not None:
                try:
                    await self.check(scope)
                except HTTPException as exc:
                    scope[ROUTE_KEY] = getattr(route, "path", None)
                    await error_response(exc.status_code, exc.detail, exc.headers)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class RoomCheck(Protocol):
    def check_room(self) -> None: ...  # raises Overloaded when not one more image fits


class QueueFullGate:
    """``POST /predict`` is refused with 503 + Retry-After before its body is read while the
    inference queue has no room for even one image. Otherwise, under overload, every refusal first
    pays for its upload and multipart parse on the event loop, which the admitted requests need.
    A request let through can still be refused by ``admit``."""

    def __init__(self, app: ASGIApp, inference: RoomCheck, path: str = "/predict") -> None:
        self.app = app
        self.inference = inference
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            try:
                self.inference.check_room()
            except Overloaded as exc:
                scope[ROUTE_KEY] = self.path
                # Keep-alive: the server reads and discards the unread body, the client retries
                # on the same connection.
                await error_response(503, str(exc), {"Retry-After": "1"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestMetrics(_HttpOnly):
    """Requests by route template and status, latency, and requests in flight."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get(ROUTE_KEY, "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)
