"""Commands issued in one turn of the event loop go to Redis together: one write, one connection.

Under load many requests reach their limiter call in the same turn. Sent one by one, each pays
the client's per-call machinery, a write and a wake-up of its own; sent as one pipeline (not a
transaction: every script is atomic by itself, and calls from different connections or nodes
have no order anyway), they share them. A lone call, as at concurrency 1, goes out one loop turn
later than it would have alone. Packing and parsing stay redis-py's and hiredis's; only the
grouping is here.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

MAX_BATCH = 128  # commands per write; more wait for the next turn

_Item = tuple[tuple[Any, ...], asyncio.Future[Any]]


class Pipeliner:
    """``await pipeliner.call(*args)``: one command's reply, or its error reply raised.

    A batch is bounded by ``timeout_s``, connect included (then its connection is dropped, not
    held); a timeout fails each of its commands with ``TimeoutError``, any other failure of the
    connection with ``ConnectionError`` (the original as its ``__cause__``).
    """

    def __init__(self, pool: ConnectionPool, timeout_s: float) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._queue: list[_Item] = []
        self._flushing: set[asyncio.Task[None]] = set()  # strong references until done
        self._scheduled = False
        self._closed = False

    def call(self, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._closed:
            fut.set_exception(ConnectionError("the Redis backend is closed"))
            return fut
        self._queue.append((args, fut))
        if not self._scheduled:
            self._schedule()
        return fut

    def _schedule(self) -> None:
        # The task's first step runs in the next turn, after everything that is ready in this
        # one has had its chance to queue a command.
        self._scheduled = True
        task = asyncio.get_running_loop().create_task(self._flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush(self) -> None:
        self._scheduled = False
        batch = [item for item in self._queue[:MAX_BATCH] if not item[1].done()]
        del self._queue[:MAX_BATCH]
        if self._queue:
            self._schedule()
        if not batch:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._send(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            # A fresh exception per caller (each gets its own traceback), of the same kind.
            timed_out = isinstance(exc, TimeoutError | RedisTimeoutError)
            for _, fut in batch:
                if not fut.done():
                    err = (
                        TimeoutError(f"no reply from Redis within {self._timeout_s:g} s")
                        if timed_out
                        else ConnectionError(f"{type(exc).__name__}: {exc}")
                    )
                    err.__cause__ = exc
                    fut.set_exception(err)
        except Exception as exc:  # a bug, not an outage: each caller sees it as it is
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        finally:
            for _, fut in batch:  # cancelled (shutdown) or interrupted: nobody waits forever
                if not fut.done():
                    fut.cancel()

    async def _send(self, batch: list[_Item]) -> None:
        conn = await self._pool.get_connection()
        try:
            # redis-py's own packer for the asyncio client is pure Python and was the largest
            # part of a call; hiredis packs the same bytes.
            packed = b"".join([hiredis.pack_command(args) for args, _ in batch])
            await conn.send_packed_command(packed, check_health=False)
            for _, fut in batch:
                try:
                    reply = await conn.read_response()
                except ResponseError as exc:  # one command's error reply; the rest still come
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                if not fut.done():
                    fut.set_result(reply)
        finally:
            # A connection that failed or timed out mid-batch was disconnected by redis-py, so
            # a late reply can never reach the next batch; the pool reconnects it when needed.
            await self._pool.release(conn)

    async def aclose(self) -> None:
        """Later calls fail at once; queued ones fail; batches under way are cancelled."""
        self._closed = True
        queued, self._queue = self._queue, []
        for _, fut in queued:
            if not fut.done():
                fut.set_exception(ConnectionError("the Redis backend is closed"))
        tasks = list(self._flushing)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
