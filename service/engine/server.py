"""The engine's side of the front protocol (``service.engine.protocol``), in the engine process:
it accepts each front's connection, maps its slots, hands each request's squares to the batcher
as they lie in shared memory, writes the answers back into the slots, and announces every change
of the model in service to every front (and waits for them to agree before an activation answers).
"""

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from alexnet_core.session import OnnxClassifier
from service.embedding import feature_dim
from service.engine import protocol as p
from service.inference import InferenceQueue, InferenceResult, ServiceUnavailable
from service.model_registry import ModelRegistry
from service.preparation import input_batch
from service.supervisor import name_process

log = logging.getLogger(__name__)


def announcement(classifier: OnnxClassifier | None, reason: str) -> bytes:
    """What a front needs of the model in service: its metadata, never its session."""
    if classifier is None:
        return json.dumps({"reason": reason}).encode()
    meta = classifier.session.get_modelmeta().custom_metadata_map
    dim = feature_dim(classifier) if classifier.metadata.features_output else 0
    body = {"props": meta, "providers": classifier.providers, "sha256": classifier.sha256, "feature_dim": dim}
    return json.dumps(body).encode()


class _FrontLink(asyncio.Protocol):
    """One front's connection: its requests in, their DONE messages out."""

    def __init__(self, server: "EngineServer") -> None:
        self.server = server
        self.buffer = bytearray()
        self.segment: p.Segment | None = None
        self.pending: dict[int, bool] = {}  # requests not yet answered: cancelled or not
        self.acked = 0
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.server.links.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        # Requests still in the batcher are skipped; their slots' mapping lives until they are.
        self.closed = True
        self.server.links.discard(self)
        self.server.acked_changed()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for kind, body in p.frames(self.buffer):
            try:
                self.handle(kind, body)
            except Exception:  # a front that speaks nonsense is cut off, not the engine
                log.exception("malformed message from a front; closing its connection")
                self.transport.close()
                return

    def handle(self, kind: int, body: memoryview) -> None:
        if kind == p.K_RUN:
            self.run(body)
        elif kind == p.K_CANCEL:
            (request_id,) = p.CANCEL.unpack(body)
            if request_id in self.pending:  # a cancel that crossed its answer is moot
                self.pending[request_id] = True
        elif kind == p.K_ACK:
            (self.acked,) = p.ACK.unpack(body)
            self.server.acked_changed()
        elif kind == p.K_HELLO:
            slots, input_bytes, output_bytes = p.HELLO.unpack_from(body)
            if (input_bytes, output_bytes) != (p.INPUT_BYTES, p.OUTPUT_BYTES):
                raise ValueError("the front's slot layout differs from the engine's")
            self.segment = p.Segment(Path(bytes(body[p.HELLO.size :]).decode()), slots, create=False)
            self.acked = self.server.seq  # what it is told now is the latest
            self.transport.write(self.server.model_message(self.server.registry.current))
        else:
            raise ValueError(f"unknown message kind {kind}")

    def done(
        self, request_id: int, status: int, seconds: float = 0.0, batch: int = 0, detail: str = ""
    ) -> None:
        self.pending.pop(request_id, None)
        if not self.closed:
            message = p.DONE.pack(request_id, status, seconds, batch) + detail.encode()[:4096]
            self.transport.write(p.frame(p.K_DONE, message))

    def run(self, body: memoryview) -> None:
        request_id, generation, images, features = p.RUN.unpack_from(body)
        slots = [p.SLOT.unpack_from(body, p.RUN.size + 2 * i)[0] for i in range(images)]
        classifier = self.server.models.get(generation)
        if classifier is None:
            self.done(request_id, p.MODEL_GONE, detail="the model changed while the request was prepared")
            return
        if self.segment is None or max(slots, default=0) >= self.segment.slots:
            raise ValueError("a request for slots the front never announced")
        meta = classifier.metadata
        squares = [self.segment.square(slot, meta.resize_size) for slot in slots]
        self.pending[request_id] = False
        on_done = self._answer(request_id, slots, classifier, bool(features))
        cancelled: Callable[[], bool] = lambda: self.closed or self.pending.get(request_id, False)  # noqa: E731

        def submit() -> None:
            batch = input_batch(meta, squares)
            self.server.inference.submit(classifier, batch, images, bool(features), on_done, cancelled)

        if meta.input_kind == "square":  # the squares are the input: views of the slots, no copy
            submit()
            return
        # The crops kind: the float crops are cut in the pool's threads (numpy lets go of the GIL).

        future = self.loop.run_in_executor(self.server.pool, submit)
        future.add_done_callback(lambda f: f.exception() and on_done(f.exception()))  # type: ignore[arg-type]

    def _answer(
        self, request_id: int, slots: list[int], classifier: OnnxClassifier, features: bool
    ) -> Callable[[InferenceResult | BaseException], None]:
        """Runs in the batcher's thread: the answers into the slots, then DONE on the loop."""

        def on_done(value: InferenceResult | BaseException) -> None:
            if isinstance(value, BaseException):
                status = p.FAILED
                if isinstance(value, asyncio.CancelledError):
                    status = p.CANCELLED
                elif isinstance(value, ServiceUnavailable):
                    status = p.BUSY
                reply = (request_id, status, 0.0, 0, str(value))
            else:
                segment = self.segment
                assert segment is not None
                for row, slot in enumerate(slots):
                    probabilities = value.probabilities[row]
                    segment.output(slot, len(probabilities))[:] = probabilities
                    if features and value.features is not None:
                        segment.output(slot, value.features.shape[1], features=True)[:] = value.features[row]
                reply = (request_id, p.OK, value.seconds, value.batch_images, "")
            self.loop.call_soon_threadsafe(self.done, *reply)

        return on_done


class EngineServer:
    """The engine's listener for the fronts, beside the primary app's HTTP socket."""

    def __init__(
        self, path: Path, registry: ModelRegistry, inference: InferenceQueue, pool: Executor
    ) -> None:
        self.path, self.registry, self.inference, self.pool = path, registry, inference, pool
        self.links: set[_FrontLink] = set()
        # Requests prepared for the previous model still run on it after a swap.
        self.models: dict[int, OnnxClassifier] = {}
        self.generation = 0
        self.seq = 0
        self._waiting: list[tuple[int, threading.Event]] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.model_changed(self.registry.current)
        self.registry.listeners.append(self.announce)
        current = self.registry.current
        on_gpu = current is not None and "CUDAExecutionProvider" in current.providers
        name_process("engine cuda:0" if on_gpu else "engine cpu")
        self._server = await self.loop.create_unix_server(lambda: _FrontLink(self), str(self.path))

    def stop(self) -> None:
        if self.announce in self.registry.listeners:
            self.registry.listeners.remove(self.announce)
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.transport.abort()

    def announce(self, classifier: OnnxClassifier | None, timeout_s: float = 2.0) -> None:
        """Tell every front of the model now in service, and (from another thread: an activation
        loads in a worker thread) return once they have all seen it, so that an activation
        answers when every front serves the new model."""
        if threading.get_ident() == self.thread:
            self.model_changed(classifier)
            return
        seen = threading.Event()

        def on_loop() -> None:
            self.model_changed(classifier)
            self._waiting.append((self.seq, seen))
            self.acked_changed()

        self.loop.call_soon_threadsafe(on_loop)
        if not seen.wait(timeout_s):
            log.warning("a front did not confirm the model change within %.0f s", timeout_s)

    def model_changed(self, classifier: OnnxClassifier | None) -> None:
        self.seq += 1
        if classifier is not None:
            self.generation += 1
            self.models = {g: c for g, c in self.models.items() if g == self.generation - 1}
            self.models[self.generation] = classifier
        message = self.model_message(classifier)
        for link in self.links:
            if link.segment is not None:
                link.transport.write(message)

    def model_message(self, classifier: OnnxClassifier | None) -> bytes:
        generation = self.generation if classifier is not None else 0
        body = announcement(classifier, self.registry.not_ready_reason)
        return p.frame(p.K_MODEL, p.MODEL.pack(self.seq, generation), body)

    def acked_changed(self) -> None:
        acked = min((link.acked for link in self.links if link.segment is not None), default=self.seq)
        still = []
        for seq, seen in self._waiting:
            if acked >= seq:
                seen.set()
            else:
                still.append((seq, seen))
        self._waiting = still
