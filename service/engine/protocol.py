"""How a front process and the engine talk: small framed messages over one Unix socket per front,
and the pixels and results in a shared-memory segment the front creates, cut into slots.

A slot holds one image: its central square (uint8, S x S x 3) as the front decoded it, then the
engine's answer for it (float32 probabilities, and features when asked for). The front decodes
straight into a slot and reads the answer from it; nothing is pickled and no pixel crosses the
socket. A slot is the front's again only when the engine has answered its request (DONE), which
it does exactly once per request, also for a cancelled one.

Why a file in /dev/shm rather than ``multiprocessing.shared_memory``: on Python < 3.13 a process
that attaches a ``SharedMemory`` registers it with its resource tracker, which unlinks it when
that process exits, under the front that made it; a file in the server's runtime folder is
attached by path and removed with that folder.
"""

import mmap
import os
import struct
from pathlib import Path

import numpy as np

# Largest central square and answer a slot holds: a model resized beyond this, or with more
# classes, is refused by the fronts with a clear 503 (the engine process could still serve it).
MAX_SQUARE = 512
MAX_CLASSES = 1000
FEATURES = 4096
INPUT_BYTES = 3 * MAX_SQUARE * MAX_SQUARE
OUTPUT_BYTES = 4 * (MAX_CLASSES + FEATURES)
SLOT_BYTES = INPUT_BYTES + OUTPUT_BYTES

FRAME = struct.Struct("!IB")  # length of what follows the length field, message kind

# front -> engine
HELLO = struct.Struct("!QQQ")  # slots, input bytes, output bytes; the segment's path follows
RUN = struct.Struct("!QQHB")  # request id, model generation, images, want features; slots follow
SLOT = struct.Struct("!H")
CANCEL = struct.Struct("!Q")  # request id
ACK = struct.Struct("!Q")  # model announcement seen
# engine -> front
MODEL = struct.Struct("!QQ")  # announcement number, model generation (0: none); JSON follows
DONE = struct.Struct("!QBdI")  # request id, status, inference seconds, images in that call; detail follows

K_HELLO, K_RUN, K_CANCEL, K_ACK = 1, 2, 3, 4
K_MODEL, K_DONE = 1, 2
OK, FAILED, MODEL_GONE, CANCELLED, BUSY = range(5)


def frame(kind: int, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return FRAME.pack(len(body) + 1, kind) + body


def frames(buffer: bytearray) -> list[tuple[int, memoryview]]:
    """The whole messages at the start of ``buffer`` (removed from it): (kind, body)."""
    found: list[tuple[int, memoryview]] = []
    offset, size = 0, len(buffer)
    data = bytes(buffer)
    while size - offset >= FRAME.size:
        length, kind = FRAME.unpack_from(data, offset)
        end = offset + 4 + length
        if end > size:
            break
        found.append((kind, memoryview(data)[offset + FRAME.size : end]))
        offset = end
    del buffer[:offset]
    return found


class Segment:
    """The slots of one front, mapped in this process."""

    def __init__(self, path: Path, slots: int, create: bool) -> None:
        self.path = path
        self.slots = slots
        size = slots * SLOT_BYTES
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # sparse: pages are allocated as slots are first written
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self.map, np.uint8)

    def square(self, slot: int, side: int) -> np.ndarray:
        start = slot * SLOT_BYTES
        return self.bytes[start : start + 3 * side * side].reshape(side, side, 3)

    def output(self, slot: int, width: int, features: bool = False) -> np.ndarray:
        start = slot * SLOT_BYTES + INPUT_BYTES + (4 * MAX_CLASSES if features else 0)
        return self.bytes[start : start + 4 * width].view(np.float32)
