"""The soak's request mix: valid photos and hostile uploads, each body encoded once, sent by
closed-loop clients drawing from the weighted mix with a fixed seed (also used by the hostile-load
benchmark)."""

import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from benchmarks.images import big_jpeg, encoded, photo

MAX_UPLOAD_MB = 20  # the service's default; the oversized kinds send more than this
MAX_FILES = 16  # the service's default

# --------------------------------------------------------------------------- the request mix


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    size = struct.pack("<HH", width, height)
    return b"GIF89a" + size + b"\x00\x00\x00" + b",\x00\x00\x00\x00" + size + b"\x00\x02\x02D\x01\x00;"


@dataclass(frozen=True)
class Kind:
    """One kind of request: its body encoded once (the clients only send bytes, so that their
    CPU use, on the cores the server also uses, stays small), and the statuses it may get.
    ``closed`` allows the connection to be closed instead: a server that answers 413 before an
    oversized body is read may reset the connection while the client is still sending."""

    name: str
    weight: float
    valid: bool
    expected: frozenset[int]
    body: bytes | Callable[[], Iterator[bytes]] = b""
    content_type: str = ""
    params: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    path: str = "/predict"

    def send(self, client: httpx.Client, url: str) -> httpx.Response:
        headers = {"Content-Type": self.content_type} if self.content_type else {}
        content = self.body() if callable(self.body) else self.body
        return client.post(f"{url}{self.path}", content=content, headers=headers, params=self.params)


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://127.0.0.1/", files=[(f, (n, d)) for f, n, d in files])
    return request.read(), request.headers["Content-Type"]


def request_kinds() -> list[Kind]:
    china = encoded(photo("china.jpg"), "JPEG", quality=90)
    flower_png = encoded(photo("flower.jpg"), "PNG")
    rng = np.random.default_rng(1)
    noise = b"\x00" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()  # no format starts with 0
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    over = (MAX_UPLOAD_MB + 1) * 2**20

    def one(name: str, data: bytes) -> tuple[bytes, str]:
        return multipart([("file", name, data)])

    def kind(
        name: str,
        weight: float,
        valid: bool,
        expected: set[int],
        files: list[tuple[str, str, bytes]],
        **extra: Any,
    ) -> Kind:
        body, content_type = multipart(files)
        return Kind(name, weight, valid, frozenset(expected), body, content_type, **extra)

    def endless() -> Iterator[bytes]:  # chunked: no Content-Length, only counting stops it
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n\xff\xd8\xff'
        for _ in range(over // 65536 + 64):
            yield bytes(65536)

    declared_body, declared_type = one("big.jpg", b"\xff\xd8\xff" + bytes(over))
    return [
        kind("photo-jpeg", 30, True, {200}, [("file", "china.jpg", china)]),
        kind("photo-png", 14, True, {200}, [("file", "flower.png", flower_png)]),
        kind("three-photos", 6, True, {200}, [("files", f"{i}.jpg", china) for i in range(3)]),
        kind("big-jpeg-12mp", 2, True, {200}, [("file", "big.jpg", big_jpeg(noise=4))]),
        kind("top-k-1000", 3, True, {200}, [("file", "china.jpg", china)], params={"top_k": "1000"}),
        kind("truncated-jpeg", 7, False, {422}, [("file", "t.jpg", china[: len(china) // 3])]),
        kind("random-bytes", 7, False, {415}, [("file", "r.jpg", noise)]),
        kind("png-bomb-header", 4, False, {413}, [("file", "b.png", png_claiming(100_000, 100_000))]),
        kind("gif-bomb-header", 3, False, {413}, [("file", "b.gif", gif_claiming(65535, 65535))]),
        kind("svg", 3, False, {415}, [("file", "x.svg", svg)]),
        kind("empty-file", 3, False, {400}, [("file", "e.jpg", b"")]),
        kind("too-many-files", 3, False, {400}, [("files", f"{i}.jpg", b"x") for i in range(MAX_FILES + 1)]),
        kind("bad-top-k", 2, False, {422}, [("file", "a.jpg", china)], params={"top_k": "0"}),
        kind("top-k-not-a-number", 1, False, {422}, [("file", "a.jpg", china)], params={"top_k": "five"}),
        Kind("no-file", 3, False, frozenset({400}), b"", "application/octet-stream"),
        Kind(
            "malformed-multipart",
            2,
            False,
            frozenset({400}),
            b"--xx\r\ngarbage",
            "multipart/form-data; boundary=xx",
        ),
        Kind("oversized-declared", 1, False, frozenset({413}), declared_body, declared_type, closed=True),
        Kind(
            "oversized-chunked",
            0.5,
            False,
            frozenset({413}),
            endless,
            "multipart/form-data; boundary=b",
            closed=True,
        ),
    ]


# --------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    kind: str
    status: str  # "200", ..., "closed" (no response, allowed for that kind), "exc:<type>"
    seconds: float
    finished: float  # monotonic
    expected: bool


class Load:
    """``concurrency`` closed-loop clients (each sends its next request when the last is answered)
    drawing kinds from the weighted mix with a fixed seed, until stopped."""

    def __init__(self, url: str, kinds: list[Kind], concurrency: int, seed: int) -> None:
        self.url, self.kinds, self.concurrency, self.seed = url, kinds, concurrency, seed
        weights = np.asarray([k.weight for k in kinds], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; wait for the requests in flight (their clients then close connections)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)

    def _client(self, index: int) -> None:
        rng = np.random.default_rng([self.seed, index])
        with httpx.Client(timeout=httpx.Timeout(180, connect=30)) as client:
            while not self._stop.is_set():
                kind = self.kinds[int(rng.choice(len(self.kinds), p=self.probabilities))]
                started = time.monotonic()
                try:
                    response = kind.send(client, self.url)
                    status = str(response.status_code)
                    expected = response.status_code in kind.expected
                    if response.status_code == 200:
                        expected = expected and len(response.json()["results"]) >= 1
                except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError) as exc:
                    status = "closed" if kind.closed else f"exc:{type(exc).__name__}"
                    expected = kind.closed
                except httpx.HTTPError as exc:
                    status, expected = f"exc:{type(exc).__name__}", False
                finished = time.monotonic()
                with self._lock:
                    self.outcomes.append(Outcome(kind.name, status, finished - started, finished, expected))
