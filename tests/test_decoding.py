"""The decode workers (``service.decoding.DecodePool``): real worker processes, real images.

The HTTP tests (``test_admission``) cover the time cap and the kill of a timed-out request's
decodes through the server; these cover what a client cannot provoke on purpose: a worker that
dies mid-decode, a cancelled decode, and a refusal that must not cost the worker its life."""

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import pytest

from alexnet_core.images import ImageInputError
from alexnet_core.pipeline import decode_square
from service.core.metrics import Metrics
from service.decoding import DecodePool
from tests.images import photo_jpeg

MAX_PIXELS = 100_000_000


async def stalled_task(pool: DecodePool, finished: list[bool]) -> tuple["asyncio.Task[object]", int]:
    """A decode handed to the pool's one worker while that worker is stopped (SIGSTOP): the task
    stays in the worker's hands, whatever the machine's load, until the test acts on it."""
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    task = asyncio.create_task(pool.square(photo_jpeg(), 256, MAX_PIXELS, lambda: finished.append(True)))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if pool.in_progress == 1:
            break
    await asyncio.sleep(0.1)  # the upload is in the worker's socket
    assert not task.done()
    return task, pid


def with_pool(scenario: Callable[[DecodePool], Awaitable[None]]) -> None:
    """Run ``scenario`` against a started pool of one worker, stopped afterwards."""

    async def run() -> None:
        pool = DecodePool(1, 60, Metrics())
        await pool.warm_up()
        try:
            await scenario(pool)
        finally:
            pool.stop()

    asyncio.run(asyncio.wait_for(run(), 120))


def test_a_worker_that_dies_mid_decode_is_a_422_and_is_replaced() -> None:
    async def scenario(pool: DecodePool) -> None:
        finished: list[bool] = []
        task, victim = await stalled_task(pool, finished)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ImageInputError) as refused:
            await task
        assert refused.value.status_code == 422
        assert "the decoder died (killed by SIGKILL)" in refused.value.detail
        assert finished == [True] and pool.in_progress == 0
        assert victim not in pool.pids and len(pool.pids) == 1
        square, _, _ = await pool.square(photo_jpeg(), 256, MAX_PIXELS, lambda: None)
        assert square.shape == (256, 256, 3)

    with_pool(scenario)


def test_a_cancelled_decode_kills_its_worker_and_the_pool_serves_on() -> None:
    async def scenario(pool: DecodePool) -> None:
        finished: list[bool] = []
        task, victim = await stalled_task(pool, finished)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [True] and pool.in_progress == 0
        assert victim not in pool.pids
        data = photo_jpeg()
        square, _, _ = await pool.square(data, 256, MAX_PIXELS, lambda: None)
        assert (square == decode_square(data, 256, MAX_PIXELS)[0]).all()  # the same pixels as in-process

    with_pool(scenario)


def test_a_refused_image_keeps_its_worker() -> None:
    async def scenario(pool: DecodePool) -> None:
        before = pool.pids
        with pytest.raises(ImageInputError) as refused:
            await pool.square(photo_jpeg()[:5000], 256, MAX_PIXELS, lambda: None)
        assert refused.value.status_code == 422, refused.value.detail
        assert pool.pids == before

    with_pool(scenario)
