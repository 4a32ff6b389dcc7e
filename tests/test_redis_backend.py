"""What only the Redis backend has: scripts, keys, TTLs, slots, server clock, faults, forms."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from proxy.backends.base import UNLIMITED, BackendUnavailable, Scope, ScopeState
from proxy.backends.redis import (
    TTL_MARGIN_MS,
    RedisBackend,
    RedisSettings,
    scope_keys,
    slot_tag,
)
from tests.servers import RedisCluster, RedisServer, free_port

pytestmark = pytest.mark.redis

U = UNLIMITED
WINDOW = 60_000


def new_tag() -> str:
    return f"key-{uuid.uuid4().hex[:12]}"


class Clock:
    def __init__(self) -> None:
        self.now = 5_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def single(redis_server: RedisServer) -> AsyncIterator[RedisBackend]:
    backend = RedisBackend.from_settings(RedisSettings(url=redis_server.url, timeout_ms=5_000))
    yield backend
    await backend.aclose()


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that restart or stop it."""
    with RedisServer() as server:
        yield server


def test_settings_validation():
    with pytest.raises(ValueError):
        RedisSettings(url="redis://x", key_prefix="a{b}")
    with pytest.raises(ValueError):
        RedisSettings(url="redis://x", sentinels=(("h", 1),))
    with pytest.raises(ValueError):
        RedisSettings(url="redis://x", timeout_ms=0)


def test_slot_tag_is_safe_and_stable():
    assert slot_tag("team-a") == slot_tag("team-a") != slot_tag("team-b")
    weird = slot_tag("a}{b:c d")
    assert len(weird) == 16 and all(ch in "0123456789abcdef" for ch in weird)
    z, c, u = scope_keys("rl", Scope("a}{b", "m:gpt-{4o}", (1, 1, 1), 1000))
    assert z == f"rl:{{{slot_tag('a}{b')}}}:m:gpt-{{4o}}:z"
    assert {c[-2:], u[-2:]} == {":c", ":u"}


async def test_noscript_is_recovered_transparently(single: RedisBackend, redis_server):
    s = Scope(new_tag(), "k", (5, U, U), WINDOW)
    assert (await single.reserve([s], (1, 0, 0), "a")).admitted
    with redis_server.client() as c:
        c.script_flush()
        assert c.script_exists(single._reserve.sha) == [False]
    d = await single.reserve([s], (1, 0, 0), "b")
    assert d.admitted and d.states[0].used == (1 + 1, 0, 0)
    assert (await single.peek([s]))[0].used == (2, 0, 0)
    with redis_server.client() as c:
        assert c.script_exists(single._reserve.sha, single._peek.sha) == [True, True]


async def test_noscript_in_cluster(redis_cluster):
    backend = RedisBackend.from_settings(
        RedisSettings(url=redis_cluster.url, cluster=True, timeout_ms=5_000)
    )
    try:
        s = Scope(new_tag(), "k", (5, U, U), WINDOW)
        assert (await backend.reserve([s], (1, 0, 0), "a")).admitted
        for node in redis_cluster.nodes:
            with node.client() as c:
                c.script_flush()
        assert (await backend.reserve([s], (1, 0, 0), "b")).states[0].used == (2, 0, 0)
    finally:
        await backend.aclose()


async def test_server_restarted_empty(own_server: RedisServer):
    backend = RedisBackend.from_settings(RedisSettings(url=own_server.url, timeout_ms=5_000))
    s = Scope(new_tag(), "k", (2, U, U), WINDOW)
    try:
        assert (await backend.reserve([s], (1, 0, 0), "a")).admitted
        assert (await backend.reserve([s], (1, 0, 0), "b")).admitted
        assert not (await backend.reserve([s], (1, 0, 0), "c")).admitted
        own_server.restart()  # no persistence: all windows and scripts are gone
        # Let the loop read the old sockets' EOF (a busy proxy does so at once); the pool then
        # replaces those connections instead of failing the next call.
        await asyncio.sleep(0.05)
        d = await backend.reserve([s], (1, 0, 0), "d")
        assert d.admitted and d.states[0].used == (1, 0, 0)
    finally:
        await backend.aclose()


async def test_every_key_has_a_ttl_and_idle_scopes_vanish(redis_server: RedisServer):
    clock = Clock()
    backend = RedisBackend.from_settings(
        RedisSettings(url=redis_server.url, timeout_ms=5_000, key_prefix="ttl"), clock=clock
    )
    tags = [new_tag() for _ in range(3)]
    try:
        for n, tag in enumerate(tags):
            scopes = [Scope(tag, "k", (U, U, U), 1_000), Scope(tag, "m:a", (U, U, U), 2_000)]
            for i in range(4):
                d = await backend.reserve(scopes, (1, 10, 20), f"{n}-{i}")
                await backend.reconcile(d.reservation, (1, 10, 5))
            clock.now += 1_500  # the key scope's entries expire, the model's do not
            await backend.reconcile(d.reservation, (1, 10, 50))  # excess as a new entry
        with redis_server.client() as c:
            keys = list(c.scan_iter(match="ttl:*"))
            assert len(keys) == len(tags) * 6
            for key in keys:
                assert 0 < c.pttl(key) <= 2_000 + TTL_MARGIN_MS, key
        # every entry gone: a call that finds nothing alive leaves no key behind
        clock.now += 2_000
        for tag in tags:
            scopes = [Scope(tag, "k", (U, U, U), 1_000), Scope(tag, "m:a", (U, U, U), 2_000)]
            d = await backend.reserve(scopes, (1, 0, 0), "last")
            clock.now += 2_000
            await backend.reconcile(d.reservation, (0, 0, 0))  # nothing left, no excess
        with redis_server.client() as c:
            assert list(c.scan_iter(match="ttl:*")) == []
    finally:
        await backend.aclose()


async def test_peek_does_not_write(redis_server: RedisServer):
    clock = Clock()
    backend = RedisBackend.from_settings(
        RedisSettings(url=redis_server.url, timeout_ms=5_000), clock=clock
    )
    s = Scope(new_tag(), "k", (U, U, U), 1_000)
    try:
        await backend.reserve([s], (1, 2, 3), "old")
        clock.now += 600
        await backend.reserve([s], (1, 2, 3), "new")
        clock.now += 500  # "old" has expired
        z, c, u = scope_keys("rl", s)
        with redis_server.client() as r:
            before = (r.zrange(z, 0, -1), r.hgetall(c), r.hgetall(u))
        assert await backend.peek([s]) == (ScopeState((1, 2, 3), 500),)
        with redis_server.client() as r:
            assert (r.zrange(z, 0, -1), r.hgetall(c), r.hgetall(u)) == before
            assert before[0] == ["old", "new"]
    finally:
        await backend.aclose()


async def test_one_request_one_slot_and_keys_spread_over_the_cluster(redis_cluster):
    backend = RedisBackend.from_settings(
        RedisSettings(url=redis_cluster.url, cluster=True, timeout_ms=5_000)
    )
    rc = redis_cluster.client()
    try:
        slots = []
        for i in range(60):
            tag = f"team-{i}"
            scopes = [Scope(tag, "k", (U, U, U), WINDOW), Scope(tag, "m:gpt-4o", (U, U, U), WINDOW)]
            keys = [k for s in scopes for k in scope_keys("rl", s)]
            request_slots = {rc.keyslot(k) for k in keys}
            server_slots = {rc.cluster_keyslot(k) for k in keys}
            assert request_slots == server_slots and len(server_slots) == 1
            slots.append(server_slots.pop())
            assert (await backend.reserve(scopes, (1, 1, 1), f"r{i}")).admitted
        assert len(set(slots)) >= 55  # 60 tags over 16384 slots: a few collisions at most
        assert await backend.ping()
        for node in redis_cluster.nodes:
            with node.client() as c:
                assert c.dbsize() > 0  # every master holds some keys
        with pytest.raises(ValueError):  # one call must stay in one slot
            await backend.reserve(
                [Scope("a", "k", (U, U, U), WINDOW), Scope("b", "k", (U, U, U), WINDOW)],
                (1, 1, 1),
                "x",
            )
        # reset may span slots: the client splits it
        await backend.reset([Scope(f"team-{i}", "k", (U, U, U), WINDOW) for i in range(60)])
        peeked = await backend.peek([Scope("team-7", "k", (U, U, U), WINDOW)])
        assert peeked == (ScopeState((0, 0, 0), 0),)
    finally:
        rc.close()
        await backend.aclose()


async def test_password_in_url():
    with RedisServer(password="s3cret/?") as server:
        backend = RedisBackend.from_settings(RedisSettings(url=server.url, timeout_ms=5_000))
        wrong = RedisBackend.from_settings(
            RedisSettings(url=server.url.replace("s3cret", "wrong"), timeout_ms=5_000)
        )
        s = Scope(new_tag(), "k", (U, U, U), WINDOW)
        try:
            assert (await backend.reserve([s], (1, 0, 0), "a")).admitted
            with pytest.raises(BackendUnavailable):
                await wrong.reserve([s], (1, 0, 0), "b")
        finally:
            await backend.aclose()
            await wrong.aclose()


@pytest.mark.parametrize("form", ["single", "cluster"])
async def test_two_nodes_racing_admit_exactly_the_limit(request: pytest.FixtureRequest, form: str):
    if form == "single":
        settings = RedisSettings(url=request.getfixturevalue("redis_server").url, timeout_ms=10_000)
    else:
        url = request.getfixturevalue("redis_cluster").url
        settings = RedisSettings(url=url, cluster=True, timeout_ms=10_000)
    nodes = [RedisBackend.from_settings(settings) for _ in range(2)]
    tag = new_tag()
    scopes = [Scope(tag, "k", (50, U, U), WINDOW), Scope(tag, "m:a", (U, 1000, U), WINDOW)]
    try:
        decisions = await asyncio.gather(
            *(nodes[i % 2].reserve(scopes, (1, 7, 0), f"r{i}") for i in range(200))
        )
        assert sum(d.admitted for d in decisions) == 50
        for node in nodes:  # both see the same usage (reset_ms moves with the server's clock)
            assert [st.used for st in await node.peek(scopes)] == [(50, 350, 0)] * 2
    finally:
        for node in nodes:
            await node.aclose()


async def test_cluster_node_restart_under_load():
    """Calls during a node restart may fail (never hang); once it is back, all succeed."""
    with RedisCluster() as cluster:
        backend = RedisBackend.from_settings(
            RedisSettings(url=cluster.url, cluster=True, timeout_ms=2_000)
        )
        scopes = [[Scope(f"team-{i}", "k", (U, U, U), WINDOW)] for i in range(30)]

        async def burst(tag: str) -> list:
            calls = (backend.reserve(s, (1, 0, 0), f"{tag}-{i}") for i, s in enumerate(scopes))
            return await asyncio.gather(*calls, return_exceptions=True)

        try:
            assert all(d.admitted for d in await burst("before"))
            cluster.nodes[1].restart()  # same node id and slots (nodes.conf), no data
            async with asyncio.timeout(60):  # guards against a hang only
                during = await burst("during")
            assert all(isinstance(d, BackendUnavailable) or d.admitted for d in during)
            cluster.wait_ok()  # the restarted node says CLUSTERDOWN until it has met the others
            await asyncio.sleep(0.05)  # let the loop see the closed sockets
            after = await burst("after")
            assert all(not isinstance(d, BaseException) and d.admitted for d in after), after
        finally:
            await backend.aclose()


async def test_server_time_gives_one_window_whatever_the_client_clocks(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
):
    """Two proxies whose own clocks disagree by an hour still share the server's window."""
    settings = RedisSettings(url=redis_server.url, timeout_ms=5_000)
    a, b = RedisBackend.from_settings(settings), RedisBackend.from_settings(settings)
    s = Scope(new_tag(), "k", (1, U, U), WINDOW)
    real_time, real_time_ns = time.time, time.time_ns
    try:
        with redis_server.client() as c:
            sec, usec = c.time()
        server_before = sec * 1000 + usec // 1000
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() + 3600 * 10**9)
        first = await a.reserve([s], (1, 0, 0), "a")
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
        monkeypatch.setattr(time, "time_ns", lambda: real_time_ns() - 3600 * 10**9)
        second = await b.reserve([s], (1, 0, 0), "b")
        monkeypatch.undo()
        with redis_server.client() as c:
            sec, usec = c.time()
        server_after = sec * 1000 + usec // 1000
        assert first.admitted and not second.admitted
        assert server_before <= first.reservation.at_ms <= server_after
        # b sees a's entry in the same window: it waits for a's entry to leave
        elapsed = WINDOW - second.states[0].reset_ms
        assert 0 <= elapsed <= server_after - first.reservation.at_ms
        assert second.retry_after_ms == second.states[0].reset_ms
    finally:
        await a.aclose()
        await b.aclose()


async def test_sentinel_form(redis_sentinel):
    settings = RedisSettings(
        url=redis_sentinel.url,
        sentinels=redis_sentinel.sentinels,
        service_name=redis_sentinel.service_name,
        timeout_ms=5_000,
    )
    backend = RedisBackend.from_settings(settings)
    s = Scope(new_tag(), "k", (1, U, U), WINDOW)
    try:
        assert await backend.ping()
        assert (await backend.reserve([s], (1, 2, 3), "a")).admitted
        assert not (await backend.reserve([s], (1, 2, 3), "b")).admitted
        assert (await backend.peek([s]))[0].used == (1, 2, 3)
        with redis_sentinel.master.client() as c:
            assert c.exists(*scope_keys("rl", s)) == 3
    finally:
        await backend.aclose()


def _dead_settings(form: str, port: int) -> RedisSettings:
    url = f"redis://127.0.0.1:{port}/0"
    if form == "cluster":
        return RedisSettings(url=url, cluster=True, timeout_ms=300)
    if form == "sentinel":
        return RedisSettings(
            url=url, sentinels=(("127.0.0.1", port),), service_name="mymaster", timeout_ms=300
        )
    return RedisSettings(url=url, timeout_ms=300)


@pytest.mark.parametrize("form", ["single", "cluster", "sentinel"])
async def test_dead_port_raises_backend_unavailable(form: str):
    backend = RedisBackend.from_settings(_dead_settings(form, free_port()))
    s = Scope(new_tag(), "k", (1, U, U), WINDOW)
    try:
        async with asyncio.timeout(30):  # only guards against a hang; the real bound is 300 ms
            with pytest.raises(BackendUnavailable) as info:
                await backend.reserve([s], (1, 0, 0), "a")
            assert info.value.__cause__ is not None
            with pytest.raises(BackendUnavailable):
                await backend.peek([s])
            with pytest.raises(BackendUnavailable):
                await backend.reset([s])
            assert await backend.ping() is False
    finally:
        await backend.aclose()


async def test_stopped_server_times_out_then_recovers(own_server: RedisServer):
    backend = RedisBackend.from_settings(RedisSettings(url=own_server.url, timeout_ms=300))
    s = Scope(new_tag(), "k", (U, U, U), WINDOW)
    try:
        assert (await backend.reserve([s], (1, 0, 0), "a")).admitted
        own_server.pause()
        async with asyncio.timeout(30):  # only guards against a hang; the real bound is 300 ms
            for rid in ("b", "c"):
                with pytest.raises(BackendUnavailable) as info:
                    await backend.reserve([s], (1, 0, 0), rid)
                assert isinstance(info.value.__cause__, TimeoutError | redis.TimeoutError)
            assert await backend.ping() is False
        own_server.resume()
        # The timed-out calls may have run after SIGCONT; what counts is that Redis answers.
        d = await backend.reserve([s], (1, 0, 0), "d")
        assert d.admitted and d.states[0].used[0] >= 2
    finally:
        own_server.resume()
        await backend.aclose()
