"""The HTTP server's side of the limits: uvicorn's options from the settings, plus what uvicorn
has no option for (a deadline for a request's headers, JSON for a request it cannot parse)."""

import asyncio
import json
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.core.config import Settings

log = logging.getLogger("service")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on a request's head. uvicorn times a connection
    out only while it idles between requests (keep-alive), so a client that connects and sends
    nothing, or trickles its headers, holds a descriptor for as long as it likes; and neither
    uvicorn nor httptools bounds the size of a head, which the server buffers whole. The limits
    are set on a subclass made per server (uvicorn builds protocols from a class)."""

    header_timeout_s: float = 10.0
    max_head_bytes: int = 64 * 1024
    _header_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is not None:  # inside a request's head: count up to its end
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end
            if self._head_bytes > self.max_head_bytes:
                self._stop_header_timer()
                detail = f"request head (line and headers) over {self.max_head_bytes} bytes"
                self._refuse(b"431 Request Header Fields Too Large", detail)
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_timer()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._stop_header_timer()
        self._head_bytes = 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request it cannot parse in plain text; every other error is JSON.
        self._refuse(b"400 Bad Request", f"malformed HTTP request: {msg}")

    def _refuse(self, status: bytes, detail: str) -> None:
        if self.transport.is_closing():
            return
        body = json.dumps({"detail": detail}).encode()
        head = b"HTTP/1.1 " + status + b"\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers)
        head += b"content-type: application/json\r\nconnection: close\r\n"
        head += b"content-length: %d\r\n\r\n" % len(body)
        self.transport.write(head + body)
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_head_bytes: int) -> type[GuardedHttpToolsProtocol]:
    limits = {"header_timeout_s": header_timeout_s, "max_head_bytes": max_head_bytes}
    return type("HttpProtocol", (GuardedHttpToolsProtocol,), limits)


def raise_descriptor_limit(wanted: int) -> None:
    """Each connection holds a descriptor; the usual soft limit (1024) is below the connection
    limit, and a process out of descriptors stops accepting anyone, /health included."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < wanted:
        log.warning("descriptor limit %d is below max_connections plus headroom (%d)", new, wanted)


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` from the settings (``overrides``: e.g. port=0 in tests)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": guarded_protocol(settings.header_timeout_s, settings.max_header_bytes),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        "backlog": settings.backlog,
        "timeout_graceful_shutdown": int(settings.request_timeout_s),
    }
    return uvicorn.Config(app, **{**options, **overrides})
