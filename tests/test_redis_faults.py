"""Redis killed, restarted empty, or frozen under real proxy processes: each outage policy holds.

Per policy: fail_closed answers 503 ``rate_limiter_unavailable``, fail_open admits and counts
nothing, local enforces the limits divided by ``local_node_count``. No request waits past its
timeout, the node never crashes, each transition is logged once, and shared limiting resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import pytest

from proxy.backends.redis import _Script
from tests.procs import Proc, start_mock
from tests.servers import RedisServer
from tests.test_distributed import (
    Result,
    key_entry,
    new_client,
    new_key,
    proxy_config,
    redis_used,
    running_nodes,
    send,
    statuses,
)

pytestmark = pytest.mark.redis

# Long enough that a loaded test machine never looks like an outage, short enough to freeze past.
TIMEOUT_MS = 1_000
# A correctness bound, not a speed assertion: "no request hangs", with room for a slow machine.
WALL_BOUND_S = TIMEOUT_MS / 1000 + 3.0
RECOVERY_BOUND_S = 30.0  # the probe's backoff tops out at 5 s; this only guards against never
LIMIT, NODES = 10, 2
DOWN = "applying outage policy"  # the one line logged when a node enters an outage
UP = "shared limits restored"  # ... and when it leaves it
PREFIX = "faults"
POLICIES = ["fail_closed", "fail_open", "local"]


@pytest.fixture(scope="module")
def mock() -> Iterator[Proc]:
    proc = start_mock()
    yield proc
    proc.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own: the test kills, restarts and freezes it."""
    with RedisServer() as server:
        yield server


def fault_config(server: RedisServer, upstream: str, policy: str, keys: list[dict]) -> dict:
    backend = {
        "type": "redis",
        "url": server.url,
        "timeout_ms": TIMEOUT_MS,
        "outage_policy": policy,
        "local_node_count": NODES,
        "key_prefix": PREFIX,
    }
    return proxy_config(backend, upstream, keys)


async def wait_for_lines(nodes: Sequence[Proc], text: str, count: int = 1) -> None:
    """Until every node has logged ``text`` ``count`` times (bounded)."""
    deadline = time.monotonic() + RECOVERY_BOUND_S
    while not all(n.output().count(text) >= count for n in nodes):
        assert time.monotonic() < deadline, [n.output()[-2000:] for n in nodes]
        await asyncio.sleep(0.05)


async def assert_alive(nodes: Sequence[Proc]) -> None:
    async with new_client() as client:
        for n in nodes:
            assert n.popen.poll() is None, n.output()[-2000:]
            assert (await client.get(n.url + "/healthz")).status_code == 200


def assert_limiter_unavailable(r: Result) -> None:
    assert r.status == 503
    err = r.body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "rate_limiter_unavailable" and err["param"] is None


def assert_bounded(results: Sequence[Result]) -> None:
    slowest = max(r.seconds for r in results)
    assert slowest <= WALL_BOUND_S, f"a request took {slowest:.2f}s"


def assert_outage_behaviour(policy: str, results: Sequence[Result], per_node: int) -> None:
    """``results``: ``per_node`` requests of a fresh key sent to each node during the outage."""
    assert_bounded(results)
    if policy == "fail_closed":
        for r in results:
            assert_limiter_unavailable(r)
    elif policy == "fail_open":  # far over the limit, all admitted
        assert statuses(results) == {200: len(results)}
    else:  # local: each node enforces LIMIT / NODES on its own
        for node in range(NODES):
            mine = [r.status for r in results if r.node == node]
            share = LIMIT // NODES
            assert mine == [200] * share + [429] * (per_node - share), (node, mine)


def assert_logged_once(nodes: Sequence[Proc]) -> None:
    """Each transition is one line, however many requests met the outage."""
    for n in nodes:
        out = n.output()
        assert (out.count(DOWN), out.count(UP)) == (1, 1), out[-3000:]


@contextlib.asynccontextmanager
async def background_traffic(urls: Sequence[str], secret: str) -> AsyncIterator[list[Result]]:
    """A few clients sending requests to every node until the block ends."""
    results: list[Result] = []
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        async with new_client() as client:
            n = i
            while not stop.is_set():
                node = n % len(urls)
                results.append(await send(client, urls[node], secret, node))
                n += 1
                await asyncio.sleep(0.02)  # steady traffic, not a busy loop of instant 503s

    tasks = [asyncio.create_task(worker(i)) for i in range(4)]
    try:
        yield results
    finally:
        stop.set()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)


async def sequential(urls: Sequence[str], secret: str, per_node: int) -> list[Result]:
    out = []
    async with new_client() as client:
        for node, url in enumerate(urls):
            for _ in range(per_node):
                out.append(await send(client, url, secret, node))
    return out


@pytest.mark.parametrize("policy", POLICIES)
async def test_redis_killed_during_traffic_and_restarted(own_redis, mock, tmp_path, policy):
    name, secret = new_key()
    bg_name, bg_secret = new_key()
    keys = [key_entry(name, secret, rpm=LIMIT), key_entry(bg_name, bg_secret, rpm=100_000)]
    cfg = fault_config(own_redis, mock.url, policy, keys)
    reserve_sha = _Script("reserve").sha
    with running_nodes(cfg, tmp_path, [None] * NODES) as nodes:
        urls = [n.url for n in nodes]
        assert statuses(await sequential(urls, secret, 2)) == {200: 4}  # shared and working

        with own_redis.client() as admin:
            run_id = admin.info("server")["run_id"]
        async with background_traffic(urls, bg_secret) as traffic:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(own_redis.kill)
            await wait_for_lines(nodes, DOWN)  # the traffic has met the outage on every node

            per_node = 8
            outage = await sequential(urls, secret, per_node)
            assert_outage_behaviour(policy, outage, per_node)
            await assert_alive(nodes)

            await asyncio.to_thread(own_redis.start)  # same port, no data, no scripts
            with own_redis.client() as admin:  # a new process: nothing of the old one survived
                assert admin.info("server")["run_id"] != run_id
            await wait_for_lines(nodes, UP)  # the background probe found it
            await asyncio.sleep(0.5)  # some traffic on the recovered store

        assert_bounded(traffic)
        allowed = {"fail_closed": {200, 503}, "fail_open": {200}, "local": {200}}[policy]
        assert set(statuses(traffic)) <= allowed, statuses(traffic)
        if policy == "fail_closed":  # the traffic did run into the outage
            assert 503 in statuses(traffic)

        # Shared limiting is back: the key gets exactly its limit over both nodes again.
        after = await sequential(urls, secret, LIMIT)
        assert statuses(after) == {200: LIMIT, 429: len(after) - LIMIT}
        assert_bounded(after)
        with own_redis.client() as admin:
            assert admin.script_exists(reserve_sha) == [True]  # loaded again by the nodes
            assert redis_used(admin, PREFIX, name)[0] == LIMIT
        await assert_alive(nodes)
        assert_logged_once(nodes)


@pytest.mark.parametrize("policy", POLICIES)
async def test_redis_frozen_longer_than_the_timeout(own_redis, mock, tmp_path, policy):
    """SIGSTOP: the port stays open and nothing answers; the timeout must cut every call."""
    name, secret = new_key()
    cfg = fault_config(own_redis, mock.url, policy, [key_entry(name, secret, rpm=LIMIT)])
    with running_nodes(cfg, tmp_path, [None]) as nodes:
        urls = [nodes[0].url]
        assert statuses(await sequential(urls, secret, 3)) == {200: 3}

        own_redis.pause()
        try:
            frozen_at = time.monotonic()
            per_node = 8
            outage = await sequential(urls, secret, per_node)
            if policy == "local":  # one node here: still LIMIT / local_node_count
                share = LIMIT // NODES
                assert [r.status for r in outage] == [200] * share + [429] * (per_node - share)
                assert_bounded(outage)
            else:
                assert_outage_behaviour(policy, outage, per_node)
            await assert_alive(nodes)
            # Stay frozen well past the timeout, so the probe's pings time out too.
            await asyncio.sleep(max(0.0, frozen_at + 2.5 * TIMEOUT_MS / 1000 - time.monotonic()))
        finally:
            own_redis.resume()
        await wait_for_lines(nodes, UP)

        with own_redis.client() as admin:
            used = redis_used(admin, PREFIX, name)[0]
        # Nothing admitted during the outage is counted in Redis, except that the one call that
        # timed out when Redis froze sat in its socket and ran when it resumed.
        assert 3 <= used <= 4, used
        after = await sequential(urls, secret, LIMIT)
        assert statuses(after) == {200: LIMIT - used, 429: used}  # limited again, exactly
        await assert_alive(nodes)
        assert_logged_once(nodes)
