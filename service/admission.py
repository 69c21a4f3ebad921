"""Server-wide bounds by cost: memory held by decodes, and bytes held by uploads in progress.

The queue admits by image count; these admit by what an image or an upload will hold, so that a
few costly-but-valid requests cannot take the memory that many cheap ones would share.
"""

from fastapi.responses import JSONResponse
from prometheus_client import Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from alexnet_core.images import ImageInputError
from service.core.metrics import Metrics
from service.core.middleware import CLOSE, ReceiveGuard, error_response
from service.image_admission import Overloaded
from service.tallies import LocalTally, Tally


class MemoryBudget:
    """Bytes reserved against a limit, thread-safe; server-wide when ``tally`` is shared."""

    def __init__(self, limit: int, used: Gauge, what: str, tally: Tally | None = None) -> None:
        self.limit = limit
        self.what = what
        self._tally = tally or LocalTally()
        self._gauge = used

    @property
    def used(self) -> int:
        return self._tally.total

    def try_reserve(self, amount: int) -> bool:
        if not self._tally.try_add(amount, self.limit):
            return False
        self._gauge.set(self._tally.own)
        return True

    def release(self, amount: int) -> None:
        self._tally.add(-amount)
        self._gauge.set(self._tally.own)


class DecodeBudget(MemoryBudget):
    def __init__(self, limit: int, metrics: Metrics, tally: Tally | None = None) -> None:
        super().__init__(limit, metrics.decode_bytes, "decode", tally)
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

    def __init__(self, app: ASGIApp, limit: int, metrics: Metrics, tally: Tally | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.budget = MemoryBudget(limit, metrics.upload_bytes, "upload", tally)
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
