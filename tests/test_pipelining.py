"""The Redis backend's pipelining: calls of one loop turn share a write, and nothing is mixed up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import hiredis
import pytest
import redis.asyncio as aioredis

from proxy.backends.base import UNLIMITED, Scope
from proxy.backends.pipelining import MAX_BATCH, Pipeliner
from proxy.backends.redis import RedisBackend, RedisSettings
from tests.servers import RedisServer

U = UNLIMITED


class Stats:
    """Redis's own counters, read over one connection of the test's (opened here, once)."""

    def __init__(self, server: RedisServer) -> None:
        self._client = server.client()
        self._client.ping()

    def connections(self) -> int:
        return int(self._client.info("stats")["total_connections_received"])

    def evalsha_calls(self) -> int:
        return int(self._client.info("commandstats")["cmdstat_evalsha"]["calls"])

    def close(self) -> None:
        self._client.close()


@pytest.fixture
async def pool(redis_server: RedisServer) -> AsyncIterator[aioredis.ConnectionPool]:
    client = aioredis.Redis.from_url(redis_server.url, protocol=2)  # as the backend has it
    yield client.connection_pool
    await client.aclose()


@pytest.mark.redis
async def test_replies_reach_their_own_callers_across_batches(pool) -> None:
    p = Pipeliner(pool, timeout_s=5)
    n = MAX_BATCH * 2 + 7  # three writes' worth, issued in one turn
    replies = await asyncio.gather(*(p.call("ECHO", f"m{i}") for i in range(n)))
    assert replies == [f"m{i}".encode() for i in range(n)]


@pytest.mark.redis
async def test_calls_of_one_turn_share_one_connection(redis_server, pool) -> None:
    p = Pipeliner(pool, timeout_s=5)
    stats = Stats(redis_server)
    before = stats.connections()
    await asyncio.gather(*(p.call("PING") for _ in range(50)))
    assert stats.connections() - before == 1
    # Calls of later turns reuse it.
    for _ in range(5):
        await p.call("PING")
    assert stats.connections() - before == 1
    stats.close()


@pytest.mark.redis
async def test_an_error_reply_fails_only_its_own_command(pool) -> None:
    p = Pipeliner(pool, timeout_s=5)
    calls = [p.call("ECHO", "a"), p.call("NOSUCHCOMMAND"), p.call("ECHO", "b")]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], aioredis.ResponseError)
    assert await p.call("ECHO", "c") == b"c"  # the connection is still in step


@pytest.mark.redis
async def test_a_call_given_up_before_its_turn_is_not_sent(redis_server, pool) -> None:
    key = f"pipelining-{time.monotonic_ns()}"
    p = Pipeliner(pool, timeout_s=5)
    first, second, third = (p.call("INCR", key) for _ in range(3))
    second.cancel()
    assert await asyncio.gather(first, third) == [1, 2]
    with redis_server.client() as c:
        assert int(c.get(key)) == 2


async def test_a_stalled_server_fails_the_batch_within_the_timeout() -> None:
    """A server that completes the connection handshake, then reads the batch and never
    answers it."""
    seen: list[bytes] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                seen.append(command[0].upper())
                if command[0].upper() != b"PING":
                    writer.write(b"+OK\r\n")  # CLIENT SETINFO and the like
        writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, protocol=2, socket_connect_timeout=1)
    try:
        p = Pipeliner(client.connection_pool, timeout_s=0.3)
        t0 = time.monotonic()
        results = await asyncio.gather(*(p.call("PING") for _ in range(3)), return_exceptions=True)
        assert time.monotonic() - t0 < 2
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert seen.count(b"PING") == 3  # the batch was written: it is its reply that never came
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.redis
async def test_a_reply_that_comes_after_the_timeout_never_reaches_a_later_call(pool) -> None:
    p = Pipeliner(pool, timeout_s=0.2)
    key = f"pipelining-empty-{time.monotonic_ns()}"
    with pytest.raises(TimeoutError):
        await p.call("BLPOP", key, "0.6")  # Redis answers nil after 0.6 s
    await asyncio.sleep(0.8)  # the late reply would be waiting on that connection by now
    assert await asyncio.gather(p.call("ECHO", "a"), p.call("ECHO", "b")) == [b"a", b"b"]


@pytest.mark.redis
async def test_a_caller_that_leaves_after_the_write_leaves_the_others_in_step(pool) -> None:
    p = Pipeliner(pool, timeout_s=5)
    key = f"pipelining-empty-{time.monotonic_ns()}"
    slow, after = p.call("BLPOP", key, "0.3"), p.call("ECHO", "b")
    await asyncio.sleep(0.1)  # the batch is written and waiting for BLPOP's reply
    slow.cancel()
    assert await after == b"b"
    assert await p.call("ECHO", "c") == b"c"


@pytest.mark.redis
async def test_after_close_calls_fail_at_once(pool) -> None:
    p = Pipeliner(pool, timeout_s=5)
    queued = p.call("ECHO", "never sent")
    await p.aclose()
    with pytest.raises(ConnectionError):
        await queued
    with pytest.raises(ConnectionError):
        await p.call("ECHO", "x")


@pytest.mark.redis
async def test_concurrent_reservations_go_out_together_and_stay_exact(redis_server) -> None:
    """Through the backend: 200 concurrent reservations against a limit of 120 admit exactly
    120, over at most two connections (one call at a time per connection would have needed
    about 200), with one script call per reservation."""
    backend = RedisBackend.from_settings(RedisSettings(url=redis_server.url, timeout_ms=5_000))
    try:
        scope = Scope(f"pipelined-{time.monotonic_ns()}", "k", (120, U, U), 60_000)
        assert (await backend.reserve([scope], (1, 0, 0), "warm")).admitted  # loads the script
        stats = Stats(redis_server)
        conns, calls = stats.connections(), stats.evalsha_calls()
        decisions = await asyncio.gather(
            *(backend.reserve([scope], (1, 0, 0), f"r{i}") for i in range(200))
        )
        assert sum(d.admitted for d in decisions) == 119
        assert stats.connections() - conns <= 2
        assert stats.evalsha_calls() - calls == 200
        stats.close()
        used = sorted(d.states[0].used[0] for d in decisions if d.admitted)
        assert used == list(range(2, 121))  # each admitted call saw its own place in line
    finally:
        await backend.aclose()
