"""Server-wide bounds by cost: memory held by decodes, and bytes held by uploads in progress.

The queue admits by image count; these admit by what an image or an upload will hold, so that a
few costly-but-valid requests cannot take the memory that many cheap ones would share.
"""

import threading

from fastapi.responses import JSONResponse
from prometheus_client import Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from alexnet_core.images import ImageInputError
from service.core.metrics import Metrics
from service.core.middleware import CLOSE, ReceiveGuard, error_response
from service.inference import Overloaded


class MemoryBudget:
    """Bytes reserved against a limit, thread-safe."""

    def __init__(self, limit: int, used: Gauge, what: str) -> None:
        self.limit = limit
        self.what = what
        self._used = 0
        self._gauge = used
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def try_reserve(self, amount: int) -> bool:
        with self._lock:
            if self._used + amount > self.limit:
                return False
            self._used += amount
            self._gauge.set(self._used)
            return True

    def release(self, amount: int) -> None:
        with self._lock:
            self._used -= amount
            self._gauge.set(self._used)


class DecodeBudget(MemoryBudget):
    def __init__(self, limit: int, metrics: Metrics) -> None:
        super().__init__(limit, metrics.decode_bytes, "decode")
        metrics.decode_budget.set(limit)
        self.metrics = metrics

    def reserve(self, amount: int) -> None:
        """Reserve an image's decode, or refuse: 413 if it could never fit, 503 while others hold it."""
        if amount > self.limit:
            self.metrics.rejected.labels("too_costly").inc()
            raise ImageInputError(
                413,
                f"image too costly: decoding it would take about {amount / 2**20:.0f} MiB, over the "
                f"server's decode budget of {self.limit / 2**20:.0f} MiB",
            )
        if not self.try_reserve(amount):
            self.metrics.rejected.labels("decode_memory").inc()
            raise Overloaded(
                f"server busy: decodes in progress hold {self.used / 2**20:.0f} MiB of the "
                f"{self.limit / 2**20:.0f} MiB decode budget"
            )


class UploadBudget:
    """503 + Retry-After when the bodies of all requests in progress would hold more than
    ``limit`` bytes. A request reserves its declared Content-Length up front (refused before a
    byte of it is read) and whatever it sends beyond; it holds them until it ends, since the parsed
    upload stays in memory until then. Kept apart from ``BodySizeLimit``, the per-request limit."""

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.budget = MemoryBudget(limit, metrics.upload_bytes, "upload")
        metrics.upload_budget.set(limit)

    def _busy(self) -> JSONResponse:
        self.metrics.rejected.labels("upload_memory").inc()
        detail = (
            f"server busy: uploads in progress hold {self.budget.used / 2**20:.0f} MiB of the "
            f"{self.budget.limit / 2**20:.0f} MiB upload budget"
        )
        # Connection: close, since the rest of the body is not worth receiving.
        return error_response(503, detail, {"Retry-After": "1", **CLOSE})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        held = int(length) if length.isdigit() else 0
        if held and not self.budget.try_reserve(held):
            await self._busy()(scope, receive, send)
            return
        guard = ReceiveGuard(scope, receive, send)

        def reserve(received: int) -> JSONResponse | None:
            """What arrives beyond the bytes held so far is reserved too, or refused."""
            nonlocal held
            if received > held:
                if not self.budget.try_reserve(received - held):
                    return self._busy()
                held = received
            return None

        try:
            await self.app(scope, guard.counting(reserve), guard.guarded_send)
        finally:
            self.budget.release(held)
