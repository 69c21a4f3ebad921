"""A decode worker's side (``service.decoding`` runs the pool): its loop, and the wire format both
sides speak over the worker's socket."""

import contextlib
import signal
import socket
import struct

import numpy as np

from alexnet_core.images import ImageInputError, decode_cost
from alexnet_core.pipeline import decode_square

# A task: the server sends the image (kind, payload length, resize, max pixels, max JPEG scans;
# then the bytes); the worker weighs it from its header and answers its cost; the server
# reserves that against the decode budget and answers GO (the worker decodes and answers the
# square) or SKIP (the worker drops it). Weighing in the worker keeps header parsing, which a
# crafted file can make cost hundreds of milliseconds of Python, off the event loop's GIL and
# under the time cap.
TASK = struct.Struct("!BQQQQ")
IMAGE, PING = 0, 1
GO, SKIP = b"g", b"s"
# Worker -> server: kind, then for a cost its bytes; for a square its height, width, channels and
# timings (its pixels follow); for a refusal its HTTP status and the length of the UTF-8 detail
# that follows. Plain fields, not pickles: a decoder subverted by hostile bytes must not be able
# to run code in the server.
SQUARE, REFUSED, PONG, COST = 0, 1, 2, 3
REPLY = struct.Struct("!BQQQdd")
MAX_DETAIL = 4096


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL) if size else b""
    if len(data) != size:
        raise EOFError
    return data


def _refuse(sock: socket.socket, exc: ImageInputError) -> None:
    detail = exc.detail.encode()[:MAX_DETAIL]
    sock.sendall(REPLY.pack(REFUSED, exc.status_code, len(detail), 0, 0.0, 0.0) + detail)


def serve(sock: socket.socket) -> None:
    """A worker's loop: one task at a time, until the server closes the socket or kills it."""
    # SIGTERM ends a worker at once, even inside a long decode (one C call, where a Python signal
    # handler would only run once it returns).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle("alexnet-serve: decode")
    try:
        while True:
            kind, size, resize, max_pixels, max_scans = TASK.unpack(receive_exactly(sock, TASK.size))
            if kind == PING:
                sock.sendall(REPLY.pack(PONG, 0, 0, 0, 0.0, 0.0))
                continue
            data = receive_exactly(sock, size)
            try:
                cost = decode_cost(data, resize, max_pixels, max_scans)
                sock.sendall(REPLY.pack(COST, cost.bytes, 0, 0, 0.0, 0.0))
                if receive_exactly(sock, 1) != GO:
                    continue
                square, decode_s, square_s = decode_square(data, resize, max_pixels)
            except ImageInputError as exc:
                _refuse(sock, exc)
                continue
            height, width, channels = square.shape
            sock.sendall(REPLY.pack(SQUARE, height, width, channels, decode_s, square_s))
            sock.sendall(np.ascontiguousarray(square).data)
    except (EOFError, ConnectionError):
        return
