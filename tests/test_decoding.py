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
from service.admission import DecodeBudget
from service.core.metrics import Metrics
from service.decoding import DecodePool
from tests.images import photo_jpeg

MAX_PIXELS = 100_000_000
MAX_SCANS = 64
MiB = 2**20


async def stalled_task(pool: DecodePool, budget: DecodeBudget) -> tuple["asyncio.Task[object]", int]:
    """A decode handed to the pool's one worker while that worker is stopped (SIGSTOP): the task
    stays in the worker's hands, whatever the machine's load, until the test acts on it."""
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    task = asyncio.create_task(pool.square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget))
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
        budget = DecodeBudget(1024 * MiB, Metrics())
        task, victim = await stalled_task(pool, budget)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ImageInputError) as refused:
            await task
        assert refused.value.status_code == 422
        assert "the decoder died (killed by SIGKILL)" in refused.value.detail
        assert budget.used == 0 and pool.in_progress == 0
        assert victim not in pool.pids and len(pool.pids) == 1
        square, _, _ = await pool.square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)
        assert square.shape == (256, 256, 3)

    with_pool(scenario)


def test_a_cancelled_decode_kills_its_worker_and_the_pool_serves_on() -> None:
    async def scenario(pool: DecodePool) -> None:
        budget = DecodeBudget(1024 * MiB, Metrics())
        task, victim = await stalled_task(pool, budget)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.used == 0 and pool.in_progress == 0
        assert victim not in pool.pids
        data = photo_jpeg()
        square, _, _ = await pool.square(data, 256, MAX_PIXELS, MAX_SCANS, budget)
        assert (square == decode_square(data, 256, MAX_PIXELS)[0]).all()  # the same pixels as in-process

    with_pool(scenario)


def test_refused_images_keep_their_worker() -> None:
    """Refused by the decoder (a truncated JPEG) or by the budget after the worker weighed it: the
    same worker decodes the next image, and nothing stays reserved."""

    async def scenario(pool: DecodePool) -> None:
        before = pool.pids
        budget = DecodeBudget(1024 * MiB, Metrics())
        with pytest.raises(ImageInputError) as refused:
            await pool.square(photo_jpeg()[:5000], 256, MAX_PIXELS, MAX_SCANS, budget)
        assert refused.value.status_code == 422, refused.value.detail
        tight = DecodeBudget(MiB, Metrics())  # a 640x427 photo weighs about 3 MiB
        with pytest.raises(ImageInputError) as refused:
            await pool.square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, tight)
        assert refused.value.status_code == 413 and "decode budget of 1 MiB" in refused.value.detail
        square, _, _ = await pool.square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)
        assert square.shape == (256, 256, 3)
        assert pool.pids == before and budget.used == tight.used == 0

    with_pool(scenario)
