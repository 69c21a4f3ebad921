"""Counts that hold for the whole server: images admitted, images decoding, decode memory and
upload memory, each checked against one limit however many processes add to it.

A server of one process keeps them in its own memory. A server of several (``alexnet-serve``'s
front processes and engine) keeps them in one shared array, one row per process, so that a
process that dies takes nothing with it: the supervisor clears its row when it replaces it.
A check and its addition happen under the array's lock (a futex while uncontended)."""

import multiprocessing
import threading
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Protocol

IMAGES, DECODING, DECODE_BYTES, UPLOAD_BYTES = range(4)
FIELDS = 4


class Tally(Protocol):
    """One count of the server: ``own`` is this process's share, ``total`` the server's."""

    @property
    def own(self) -> int: ...

    @property
    def total(self) -> int: ...

    def try_add(self, amount: int, limit: int) -> bool: ...  # False, and nothing added, past limit

    def add(self, amount: int) -> None: ...


class LocalTally:
    """A count kept by one process (the whole server when it runs in one process)."""

    def __init__(self) -> None:
        self._value = 0
        self._lock = threading.Lock()

    @property
    def own(self) -> int:
        return self._value

    total = own

    def try_add(self, amount: int, limit: int) -> bool:
        with self._lock:
            if self._value + amount > limit:
                return False
            self._value += amount
            return True

    def add(self, amount: int) -> None:
        with self._lock:
            self._value += amount


class SharedTallies:
    """The server's counts in shared memory: ``rows`` processes, ``FIELDS`` counts each. Made by
    the supervisor before it starts the processes, which receive it as an argument."""

    def __init__(self, rows: int, context: multiprocessing.context.BaseContext) -> None:
        self.rows = rows
        self.array: SynchronizedArray[int] = context.Array("q", rows * FIELDS)  # type: ignore[assignment]

    def tally(self, row: int, field: int) -> "SharedTally":
        return SharedTally(self, row, field)

    def clear_row(self, row: int) -> None:
        """Forget what a process that ended still held."""
        with self.array.get_lock():
            for field in range(FIELDS):
                self.array[row * FIELDS + field] = 0


class SharedTally:
    def __init__(self, tallies: SharedTallies, row: int, field: int) -> None:
        self.array = tallies.array
        self.rows = tallies.rows
        self.field = field
        self.index = row * FIELDS + field
        # Unlocked reads of one aligned int64 are atomic on every platform the server runs on.
        self._raw = self.array.get_obj()

    @property
    def own(self) -> int:
        return self._raw[self.index]

    @property
    def total(self) -> int:
        raw, field = self._raw, self.field
        return sum(raw[row * FIELDS + field] for row in range(self.rows))

    def try_add(self, amount: int, limit: int) -> bool:
        with self.array.get_lock():
            if self.total + amount > limit:
                return False
            self._raw[self.index] += amount
            return True

    def add(self, amount: int) -> None:
        with self.array.get_lock():
            self._raw[self.index] += amount
