"""Several real proxy processes sharing one Redis (single, cluster, sentinel) enforce one limit.

Every node is a ``python -m proxy serve`` process in front of one mock-upstream process; the
clients hammer one key through all nodes at once and the admitted total must equal the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.backends.base import Scope
from proxy.backends.redis import scope_keys
from proxy.limiter import scope_tag
from tests.procs import Proc, start_mock, start_proxy, write_config

SKEW_DIR = Path(__file__).resolve().parent / "skewclock"
HOUR_S = 3600
REQUEST_TIMEOUT_S = 20.0  # per request: a hang fails the test instead of blocking it
BURST_TIMEOUT_S = 120.0  # per burst, same purpose
CONCURRENCY = 32
MAX_TOKENS = 4  # the mock answers exactly this many tokens: no reconciliation changes a cost


@dataclass(frozen=True, slots=True)
class Result:
    node: int
    status: int
    seconds: float
    headers: httpx.Headers
    body: Any


# -- shared helpers (also used by test_redis_faults) ---------------------------------------------


def new_key() -> tuple[str, str]:
    """A key name unique to the test (a fresh window on the shared server) and its secret."""
    suffix = uuid.uuid4().hex[:10]
    return f"team-{suffix}", f"sk-{suffix}-0123456789"


def key_entry(name: str, secret: str, **limits: int) -> dict[str, Any]:
    return {"name": name, "key": secret, "limits": limits}


def proxy_config(
    backend: dict[str, Any],
    upstream_url: str,
    keys: Sequence[dict[str, Any]],
    *,
    window_s: float = 60,
) -> dict[str, Any]:
    return {
        "backend": backend,
        "upstreams": {"up": {"type": "http", "base_url": upstream_url + "/v1", "timeout_s": 10}},
        "default_upstream": "up",
        "window_s": window_s,
        "keys": list(keys),
    }


@contextlib.contextmanager
def running_nodes(
    cfg: dict[str, Any], directory: Path, envs: Sequence[dict[str, str] | None]
) -> Iterator[list[Proc]]:
    """One proxy process per entry of ``envs`` (its extra environment), stopped at the end."""
    path = write_config(cfg, directory)
    procs: list[Proc] = []
    try:
        for env in envs:
            procs.append(start_proxy(path, env=env))
        yield procs
    except BaseException:
        for i, p in enumerate(procs):  # shown by pytest with the failure
            lines = [ln for ln in p.output().splitlines() if not ln.startswith('{"time"')]
            print(f"--- node {i} ({p.url}), log without access lines:", *lines[-40:], sep="\n")
        raise
    finally:
        for p in procs:
            p.stop()


def chat_body(model: str = "m") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": MAX_TOKENS,
    }


async def send(
    client: httpx.AsyncClient, url: str, secret: str, node: int = 0, model: str = "m"
) -> Result:
    t0 = time.monotonic()
    r = await client.post(
        url + "/v1/chat/completions",
        json=chat_body(model),
        headers={"authorization": f"Bearer {secret}"},
    )
    seconds = time.monotonic() - t0
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
    return Result(node, r.status_code, seconds, r.headers, body)


def new_client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    return httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits)


async def hammer(urls: Sequence[str], secret: str, total: int, *, model: str = "m") -> list[Result]:
    """``total`` requests, round robin over the nodes, ``CONCURRENCY`` in flight at a time."""
    sem = asyncio.Semaphore(CONCURRENCY)
    async with new_client() as client:

        async def one(i: int) -> Result:
            async with sem:
                return await send(client, urls[i % len(urls)], secret, i % len(urls), model)

        async with asyncio.timeout(BURST_TIMEOUT_S):
            return await asyncio.gather(*(one(i) for i in range(total)))


def statuses(results: Sequence[Result]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return out


def key_scope_keys(prefix: str, key_name: str, scope_name: str = "k") -> tuple[str, str, str]:
    """The z, c, u keys of a configured key's scope (the proxy derives the tag from the name)."""
    return scope_keys(prefix, Scope(scope_tag(key_name), scope_name, (0, 0, 0), 0))


def redis_used(admin: Any, prefix: str, key_name: str, scope_name: str = "k") -> tuple[int, ...]:
    """The running sums (requests, input, output) the scripts keep for a scope."""
    _, _, u = key_scope_keys(prefix, key_name, scope_name)
    return tuple(int(v or 0) for v in admin.hmget(u, "r", "i", "o"))


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mock() -> Iterator[Proc]:
    proc = start_mock()
    yield proc
    proc.stop()


def redis_backend(url: str, **extra: Any) -> dict[str, Any]:
    """A ``backend:`` section with a key prefix of the test's own (the servers are shared)."""
    return {
        "type": "redis",
        "url": url,
        # These tests are about exactness, not outages: a timeout no loaded machine reaches.
        "timeout_ms": 5_000,
        "key_prefix": f"d{uuid.uuid4().hex[:8]}",
        **extra,
    }


# -- exactly the limit over every deployment form -------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("dim", ["rpm", "output_tpm"])
async def test_three_nodes_admit_exactly_the_limit(redis_server, mock, tmp_path, dim):
    name, secret = new_key()
    limit = 50
    if dim == "rpm":
        key = key_entry(name, secret, rpm=limit)
    else:  # a per-model scope on output tokens: each request reserves MAX_TOKENS
        key = key_entry(name, secret, rpm=10_000)
        key["models"] = {"m": {"output_tpm": limit * MAX_TOKENS}}
    backend = redis_backend(redis_server.url)
    cfg = proxy_config(backend, mock.url, [key])
    with running_nodes(cfg, tmp_path, [None] * 3) as nodes:
        urls = [n.url for n in nodes]
        results = await hammer(urls, secret, 300)
        assert statuses(results) == {200: limit, 429: 300 - limit}
        # Every node now sees the same, full window.
        after = await hammer(urls, secret, 3)
        assert [r.status for r in after] == [429] * 3
        for r in after:
            assert r.body["error"]["code"] == "rate_limit_exceeded"
            assert 0 < int(r.headers["retry-after-ms"]) <= 60_000
    # Redis holds exactly what was admitted (the mock's usage equals each reservation).
    prompt = sum(r.body["usage"]["prompt_tokens"] for r in results if r.status == 200)
    expected = (limit, prompt, limit * MAX_TOKENS)
    with redis_server.client() as admin:
        assert (
            redis_used(admin, backend["key_prefix"], name, "k" if dim == "rpm" else "m:m")
            == expected
        )


@pytest.mark.redis
async def test_nodes_over_a_redis_cluster_admit_exactly_the_limit(redis_cluster, mock, tmp_path):
    name, secret = new_key()
    # One node's URL is enough: the client discovers the other masters.
    backend = redis_backend(redis_cluster.url, cluster=True)
    cfg = proxy_config(backend, mock.url, [key_entry(name, secret, rpm=40)])
    with running_nodes(cfg, tmp_path, [None] * 2) as nodes:
        results = await hammer([n.url for n in nodes], secret, 200)
        assert statuses(results) == {200: 40, 429: 160}
    admin = redis_cluster.client()
    try:
        assert redis_used(admin, backend["key_prefix"], name)[0] == 40
    finally:
        admin.close()


@pytest.mark.redis
async def test_nodes_over_sentinel_admit_exactly_the_limit(redis_sentinel, mock, tmp_path):
    name, secret = new_key()
    backend = redis_backend(
        redis_sentinel.url,  # only db (and password) count in the sentinel form
        sentinels=[f"{host}:{port}" for host, port in redis_sentinel.sentinels],
        service_name=redis_sentinel.service_name,
    )
    cfg = proxy_config(backend, mock.url, [key_entry(name, secret, rpm=40)])
    with running_nodes(cfg, tmp_path, [None] * 2) as nodes:
        results = await hammer([n.url for n in nodes], secret, 200)
        assert statuses(results) == {200: 40, 429: 160}
    with redis_sentinel.master.client() as admin:
        assert redis_used(admin, backend["key_prefix"], name)[0] == 40


# -- skewed clocks ------------------------------------------------------------------------------


def skewed_env(skew_s: int) -> dict[str, str]:
    """Environment for a child whose wall clock is off by ``skew_s`` (see skewclock/)."""
    path = os.pathsep.join(p for p in (str(SKEW_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SKEW_CLOCK_S": f"{skew_s:+d}"}


async def assert_skewed(nodes: Sequence[Proc], skews: Sequence[int]) -> None:
    """Each node's own clock really is off: uvicorn's ``date`` header comes from time.time()."""
    async with new_client() as client:
        for node, skew in zip(nodes, skews, strict=True):
            r = await client.get(node.url + "/healthz")
            seen = parsedate_to_datetime(r.headers["date"]).timestamp() - time.time()
            assert abs(seen - skew) < 60, (skew, seen, r.headers["date"])


SKEWS = (+HOUR_S, -HOUR_S)


@pytest.mark.redis
async def test_skewed_nodes_share_one_limit(redis_server, mock, tmp_path):
    """Two nodes two hours apart: one rpm across both, and the entries carry Redis's time.

    Were the window on each node's clock, the node an hour behind would see the other's entries
    an hour in the future (counting for an hour and a window), and the node an hour ahead would
    see the other's entries as long expired (not counting at all): together they would admit
    anything between the limit and twice the limit, with retry times of an hour.
    """
    name, secret = new_key()
    backend = redis_backend(redis_server.url)
    cfg = proxy_config(backend, mock.url, [key_entry(name, secret, rpm=40)])
    with running_nodes(cfg, tmp_path, [skewed_env(s) for s in SKEWS]) as nodes:
        await assert_skewed(nodes, SKEWS)
        urls = [n.url for n in nodes]
        results = await hammer(urls, secret, 200)
        assert statuses(results) == {200: 40, 429: 160}
        for r in await hammer(urls, secret, 2):  # each node refuses, on the shared window
            assert r.status == 429
            assert 0 < int(r.headers["retry-after-ms"]) <= 60_000  # a window, not an hour
    with redis_server.client() as admin:
        sec, usec = admin.time()
        server_ms = sec * 1000 + usec // 1000
        z, _, _ = key_scope_keys(backend["key_prefix"], name)
        stamps = [ts for _, ts in admin.zrange(z, 0, -1, withscores=True)]
    assert len(stamps) == 40
    # Every entry is on the server's clock (made within the last minute), none on a node's.
    assert all(server_ms - 60_000 < ts <= server_ms for ts in stamps)


@pytest.mark.redis
async def test_skewed_nodes_see_a_short_window_expire_together(redis_server, mock, tmp_path):
    """A 2 s window filled from both skewed nodes: both refuse until it ends, then both admit."""
    name, secret = new_key()
    window_s, limit = 2, 4
    backend = redis_backend(redis_server.url)
    cfg = proxy_config(backend, mock.url, [key_entry(name, secret, rpm=limit)], window_s=window_s)
    with running_nodes(cfg, tmp_path, [skewed_env(s) for s in SKEWS]) as nodes:
        await assert_skewed(nodes, SKEWS)
        a, b = (n.url for n in nodes)
        async with new_client() as client:
            # Fill the window from both nodes, then ask both at once.
            filled = [await send(client, url, secret) for url in (a, b, a, b)]
            assert [r.status for r in filled] == [200] * limit
            t_ask = time.monotonic()
            refused = await asyncio.gather(send(client, a, secret), send(client, b, secret))
            assert [r.status for r in refused] == [429, 429]
            # Both name the same end of the first entry's window (to within the requests' own
            # durations): a per-node clock would put them an hour apart.
            ends = [t_ask + int(r.headers["retry-after-ms"]) / 1000 for r in refused]
            assert all(0 < int(r.headers["retry-after-ms"]) <= window_s * 1000 for r in refused)
            slack = 0.25 + sum(r.seconds for r in refused)
            assert abs(ends[0] - ends[1]) < slack, (ends, slack)
            # Once the whole window has passed, both admit again, and share the fresh window.
            await asyncio.sleep(max(0.0, t_ask + window_s + 0.3 - time.monotonic()))
            again = [await send(client, url, secret) for url in (a, b, a, b, a, b)]
            assert [r.status for r in again] == [200] * limit + [429, 429]


async def test_memory_backend_nodes_each_enforce_their_own_copy(mock, tmp_path):
    """The contrast: the memory backend is per node.

    Its windows live in the process's own memory (on its own monotonic clock), so two nodes with
    the memory backend know nothing of each other and each admits the full limit: two nodes,
    twice the rate. Sharing one limit over several nodes needs the Redis backend.
    """
    name, secret = new_key()
    cfg = proxy_config({"type": "memory"}, mock.url, [key_entry(name, secret, rpm=10)])
    with running_nodes(cfg, tmp_path, [None] * 2) as nodes:
        results = await hammer([n.url for n in nodes], secret, 40)
    assert statuses(results) == {200: 20, 429: 20}
    assert sum(r.status == 200 for r in results if r.node == 0) == 10
