"""A front's way to the engine process's app for every request it does not run itself (training
jobs, models, the gallery, metrics, the page): the same request over the engine's Unix socket,
its body and answer streamed through. One app holds the server's state, so every front sees the
same jobs, gallery and model; the fronts keep the images' hot path (``/predict``, the Open
Inference Protocol) to themselves.

httpx over a Unix socket rather than a proxy of our own making: it is already a dependency (the
tests' client), streams both ways and keeps its connections alive."""

import logging
from collections.abc import Iterable
from pathlib import Path

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Match

from service.core.errors import error

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110, 7.6.1) belong to one connection, not to the message.
HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
}


OWN_HEADERS = {b"date", b"server"}


class PrimaryProxy:
    def __init__(self, socket_path: Path, routes: Iterable[BaseRoute]) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self.client = httpx.AsyncClient(transport=transport, timeout=None, limits=limits)
        self.routes = list(routes)

    async def aclose(self) -> None:
        await self.client.aclose()

    def _name_route(self, request: Request) -> None:
        """The engine app's route template for the request's metrics (not the catch-all's)."""
        for route in self.routes:
            if route.matches(request.scope)[0] is Match.FULL:
                request.scope["route"] = route
                return

    async def handle(self, request: Request) -> Response:
        self._name_route(request)
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
        url = httpx.URL(scheme="http", host="engine", path=request.url.path, query=request.url.query.encode())
        body = request.stream() if request.method not in ("GET", "HEAD") else None
        outgoing = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await self.client.send(outgoing, stream=True)
        except httpx.TransportError as exc:
            log.warning("the engine process did not answer %s %s: %r", request.method, request.url.path, exc)
            return error(503, "the engine process is restarting: try again", {"Retry-After": "1"})
        # The front's server adds its own date and server headers.
        answer = [(k, v) for k, v in upstream.headers.raw if k.lower() not in HOP_BY_HOP | OWN_HEADERS]
        response = StreamingResponse(
            upstream.aiter_raw(), status_code=upstream.status_code, background=BackgroundTask(upstream.aclose)
        )
        response.raw_headers = answer
        return response
