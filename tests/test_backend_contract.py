"""One contract for every backend: exact sliding windows, all-or-nothing, the memory semantics."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proxy.backends.base import (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REQUESTS,
    UNLIMITED,
    Backend,
    Reservation,
    Scope,
    ScopeState,
    Triple,
)
from proxy.backends.memory import MemoryBackend
from proxy.backends.redis import RedisBackend, RedisSettings

T0 = 1_000_000_000  # fake clock start, ms
WINDOW = 1_000
U = UNLIMITED


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@dataclass
class Env:
    backend: Backend
    clock: FakeClock
    tag: str

    def scope(self, name: str = "k", limits: Triple = (U, U, U), window: int = WINDOW) -> Scope:
        return Scope(self.tag, name, limits, window)

    async def reserve(self, scopes: list[Scope], cost: Triple):
        return await self.backend.reserve(scopes, cost, uuid.uuid4().hex)


def _redis_backend(request: pytest.FixtureRequest, kind: str, clock=None) -> RedisBackend:
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        settings = RedisSettings(url=server.url, timeout_ms=5_000)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        settings = RedisSettings(url=cluster.url, cluster=True, timeout_ms=5_000)
    return RedisBackend.from_settings(settings, clock=clock)


REDIS_KINDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=pytest.mark.redis),
]


@pytest.fixture(params=["memory", *REDIS_KINDS])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    clock = FakeClock()
    if request.param == "memory":
        backend: Backend = MemoryBackend(clock=clock)
    else:
        backend = _redis_backend(request, request.param, clock)
    # A fresh tag per test: the servers are shared by the whole session.
    yield Env(backend, clock, f"key-{uuid.uuid4().hex[:12]}")
    await backend.aclose()


# -- the window edge ---------------------------------------------------------------------------
async def test_admitted_at_limit_refused_above_and_admitted_exactly_when_oldest_leaves(env: Env):
    s = env.scope(limits=(3, U, U))
    for i in range(3):
        d = await env.reserve([s], (1, 0, 0))
        assert d.admitted, i
        assert d.states[0].used == (i + 1, 0, 0)
        assert d.reservation is not None and d.reservation.at_ms == env.clock.now
        env.clock.advance(100)
    refused = await env.reserve([s], (1, 0, 0))  # at T0 + 300
    assert not refused.admitted and refused.reservation is None
    assert refused.retry_after_ms == WINDOW - 300
    assert (refused.blocked_scope, refused.blocked_dim) == (0, REQUESTS)
    assert refused.states[0] == ScopeState((3, 0, 0), WINDOW - 300)

    env.clock.now = T0 + WINDOW - 1  # one ms before the oldest entry leaves
    still = await env.reserve([s], (1, 0, 0))
    assert not still.admitted and still.retry_after_ms == 1
    env.clock.now = T0 + WINDOW  # ts <= now - window: the oldest entry has left
    again = await env.reserve([s], (1, 0, 0))
    assert again.admitted
    assert again.states[0] == ScopeState((3, 0, 0), 100)  # oldest now at T0 + 100


@pytest.mark.parametrize("dim", [REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS])
async def test_each_dimension_limits_on_its_own(env: Env, dim: int):
    limits = [U, U, U]
    limits[dim] = 10
    s = env.scope(limits=tuple(limits))
    cost = [0, 0, 0]
    cost[dim] = 4
    # the other dimensions are unlimited, so a large cost there never matters
    big = tuple(c if d == dim else 1_000_000 for d, c in enumerate(cost))
    assert (await env.reserve([s], big)).admitted
    assert (await env.reserve([s], big)).admitted
    refused = await env.reserve([s], big)  # 8 + 4 > 10
    assert not refused.admitted
    assert (refused.blocked_scope, refused.blocked_dim) == (0, dim)
    assert refused.states[0].used[dim] == 8
    small = tuple(2 if d == dim else 0 for d in range(3))  # 8 + 2 == 10 fits
    ok = await env.reserve([s], small)
    assert ok.admitted and ok.states[0].used[dim] == 10


async def test_unlimited_dimensions_are_ignored_but_counted(env: Env):
    s = env.scope(limits=(U, U, U))
    for _ in range(5):
        assert (await env.reserve([s], (1, 10**9, 10**9))).admitted
    assert (await env.backend.peek([s]))[0].used == (5, 5 * 10**9, 5 * 10**9)


# -- several scopes ----------------------------------------------------------------------------
async def test_all_or_nothing_refusal_in_second_scope_leaves_first_unchanged(env: Env):
    key = env.scope("k", limits=(10, 1000, 1000))
    model = env.scope("m:gpt-4o", limits=(1, U, U))
    assert (await env.reserve([key, model], (1, 10, 20))).admitted
    env.clock.advance(10)
    refused = await env.reserve([key, model], (1, 10, 20))
    assert not refused.admitted
    assert (refused.blocked_scope, refused.blocked_dim) == (1, REQUESTS)
    assert refused.states == (ScopeState((1, 10, 20), WINDOW - 10),) * 2
    assert await env.backend.peek([key, model]) == (ScopeState((1, 10, 20), WINDOW - 10),) * 2
    # the first scope alone still has room: nothing of the refused request was kept
    assert (await env.reserve([key], (9, 990, 980))).admitted


async def test_many_scopes(env: Env):
    scopes = [env.scope(f"m:model-{i}", limits=(U, 100 - i, U)) for i in range(12)]
    d = await env.reserve(scopes, (1, 80, 0))
    assert d.admitted and all(st.used == (1, 80, 0) for st in d.states)
    # 80 + 10 fits up to scope 10 (limit 90) and fails from scope 11 (limit 89)
    refused = await env.reserve(scopes, (1, 10, 0))
    assert not refused.admitted
    assert (refused.blocked_scope, refused.blocked_dim) == (11, INPUT_TOKENS)
    assert all(st.used == (1, 80, 0) for st in await env.backend.peek(scopes))
    ok = await env.reserve(scopes[:11], (1, 10, 0))
    assert ok.admitted and len(ok.states) == 11


async def test_no_scopes_is_admitted(env: Env):
    d = await env.reserve([], (1, 1, 1))
    assert d.admitted and d.states == () and d.reservation.at_ms == env.clock.now
    assert await env.backend.peek([]) == ()


async def test_retry_after_is_the_max_over_blocked_scopes_and_dimensions(env: Env):
    a = env.scope("k", limits=(2, U, 100))
    b = env.scope("m:x", limits=(U, 50, U))
    assert (await env.reserve([a, b], (1, 40, 10))).admitted  # T0
    env.clock.advance(300)
    assert (await env.reserve([a], (1, 0, 80))).admitted  # T0 + 300, scope a only
    env.clock.advance(100)
    d = await env.reserve([a, b], (1, 20, 20))  # T0 + 400
    assert not d.admitted
    # a.requests frees at T0+1000 (600 ms), a.output needs 10 -> T0+1000 too (first entry has
    # 10), b.input needs 10 -> T0+1000; all tie: the first blocked (scope 0, requests) wins.
    assert (d.retry_after_ms, d.blocked_scope, d.blocked_dim) == (600, 0, REQUESTS)
    d = await env.reserve([a, b], (0, 0, 15))
    # a.output: 90 + 15 - 100 = 5 <= 10 held by the T0 entry: 600 ms
    assert (d.retry_after_ms, d.blocked_scope, d.blocked_dim) == (600, 0, OUTPUT_TOKENS)
    d = await env.reserve([a, b], (0, 0, 25))
    # a.output now needs 15: the T0 entry (10) is not enough, the T0+300 one leaves at +900
    assert (d.retry_after_ms, d.blocked_scope, d.blocked_dim) == (900, 0, OUTPUT_TOKENS)


async def test_retry_after_comes_from_the_scope_that_waits_longest(env: Env):
    short = env.scope("k", limits=(1, U, U))
    long = env.scope("m:slow", limits=(1, U, U), window=3 * WINDOW)
    assert (await env.reserve([short, long], (1, 0, 0))).admitted
    env.clock.advance(100)
    d = await env.reserve([short, long], (1, 0, 0))
    assert (d.retry_after_ms, d.blocked_scope, d.blocked_dim) == (3 * WINDOW - 100, 1, REQUESTS)
    d = await env.reserve([long, short], (1, 0, 0))
    assert (d.retry_after_ms, d.blocked_scope, d.blocked_dim) == (3 * WINDOW - 100, 0, REQUESTS)


async def test_retry_after_is_exactly_the_time_until_the_cost_fits(env: Env):
    s = env.scope(limits=(U, 100, U))
    for _ in range(3):
        assert (await env.reserve([s], (1, 30, 0))).admitted  # at T0, T0+100, T0+200
        env.clock.advance(100)
    d = await env.reserve([s], (1, 50, 0))  # T0 + 300: 90 + 50 - 100 = 40 must leave
    assert not d.admitted
    # 30 (T0) is not enough, 30 + 30 (T0 + 100) is: fits at T0 + 1100
    assert d.retry_after_ms == T0 + 100 + WINDOW - env.clock.now == 800
    start = env.clock.now
    env.clock.now = start + d.retry_after_ms - 1
    late = await env.reserve([s], (1, 50, 0))
    assert not late.admitted and late.retry_after_ms == 1
    env.clock.now = start + d.retry_after_ms
    assert (await env.reserve([s], (1, 50, 0))).admitted


async def test_reset_ms_is_time_until_oldest_counted_entry_leaves(env: Env):
    s = env.scope(limits=(U, U, U))
    assert await env.backend.peek([s]) == (ScopeState((0, 0, 0), 0),)
    d = await env.reserve([s], (1, 1, 1))
    assert d.states[0].reset_ms == WINDOW
    env.clock.advance(400)
    d = await env.reserve([s], (1, 1, 1))
    assert d.states[0] == ScopeState((2, 2, 2), WINDOW - 400)
    env.clock.advance(100)
    assert await env.backend.peek([s]) == (ScopeState((2, 2, 2), WINDOW - 500),)
    env.clock.now = T0 + WINDOW  # the first entry has left, the second leaves at T0+1400
    assert await env.backend.peek([s]) == (ScopeState((1, 1, 1), 400),)
    env.clock.now = T0 + 400 + WINDOW
    assert await env.backend.peek([s]) == (ScopeState((0, 0, 0), 0),)


# -- reconcile ---------------------------------------------------------------------------------
async def test_reconcile_down_and_up_in_place(env: Env):
    s = env.scope(limits=(U, U, 1000))
    d = await env.reserve([s], (1, 100, 256))
    env.clock.advance(200)
    await env.backend.reconcile(d.reservation, (1, 100, 40))
    assert await env.backend.peek([s]) == (ScopeState((1, 100, 40), WINDOW - 200),)
    env.clock.advance(200)
    await env.backend.reconcile(d.reservation, (1, 120, 700))
    # in place: the entry keeps its time, so reset_ms still counts from T0
    assert await env.backend.peek([s]) == (ScopeState((1, 120, 700), WINDOW - 400),)
    env.clock.now = T0 + WINDOW
    assert await env.backend.peek([s]) == (ScopeState((0, 0, 0), 0),)


async def test_refund_makes_room(env: Env):
    s = env.scope(limits=(U, U, 600))
    first = await env.reserve([s], (1, 10, 500))
    assert not (await env.reserve([s], (1, 10, 500))).admitted
    await env.backend.reconcile(first.reservation, (1, 10, 50))
    d = await env.reserve([s], (1, 10, 500))
    assert d.admitted and d.states[0].used == (2, 20, 550)


async def test_reconcile_after_expiry_records_only_the_excess_now(env: Env):
    key, model = env.scope("k"), env.scope("m:a", window=3 * WINDOW)
    d = await env.reserve([key, model], (1, 10, 100))
    env.clock.advance(WINDOW + 500)  # gone from the key scope, still inside the model scope
    await env.backend.reconcile(d.reservation, (1, 12, 250))
    assert await env.backend.peek([key, model]) == (
        ScopeState((0, 2, 150), WINDOW),  # excess only, as a new entry at now
        ScopeState((1, 12, 250), 3 * WINDOW - WINDOW - 500),  # in place
    )


async def test_reconcile_after_expiry_without_excess_adds_nothing(env: Env):
    s = env.scope()
    d = await env.reserve([s], (1, 10, 100))
    env.clock.advance(WINDOW)
    await env.backend.reconcile(d.reservation, (1, 10, 30))
    assert await env.backend.peek([s]) == (ScopeState((0, 0, 0), 0),)


async def test_reconcile_of_an_unknown_reservation_is_harmless(env: Env):
    s = env.scope(limits=(5, U, U))
    assert (await env.reserve([s], (1, 10, 10))).admitted
    ghost = Reservation("never-reserved", (s,), (1, 10, 10), env.clock.now)
    await env.backend.reconcile(ghost, (1, 10, 10))
    await env.backend.reconcile(ghost, (0, 3, 4))
    assert await env.backend.peek([s]) == (ScopeState((1, 10, 10), WINDOW),)
    other = env.scope("m:never-used")
    await env.backend.reconcile(Reservation("x", (other,), (1, 1, 1), 0), (1, 1, 1))
    assert await env.backend.peek([other]) == (ScopeState((0, 0, 0), 0),)


# -- peek and reset ----------------------------------------------------------------------------
async def test_peek_changes_nothing(env: Env):
    s = env.scope(limits=(2, U, U))
    assert await env.backend.peek([s]) == (ScopeState((0, 0, 0), 0),)
    assert (await env.reserve([s], (1, 5, 5))).admitted
    env.clock.advance(600)
    assert (await env.reserve([s], (1, 5, 5))).admitted
    env.clock.advance(500)  # the first entry has expired, nobody has removed it yet
    first = await env.backend.peek([s])
    assert first == (ScopeState((1, 5, 5), WINDOW - 500),)
    for _ in range(3):
        assert await env.backend.peek([s]) == first
    d = await env.reserve([s], (1, 5, 5))
    assert d.admitted and d.states[0] == ScopeState((2, 10, 10), WINDOW - 500)


async def test_reset_forgets_everything(env: Env):
    a, b = env.scope("k", limits=(1, U, U)), env.scope("m:z", limits=(1, U, U))
    assert (await env.reserve([a, b], (1, 1, 1))).admitted
    assert not (await env.reserve([a, b], (1, 1, 1))).admitted
    await env.backend.reset([a, b])
    assert await env.backend.peek([a, b]) == (ScopeState((0, 0, 0), 0),) * 2
    assert (await env.reserve([a, b], (1, 1, 1))).admitted
    await env.backend.reset([])


# -- Redis against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_redis_matches_memory_on_random_traffic(request: pytest.FixtureRequest, kind: str):
    clock = FakeClock()
    redis_backend = _redis_backend(request, kind, clock)
    memory = MemoryBackend(clock=clock)
    rng = random.Random(20240611)
    tag = f"key-{uuid.uuid4().hex[:12]}"
    scopes = [
        Scope(tag, "k", (8, 400, 600), 1_000),
        Scope(tag, "m:a", (5, U, 300), 700),
        Scope(tag, "m:b", (U, 250, U), 1_500),
    ]
    live: list[Reservation] = []
    try:
        for step in range(400):
            clock.advance(rng.choice([0, 1, 7, 50, 120, 333]))
            op = rng.random()
            chosen = [scopes[0], *rng.sample(scopes[1:], rng.randint(0, 2))]
            if op < 0.6:
                cost = (rng.randint(0, 2), rng.randint(0, 120), rng.randint(0, 150))
                rid = f"r{step}"
                got = await redis_backend.reserve(chosen, cost, rid)
                want = await memory.reserve(chosen, cost, rid)
                assert got == want, step
                if got.reservation:
                    live.append(got.reservation)
            elif op < 0.9 and live:
                res = live.pop(rng.randrange(len(live)))
                actual = (res.cost[0], rng.randint(0, 200), rng.randint(0, 300))
                await redis_backend.reconcile(res, actual)
                await memory.reconcile(res, actual)
            else:
                assert await redis_backend.peek(scopes) == await memory.peek(scopes), step
        assert await redis_backend.peek(scopes) == await memory.peek(scopes)
    finally:
        await redis_backend.aclose()


@pytest.mark.parametrize("kind", REDIS_KINDS)
async def test_server_time_mode_short_window(request: pytest.FixtureRequest, kind: str):
    """Without an injected clock the scripts use Redis's TIME: a real 500 ms window."""
    backend = _redis_backend(request, kind, clock=None)
    s = Scope(f"key-{uuid.uuid4().hex[:12]}", "k", (1, U, U), 500)
    try:
        first = await backend.reserve([s], (1, 0, 0), "a")
        assert first.admitted
        refused = await backend.reserve([s], (1, 0, 0), "b")
        assert not refused.admitted and 1 <= refused.retry_after_ms <= 500
        assert refused.states[0].reset_ms == refused.retry_after_ms
        await asyncio.sleep((refused.retry_after_ms + 5) / 1000)
        again = await backend.reserve([s], (1, 0, 0), "c")
        assert again.admitted
        assert again.reservation.at_ms >= first.reservation.at_ms + 500
    finally:
        await backend.aclose()
