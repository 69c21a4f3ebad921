"""Host-side cost of /predict with a free engine: a raw-socket loopback client (cheap, so that it
steals little of the CPU it measures) posts one image at a given concurrency; the server's CPU time
(all threads and child processes, from /proc) per image is compared with the same preprocessing
in-process. Used to profile and choose the decode design (see the admission notes).

    python -m benchmarks.host_load --image small.jpg --concurrency 16 --seconds 10 [--cpus 0]
"""

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

from alexnet_core.pipeline import preprocess
from benchmarks.server import server_process


def descendants(pid: int) -> list[int]:
    """The process and all processes below it (decode workers are children of a fork server)."""
    found, stack = [], [pid]
    while stack:
        found.append(current := stack.pop())
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    stack += [
                        int(p) for p in Path(f"/proc/{current}/task/{task}/children").read_text().split()
                    ]
    return found


def usage(pid: int) -> tuple[float, float, int]:
    """(user, system) CPU seconds and minor page faults of a process (all its threads), of its
    reaped children and of its live descendants (decode workers), which any of its threads started."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    faults = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults += int(fields[7]) + int(fields[8])  # minflt cminflt
        user += (int(fields[11]) + int(fields[13])) / tick  # utime cutime
        system += (int(fields[12]) + int(fields[14])) / tick  # stime cstime
    return user, system, faults


def cpu_seconds(pid: int) -> float:
    user, system, _ = usage(pid)
    return user + system


def in_process(data: bytes, seconds: float) -> float:
    """CPU seconds per image of the preprocessing alone, in this thread (user + system)."""
    kwargs = dict(resize=256, crop=224, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    for _ in range(5):
        preprocess(data, max_pixels=64_000_000, **kwargs)
    n, started, wall = 0, time.process_time(), time.monotonic()
    while time.monotonic() - wall < seconds:
        preprocess(data, max_pixels=64_000_000, **kwargs)
        n += 1
    return (time.process_time() - started) / n


def request_bytes(data: bytes, port: int) -> bytes:
    boundary = b"b0undary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
    )
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary.decode()}\r\n\r\n"
    ).encode()
    return head + body


async def one_client(port: int, payload: bytes, stop: float, counts: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.monotonic() < stop:
        writer.write(payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length")
        )
        await reader.readexactly(length)
        counts[status] = counts.get(status, 0) + 1
    writer.close()


async def load(port: int, payload: bytes, concurrency: int, seconds: float) -> dict[int, int]:
    counts: dict[int, int] = {}
    stop = time.monotonic() + seconds
    await asyncio.gather(*(one_client(port, payload, stop, counts) for _ in range(concurrency)))
    return counts


def measure(pid: int, port: int, data: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    payload = request_bytes(data, port)
    asyncio.run(load(port, payload, concurrency, 1.0))  # warm-up
    before, wall = usage(pid), time.monotonic()
    counts = asyncio.run(load(port, payload, concurrency, seconds))
    after, wall = usage(pid), time.monotonic() - wall
    user, system, faults = (b - a for a, b in zip(before, after, strict=True))
    ok = max(counts.get(200, 0), 1)
    return {
        "images_s": ok / wall,
        "server_cpu_ms": 1000 * (user + system) / ok,
        "server_sys_ms": 1000 * system / ok,
        "page_faults": faults / ok,
        "statuses": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--cpus", help="taskset list for the server, e.g. 0 or 0,1")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process baseline")
    args = parser.parse_args()
    from tests.free_model import write_free_model

    data = args.image.read_bytes()
    with tempfile.TemporaryDirectory() as weights:
        write_free_model(Path(weights) / "free.onnx")
        pairs = dict(item.split("=", 1) for item in args.env)
        settings = {k: v for k, v in pairs.items() if k.startswith("ALEXNET_")}
        settings["ALEXNET_WEIGHTS_DIR"] = weights
        env = {k: v for k, v in pairs.items() if not k.startswith("ALEXNET_")}
        cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
        with server_process(settings, cpus=cpus, env=env, wait_for="/health") as server:
            result = measure(server.proc.pid, server.port, data, args.concurrency, args.seconds)
    if not args.no_in_process:
        result["in_process_cpu_ms"] = 1000 * in_process(data, min(args.seconds, 5))
        result["efficiency"] = result["in_process_cpu_ms"] / result["server_cpu_ms"]
    print(json.dumps({"concurrency": args.concurrency, "cpus": args.cpus, "env": args.env, **result}))


if __name__ == "__main__":
    main()
