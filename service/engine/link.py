"""A front's connection to the engine (``service.engine.protocol``): the slots it owns, the model
the engine announced, and the requests it has sent and not yet seen answered. It reconnects by
itself: while the engine is away (restarting after a crash) requests are refused with 503."""

import asyncio
import contextlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_core.metadata import ModelMetadata
from service.engine import protocol as p
from service.image_admission import ServiceUnavailable


class EngineUnavailable(ServiceUnavailable):
    """The engine is not reachable, or went away with this request: 503 + Retry-After."""


class EngineRefused(Exception):
    """The engine answered the request with an error (``status``: protocol status)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@dataclass(frozen=True)
class ModelView:
    """The model in service as a front knows it: what it needs to prepare inputs and shape the
    answers, never the session (fronts load no model)."""

    metadata: ModelMetadata
    generation: int
    providers: list[str] = field(default_factory=list)
    sha256: str = ""
    feature_dim: int = 0  # 0: the model has no features output

    @property
    def version(self) -> str:
        return self.metadata.version


@dataclass
class Answer:
    probabilities: np.ndarray  # (images, classes), copied out of the slots
    features: np.ndarray | None
    seconds: float
    batch_images: int


@dataclass
class _Sent:
    slots: list[int]
    future: "asyncio.Future[tuple[float, int]]"


class EngineLink(asyncio.Protocol):
    def __init__(self, socket_path: Path, segment: p.Segment) -> None:
        self.socket_path = socket_path
        self.segment = segment
        self.free_slots = list(range(segment.slots))
        self.model: ModelView | None = None
        self.not_ready_reason = "the engine process is starting"
        self.transport: asyncio.Transport | None = None
        self.sent: dict[int, _Sent] = {}
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._lost: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.announced = asyncio.Event()  # the engine has told this front its model once

    # connection management
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected(), name="engine-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.transport is not None:
            self.transport.close()

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._lost = asyncio.Event()
            try:
                await loop.create_unix_connection(lambda: self, str(self.socket_path))
            except OSError:
                await asyncio.sleep(0.1)
                continue
            await self._lost.wait()
            await asyncio.sleep(0.05)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._buffer.clear()
        hello = (
            p.HELLO.pack(self.segment.slots, p.INPUT_BYTES, p.OUTPUT_BYTES) + str(self.segment.path).encode()
        )
        self.transport.write(p.frame(p.K_HELLO, hello))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.model = None
        self.not_ready_reason = "the engine process is restarting"
        # Nothing will answer these now: their slots are free again, their requests get 503.
        for sent in self.sent.values():
            self.free_slots.extend(sent.slots)
            if not sent.future.done():
                sent.future.set_exception(EngineUnavailable("the engine process stopped during the request"))
        self.sent.clear()
        if self._lost is not None:
            self._lost.set()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for kind, body in p.frames(self._buffer):
            if kind == p.K_DONE:
                self._done(body)
            elif kind == p.K_MODEL:
                self._model(body)

    def _model(self, body: memoryview) -> None:
        seq, generation = p.MODEL.unpack_from(body)
        info = json.loads(bytes(body[p.MODEL.size :]))
        if generation:
            meta = ModelMetadata.from_props(info["props"])
            self.model = ModelView(meta, generation, info["providers"], info["sha256"], info["feature_dim"])
        else:
            self.model, self.not_ready_reason = None, info["reason"]
        if self.transport is not None:
            self.transport.write(p.frame(p.K_ACK, p.ACK.pack(seq)))
        self.announced.set()

    def _done(self, body: memoryview) -> None:
        request_id, status, seconds, batch = p.DONE.unpack_from(body)
        sent = self.sent.pop(request_id, None)
        if sent is None:
            return
        if status == p.OK and not sent.future.done():
            sent.future.set_result((seconds, batch))  # the requester reads the answers, then frees
            return
        self.free_slots.extend(sent.slots)
        if not sent.future.done():
            detail = bytes(body[p.DONE.size :]).decode(errors="replace")
            sent.future.set_exception(EngineRefused(status, detail))

    # requests
    def take_slots(self, images: int) -> list[int]:
        """Slots for one request; admission bounds the images in progress by the slots' number."""
        if len(self.free_slots) < images:
            raise EngineUnavailable("no free slot: more images in progress than this front holds")
        # The slots given back last are taken first: their pages are in memory and in cache, and
        # the segment's untouched pages stay unallocated.
        taken = self.free_slots[-images:]
        del self.free_slots[-images:]
        return taken

    def give_back(self, slots: list[int]) -> None:
        """Slots taken and never sent (the request failed while decoding)."""
        self.free_slots.extend(slots)

    async def run(self, model: ModelView, slots: list[int], features: bool) -> Answer:
        """Send the request whose squares lie in ``slots``; the engine's answer, copied out of them."""
        if self.transport is None:
            self.give_back(slots)
            raise EngineUnavailable(f"no engine: {self.not_ready_reason}")
        request_id = next(self._ids)
        future: asyncio.Future[tuple[float, int]] = asyncio.get_running_loop().create_future()
        self.sent[request_id] = _Sent(slots, future)
        header = p.RUN.pack(request_id, model.generation, len(slots), features)
        self.transport.write(p.frame(p.K_RUN, header, *(p.SLOT.pack(s) for s in slots)))
        try:
            seconds, batch = await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # answered, then cancelled before reading
                self.free_slots.extend(slots)
            elif self.transport is not None and request_id in self.sent:
                # The slots stay the engine's until it answers; it skips the request if it can.
                self.transport.write(p.frame(p.K_CANCEL, p.CANCEL.pack(request_id)))
            raise
        segment, classes = self.segment, model.metadata.num_classes
        probabilities = np.stack([segment.output(slot, classes) for slot in slots])
        vectors = None
        if features:
            vectors = np.stack([segment.output(slot, model.feature_dim, features=True) for slot in slots])
        self.free_slots.extend(slots)
        return Answer(probabilities, vectors, seconds, batch)
