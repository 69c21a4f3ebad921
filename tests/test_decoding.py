"""The decode workers (``service.decoding.DecodePool``): real worker processes, real images.

The HTTP tests (``test_admission``) cover the time cap and the kill of a timed-out request's
decodes through the server; these cover what a client cannot provoke on purpose: a worker that
dies mid-decode, a cancelled decode, and a refusal that must not cost the worker its life."""

import asyncio
import concurrent.futures
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from alexnet_core.images import ImageInputError
from alexnet_core.pipeline import decode_square
from service.admission import DecodeBudget
from service.core.metrics import Metrics
from service.decoding import DecodedSquare, DecodePool
from tests.images import photo_jpeg
from tests.processes import alive

MAX_PIXELS = 100_000_000
MAX_SCANS = 64
MiB = 2**20
T = TypeVar("T")


async def stalled_task(pool: DecodePool, budget: DecodeBudget) -> tuple["asyncio.Task[DecodedSquare]", int]:
    """A decode handed to the pool's one worker while that worker is stopped (SIGSTOP): the task
    stays in the worker's hands, whatever the machine's load, until the test acts on it."""
    (pid,) = pool.pids
    os.kill(pid, signal.SIGSTOP)
    task = asyncio.create_task(pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if pool.in_progress == 1:
            break
    await asyncio.sleep(0.1)  # the upload is in the worker's socket
    assert not task.done()
    return task, pid


def with_pool(
    scenario: Callable[[DecodePool], Awaitable[None]], workers: int = 1, timeout_s: float = 60
) -> None:
    """Run ``scenario`` against a started pool (one worker unless told), stopped afterwards."""

    async def run() -> None:
        pool = DecodePool(workers, timeout_s, Metrics())
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
        square = (await pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)).pixels
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
        square = (await pool.decode_square(data, 256, MAX_PIXELS, MAX_SCANS, budget)).pixels
        assert (square == decode_square(data, 256, MAX_PIXELS)[0]).all()  # the same pixels as in-process

    with_pool(scenario)


def test_refused_images_keep_their_worker() -> None:
    """Refused by the decoder (a truncated JPEG) or by the budget after the worker weighed it: the
    same worker decodes the next image, and nothing stays reserved."""

    async def scenario(pool: DecodePool) -> None:
        before = pool.pids
        budget = DecodeBudget(1024 * MiB, Metrics())
        with pytest.raises(ImageInputError) as refused:
            await pool.decode_square(photo_jpeg()[:5000], 256, MAX_PIXELS, MAX_SCANS, budget)
        assert refused.value.status_code == 422, refused.value.detail
        tight = DecodeBudget(MiB, Metrics())  # a 640x427 photo weighs about 3 MiB
        with pytest.raises(ImageInputError) as refused:
            await pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, tight)
        assert refused.value.status_code == 413 and "decode budget of 1 MiB" in refused.value.detail
        square = (await pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)).pixels
        assert square.shape == (256, 256, 3)
        assert pool.pids == before and budget.used == tight.used == 0

    with_pool(scenario)


def live_gauge(pool: DecodePool) -> float | None:
    return pool.metrics.registry.get_sample_value("alexnet_decode_workers_live")


async def assert_whole(pool: DecodePool, size: int, budget: DecodeBudget) -> None:
    """The pool after a fault: nothing held, every worker alive, as many as it should have, and
    each of them decodes."""
    assert budget.used == 0 and pool.in_progress == 0
    for _ in range(size):  # one after the other: each takes the worker idle the longest
        square = (await pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)).pixels
        assert square.shape == (256, 256, 3)
    assert len(pool.pids) == size and all(alive(pid) for pid in pool.pids), pool.pids
    assert live_gauge(pool) == size


def wait_dead(pid: int) -> None:
    for _ in range(500):
        if not alive(pid):
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"worker {pid} still alive")


def test_idle_workers_killed_are_replaced_and_the_image_decoded_by_a_live_one() -> None:
    """Idle workers SIGKILLed (the OOM killer's way): the next image is not refused for a death it
    had no part in; it is decoded by a live worker, and the pool is back at full size."""

    async def scenario(pool: DecodePool) -> None:
        budget = DecodeBudget(1024 * MiB, Metrics())
        victims = pool.pids
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        for pid in victims:
            wait_dead(pid)
        square = (await pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget)).pixels
        assert square.shape == (256, 256, 3)
        assert not victims & pool.pids
        await assert_whole(pool, 3, budget)

    with_pool(scenario, workers=3)


class StopsTheWorkerOnReserve(DecodeBudget):
    """A budget that, as the worker is told to go on, stops it (SIGSTOP): the decode then stays
    in its hands until the test acts."""

    def __init__(self, pool: DecodePool) -> None:
        super().__init__(1024 * MiB, Metrics())
        self.pool = pool

    def reserve(self, amount: int) -> None:
        super().reserve(amount)
        for pid in self.pool.pids:
            os.kill(pid, signal.SIGSTOP)


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The event loop's default executor, one thread, counting what it is given."""

    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


async def reach(state: str, pool: DecodePool, budget: DecodeBudget) -> "asyncio.Task[object]":
    """A decode brought to ``state`` with real workers and held there."""
    if state == "weighing":  # the image in the worker's socket, the worker stopped
        return (await stalled_task(pool, budget))[0]
    (pid,) = pool.pids
    if state == "waiting-for-a-worker":  # the one worker busy with another image
        await stalled_task(pool, budget)
        task = asyncio.create_task(pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, budget))
    elif state == "sending":  # more than the socket's buffers hold, to a stopped worker
        os.kill(pid, signal.SIGSTOP)
        data = photo_jpeg() + bytes(16 * MiB)  # trailing bytes: still a valid JPEG
        task = asyncio.create_task(pool.decode_square(data, 256, MAX_PIXELS, MAX_SCANS, budget))
    elif state == "decoding":  # weighed, reserved, told to go, then stopped
        stopping = StopsTheWorkerOnReserve(pool)
        task = asyncio.create_task(pool.decode_square(photo_jpeg(), 256, MAX_PIXELS, MAX_SCANS, stopping))
    else:  # "describing-a-dead-worker": killed mid-decode, its exit status being read in a thread
        executor = CountingExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        release = threading.Event()
        executor.submit(release.wait)  # the executor's one thread busy: the description waits
        task, _ = await stalled_task(pool, budget)
        os.kill(pid, signal.SIGKILL)
        for _ in range(500):
            if executor.submitted == 2:
                break
            await asyncio.sleep(0.01)
        assert executor.submitted == 2, "the dead worker's exit status was not asked for"
        asyncio.get_running_loop().call_later(0.2, release.set)
        return task
    await asyncio.sleep(0.3)
    assert not task.done()
    return task


@pytest.mark.parametrize(
    "state", ["waiting-for-a-worker", "sending", "weighing", "decoding", "describing-a-dead-worker"]
)
def test_a_decode_cancelled_at_any_step_leaves_the_pool_whole(state: str) -> None:
    """Cancellation (a request that timed out, a client gone) at each await of ``square``: the
    task ends cancelled, nothing stays reserved, a worker whose task was cut off is replaced, and
    the pool serves at full size."""

    async def scenario(pool: DecodePool) -> None:
        budget = DecodeBudget(1024 * MiB, Metrics())
        task = await reach(state, pool, budget)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for pid in pool.pids:  # a worker left stopped (the one the other image waited for)
            os.kill(pid, signal.SIGCONT)
        for _ in range(500):  # the other image of "waiting-for-a-worker" done
            if pool.in_progress == 0:
                break
            await asyncio.sleep(0.01)
        await assert_whole(pool, 1, budget)

    with_pool(scenario)


def test_an_image_that_waits_for_a_core_past_the_cap_is_not_refused() -> None:
    """The time cap counts the worker's work on the image, not the time the image waited: a worker
    that cannot run (stopped, as a worker on a saturated host waits for a core) while the wall
    clock passes the cap still decodes the image once it runs."""

    async def scenario(pool: DecodePool) -> None:
        budget = DecodeBudget(1024 * MiB, Metrics())
        task, pid = await stalled_task(pool, budget)
        await asyncio.sleep(3 * pool.timeout_s)
        assert not task.done(), task
        os.kill(pid, signal.SIGCONT)
        square = (await task).pixels
        assert square.shape == (256, 256, 3) and pid in pool.pids

    with_pool(scenario, timeout_s=0.5)
