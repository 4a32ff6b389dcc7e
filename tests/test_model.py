"""Every backend against a plain reference model of the exact sliding window (hypothesis
stateful), and concurrent reservations from several clients never admitting above a limit."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio.cluster import RedisCluster

from proxy.backends.base import UNLIMITED, Backend, Decision, Reservation, Scope, ScopeState
from proxy.backends.memory import MemoryBackend
from proxy.backends.redis import RedisBackend

U = UNLIMITED
T0 = 10_000_000
# Every window and most time steps are multiples of 250 ms: entries then often sit exactly on
# the expiry edge (ts == now - window), where an off-by-one would show.
WINDOWS = (250, 1_000, 2_500)
NAMES = ("k", "m:a", "m:b")  # scope names of one key (one tag)
N_TAGS = 2  # keys; scopes of different keys never share a request (one cluster slot per key)

# A few thousand steps per backend (examples x steps), sized for a 2-core machine; more with
# MODEL_EXAMPLES=... for a longer local run. Derandomized: CI explores the same sequences.
EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "300"))
STEPS = 60
MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the reference model -----------------------------------------------------------------------
@dataclass
class Entry:
    ts: int
    id: str
    cost: list[int]


@dataclass
class Model:
    """The exact sliding window, written as plainly as possible.

    An entry counts while ts > now - window. Reserve and reconcile first drop the entries of
    their scopes that have expired under the window given with the call; peek drops nothing.
    """

    entries: dict[tuple[str, str], list[Entry]] = field(default_factory=dict)

    def _list(self, scope: Scope) -> list[Entry]:
        return self.entries.setdefault((scope.tag, scope.name), [])

    def drop_expired(self, scope: Scope, now: int) -> None:
        key = (scope.tag, scope.name)
        self.entries[key] = [e for e in self._list(scope) if e.ts > now - scope.window_ms]

    def _live(self, scope: Scope, at: int) -> list[Entry]:
        return [e for e in self._list(scope) if e.ts > at - scope.window_ms]

    def state(self, scope: Scope, now: int) -> ScopeState:
        live = self._live(scope, now)
        used = tuple(sum(e.cost[d] for e in live) for d in range(3))
        reset = min(e.ts for e in live) + scope.window_ms - now if live else 0
        return ScopeState(used, reset)  # type: ignore[arg-type]

    def _fits(self, scope: Scope, d: int, cost: tuple[int, ...], at: int) -> bool:
        limit = scope.limits[d]
        if limit == U:
            return True
        return sum(e.cost[d] for e in self._live(scope, at)) + cost[d] <= limit

    def _wait(self, scopes: list[Scope], checks: list[tuple[int, int]], cost, now: int) -> int:
        """Brute force: the smallest t > 0 at which every (scope, dim) of ``checks`` fits,
        trying every time at which some entry leaves the window (nothing else changes)."""
        candidates = sorted(
            {e.ts + s.window_ms - now for s in scopes for e in self._live(s, now)} | {1}
        )
        for t in candidates:
            if all(self._fits(scopes[i], d, cost, now + t) for i, d in checks):
                return t
        raise AssertionError("a cost within every limit must fit once the window is empty")

    def reserve(self, scopes: list[Scope], cost: tuple[int, int, int], rid: str, now: int):
        for s in scopes:
            self.drop_expired(s, now)
        blocked = [(i, d) for i, s in enumerate(scopes) for d in range(3)]
        blocked = [(i, d) for i, d in blocked if not self._fits(scopes[i], d, cost, now)]
        if not blocked:
            for s in scopes:
                self._list(s).append(Entry(now, rid, list(cost)))
            return True, [self.state(s, now) for s in scopes], 0, -1, -1
        retry = self._wait(scopes, blocked, cost, now)
        # Each blocked (scope, dim) alone; the decision names the first that waits longest.
        waits = [self._wait(scopes, [b], cost, now) for b in blocked]
        assert max(waits) == retry  # the model agrees with itself
        i, d = blocked[waits.index(retry)]
        return False, [self.state(s, now) for s in scopes], retry, i, d

    def reconcile(self, res: Reservation, actual: tuple[int, int, int], now: int) -> None:
        for s in res.scopes:
            self.drop_expired(s, now)
            mine = [e for e in self._list(s) if e.id == res.id]
            if mine:
                mine[0].cost = list(actual)
                continue
            excess = [max(0, a - c) for a, c in zip(actual, res.cost, strict=True)]
            if any(excess):
                self._list(s).append(Entry(now, res.id, excess))

    def reset(self, scope: Scope) -> None:
        self.entries.pop((scope.tag, scope.name), None)


# -- backends ------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


BackendFactory = Callable[[Clock], Backend]


def memory_factory(clock: Clock) -> Backend:
    return MemoryBackend(clock=clock)


def redis_factory(url: str, cluster: bool) -> BackendFactory:
    def build(clock: Clock) -> Backend:
        if cluster:
            client: Any = RedisCluster.from_url(url, protocol=2)
        else:
            client = aioredis.Redis.from_url(url, protocol=2)
        # A long TTL margin: keys must not expire in real time while the fake clock runs.
        return RedisBackend(
            client, timeout_ms=10_000, clock=clock, cluster=cluster, ttl_margin_ms=3_600_000
        )

    return build


REDIS_KINDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("cluster", marks=pytest.mark.redis),
]

# -- the state machine ---------------------------------------------------------------------------
limit_value = {
    0: st.one_of(st.just(U), st.integers(1, 6)),
    1: st.one_of(st.just(U), st.integers(1, 60)),
    2: st.one_of(st.just(U), st.integers(1, 60)),
}
limits_strategy = st.tuples(limit_value[0], limit_value[1], limit_value[2])
tokens_strategy = st.tuples(
    st.one_of(st.integers(0, 12), st.integers(0, 60)),
    st.one_of(st.integers(0, 12), st.integers(0, 60)),
)
advance_strategy = st.one_of(
    st.sampled_from([0, 1, 249, 250, 251, 500, 750, 999, 1000, 1001, 2500]),
    st.integers(0, 3000),
)


class LimiterModel(RuleBasedStateMachine):
    """Drives one backend and the model with the same calls and compares every answer."""

    factory: BackendFactory = staticmethod(memory_factory)

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = Clock()
        self.backend = self.factory(self.clock)
        self.model = Model()
        run = uuid.uuid4().hex[:10]  # the Redis servers are shared: fresh tags per example
        self.tags = [f"model-{run}-{t}" for t in range(N_TAGS)]
        # The configuration in force per scope; changed by the change_config rule.
        self.config: dict[tuple[str, str], tuple[tuple[int, int, int], int]] = {
            (tag, name): ((5, 40, 40), 1_000) for tag in self.tags for name in NAMES
        }
        self.pending: list[Reservation] = []
        self.ids = 0

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.runner.run(coro)

    def scope(self, tag: str, name: str) -> Scope:
        limits, window = self.config[(tag, name)]
        return Scope(tag, name, limits, window)

    def all_scopes(self) -> list[Scope]:
        return [self.scope(tag, name) for tag, name in self.config]

    def teardown(self) -> None:
        try:
            self.run(self.backend.reset(self.all_scopes()))
            self.run(self.backend.aclose())
        finally:
            self.runner.close()

    # -- rules -----------------------------------------------------------------------------
    @initialize(limits=limits_strategy, window=st.sampled_from(WINDOWS))
    def configure(self, limits: tuple[int, int, int], window: int) -> None:
        for key in self.config:
            self.config[key] = (limits, window)

    @rule(tag=st.integers(0, N_TAGS - 1), name=st.sampled_from(NAMES), tokens=tokens_strategy)
    def reserve_one(self, tag: int, name: str, tokens: tuple[int, int]) -> None:
        self._reserve(tag, (name,), tokens)

    @rule(
        tag=st.integers(0, N_TAGS - 1),
        names=st.permutations(NAMES).map(lambda p: tuple(p[:2])),
        tokens=tokens_strategy,
    )
    def reserve_two(self, tag: int, names: tuple[str, ...], tokens: tuple[int, int]) -> None:
        # Two scopes of one key (key + model, as the limiter builds them, or any other pair).
        self._reserve(tag, names, tokens)

    def _reserve(self, tag: int, names: tuple[str, ...], tokens: tuple[int, int]) -> None:
        event(f"reserve over {len(names)} scopes")
        scopes = [self.scope(self.tags[tag], n) for n in names]
        cost = [1, *tokens]
        for s in scopes:  # the limiter refuses a cost above a limit before asking the backend
            for d in range(3):
                if s.limits[d] != U:
                    cost[d] = min(cost[d], s.limits[d])
        triple = (cost[0], cost[1], cost[2])
        self.ids += 1
        rid = f"r{self.ids}"
        got: Decision = self.run(self.backend.reserve(scopes, triple, rid))
        admitted, states, retry, b_scope, b_dim = self.model.reserve(
            scopes, triple, rid, self.clock.now
        )
        assert got.admitted == admitted, (got, states)
        assert list(got.states) == states
        if admitted:
            event("reserve: admitted")
            assert got.reservation is not None
            assert got.reservation.at_ms == self.clock.now
            assert got.reservation.cost == triple and got.reservation.id == rid
            self.pending.append(got.reservation)
        else:
            event(f"reserve: refused on scope {b_scope} of {len(scopes)}, dim {b_dim}")
            assert got.reservation is None
            assert (got.retry_after_ms, got.blocked_scope, got.blocked_dim) == (
                retry,
                b_scope,
                b_dim,
            )

    @precondition(lambda self: self.pending)
    @rule(
        pick=st.integers(0, 10**6),
        tokens=st.tuples(
            st.one_of(st.just(None), st.integers(0, 80)),
            st.one_of(st.just(None), st.integers(0, 80)),
        ),
    )
    def reconcile(self, pick: int, tokens: tuple[int | None, int | None]) -> None:
        res = self.pending.pop(pick % len(self.pending))
        # None: keep the reserved value (a typical partial refund changes one dimension).
        actual = (
            1,
            res.cost[1] if tokens[0] is None else tokens[0],
            res.cost[2] if tokens[1] is None else tokens[1],
        )
        expired = any(res.at_ms <= self.clock.now - s.window_ms for s in res.scopes)
        event("reconcile: after expiry" if expired else "reconcile: in place")
        self.run(self.backend.reconcile(res, actual))
        self.model.reconcile(res, actual, self.clock.now)
        self._check_peek(list(res.scopes))

    @rule(ms=advance_strategy, tag=st.integers(0, N_TAGS - 1), names=st.permutations(NAMES))
    def advance_and_peek(self, ms: int, tag: int, names: list[str]) -> None:
        self.clock.now += ms
        self._check_peek([self.scope(self.tags[tag], n) for n in names])

    def _check_peek(self, scopes: list[Scope]) -> None:
        got = self.run(self.backend.peek(scopes))
        assert list(got) == [self.model.state(s, self.clock.now) for s in scopes]

    @rule(
        tag=st.integers(0, N_TAGS - 1),
        name=st.sampled_from(NAMES),
        limits=limits_strategy,
        window=st.sampled_from(WINDOWS),
        forget=st.integers(0, 9).map(lambda x: x == 0),
    )
    def change_config(self, tag: int, name: str, limits, window: int, forget: bool) -> None:
        # A reload: the next calls pass the new limits and window; usage stays where it is,
        # unless the scope is reset (the admin API's reset). Its pending reservations stay
        # pending: reconciling after a reset is legal.
        key = (self.tags[tag], name)
        if forget:
            s = self.scope(*key)
            self.run(self.backend.reset([s]))
            self.model.reset(s)
        self.config[key] = (limits, window)


def _machine(factory: BackendFactory) -> type[LimiterModel]:
    attrs = {"factory": staticmethod(factory)}
    return type("Machine", (LimiterModel,), attrs)


# On a failure hypothesis shrinks for up to 5 minutes: let it finish and print the sequence.
SHRINK_TIMEOUT = pytest.mark.timeout(900)


@SHRINK_TIMEOUT
def test_memory_backend_matches_the_model() -> None:
    run_state_machine_as_test(_machine(memory_factory), settings=MODEL_SETTINGS)


@SHRINK_TIMEOUT
@pytest.mark.redis
def test_redis_backend_matches_the_model(redis_server) -> None:
    run_state_machine_as_test(
        _machine(redis_factory(redis_server.url, cluster=False)), settings=MODEL_SETTINGS
    )


@SHRINK_TIMEOUT
@pytest.mark.redis
def test_redis_cluster_backend_matches_the_model(redis_cluster) -> None:
    run_state_machine_as_test(
        _machine(redis_factory(redis_cluster.url, cluster=True)), settings=MODEL_SETTINGS
    )


@pytest.fixture(params=["memory", *REDIS_KINDS])
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    if request.param == "memory":
        return memory_factory
    if request.param == "redis":
        return redis_factory(request.getfixturevalue("redis_server").url, cluster=False)
    return redis_factory(request.getfixturevalue("redis_cluster").url, cluster=True)


def test_peek_changes_nothing_even_across_a_window_change(
    request: pytest.FixtureRequest, backend_factory: BackendFactory
) -> None:
    """A reload may shorten the window and a later one lengthen it again: a peek in between
    (the admin API, a metrics scrape) must not have dropped what the longer window counts."""
    clock = Clock()
    backend = backend_factory(clock)
    tag = f"peek-{uuid.uuid4().hex[:10]}"
    long, short = Scope(tag, "k", (10, U, U), 2_500), Scope(tag, "k", (10, U, U), 250)

    async def scenario() -> tuple[ScopeState, ...]:
        try:
            assert (await backend.reserve([long], (1, 0, 0), "a")).admitted
            clock.now += 1_000
            assert await backend.peek([short]) == (ScopeState((0, 0, 0), 0),)
            return await backend.peek([long])
        finally:
            await backend.reset([long])
            await backend.aclose()

    assert asyncio.run(scenario()) == (ScopeState((1, 0, 0), 1_500),)


def test_the_model_itself_on_a_known_sequence() -> None:
    """The reference is only useful if it is right: check it against hand-computed values."""
    m = Model()
    s = Scope("t", "k", (U, 100, U), 1_000)
    for i in range(3):
        ok, *_ = m.reserve([s], (1, 30, 0), f"r{i}", T0 + 100 * i)
        assert ok
    ok, states, retry, b_scope, b_dim = m.reserve([s], (1, 50, 0), "x", T0 + 300)
    # 90 + 50 > 100: 40 must leave; the T0 entry (30) is not enough, T0 + 100 is: at T0 + 1100
    assert (ok, retry, b_scope, b_dim) == (False, 800, 0, 1)
    assert states == [ScopeState((3, 90, 0), 700)]
    assert m.reserve([s], (1, 50, 0), "y", T0 + 1100)[0]
    assert m.state(s, T0 + 1100) == ScopeState((2, 80, 0), 100)
    res = Reservation("y", (s,), (1, 50, 0), T0 + 1100)
    m.reconcile(res, (1, 70, 0), T0 + 2200)  # expired: only the excess 20, at now
    assert m.state(s, T0 + 2200) == ScopeState((0, 20, 0), 1_000)


# -- concurrency -------------------------------------------------------------------------------
N_CLIENTS = 4
N_REQUESTS = 400


async def _clients(request: pytest.FixtureRequest, kind: str) -> list[Backend]:
    if kind == "memory":
        return [MemoryBackend()]  # one process: one backend, many tasks
    if kind == "redis":
        url, cluster = request.getfixturevalue("redis_server").url, False
    else:
        url, cluster = request.getfixturevalue("redis_cluster").url, True
    # Server time (clock=None): what production nodes use, so every client shares one clock.
    out: list[Backend] = []
    for _ in range(N_CLIENTS):
        client: Any = (
            RedisCluster.from_url(url, protocol=2)
            if cluster
            else aioredis.Redis.from_url(url, protocol=2)
        )
        out.append(RedisBackend(client, timeout_ms=20_000, cluster=cluster))
    return out


KINDS = ["memory", *REDIS_KINDS]


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_reservations_admit_exactly_the_limit(request, kind: str) -> None:
    backends = await _clients(request, kind)
    tag = f"conc-{uuid.uuid4().hex[:10]}"
    key = Scope(tag, "k", (150, U, U), 600_000)
    model = Scope(tag, "m:x", (U, U, 2_000), 600_000)
    try:
        # Half the requests carry the model scope too; all-or-nothing over both scopes.
        calls = []
        for i in range(N_REQUESTS):
            scopes = [key, model] if i % 2 else [key]
            b = backends[i % len(backends)]
            calls.append(b.reserve(scopes, (1, 0, 20 if i % 2 else 0), f"c{i}"))
        decisions = await asyncio.gather(*calls)
        admitted = [(i, d) for i, d in enumerate(decisions) if d.admitted]
        # Requests limit 150 binds; the model scope's 2 000 output tokens (100 requests of 20)
        # may bind first for the requests that carry it.
        with_model = [i for i, _ in admitted if i % 2]
        assert len(admitted) == 150
        assert len(with_model) <= 100
        for _, d in admitted:
            assert d.states[0].used[0] <= 150
            if len(d.states) == 2:
                assert d.states[1].used[2] <= 2_000
        for d in decisions:
            if not d.admitted:
                assert d.retry_after_ms > 0 and d.reservation is None
        k_state, m_state = await backends[0].peek([key, model])
        assert k_state.used == (150, 0, 20 * len(with_model))
        assert m_state.used == (len(with_model), 0, 20 * len(with_model))
    finally:
        await backends[0].reset([key, model])
        for b in backends:
            await b.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_reserve_and_reconcile_never_exceed_and_never_lose(
    request, kind: str
) -> None:
    backends = await _clients(request, kind)
    tag = f"conc-{uuid.uuid4().hex[:10]}"
    limit_in, limit_out = 5_000, 3_000
    s = Scope(tag, "k", (U, limit_in, limit_out), 600_000)
    rng = random.Random(7)
    charged: dict[str, tuple[int, int, int]] = {}  # what each admitted reservation ends up at
    peaks: list[tuple[int, int, int]] = []

    async def one(i: int) -> None:
        b = backends[i % len(backends)]
        cost = (1, rng.randint(0, 80), rng.randint(0, 60))
        d = await b.reserve([s], cost, f"x{i}")
        if not d.admitted:
            assert d.retry_after_ms > 0
            return
        peaks.append(d.states[0].used)
        charged[f"x{i}"] = cost
        if i % 3:
            await asyncio.sleep(0)
            # Settle on another client than the one that reserved: any node may settle.
            actual = (1, cost[1], rng.randint(0, cost[2]))  # refunds only: never above the limit
            await backends[(i + 1) % len(backends)].reconcile(d.reservation, actual)
            charged[f"x{i}"] = actual

    try:
        await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))
        assert peaks, "nothing was admitted"
        for used in peaks:
            assert used[1] <= limit_in and used[2] <= limit_out
        (state,) = await backends[0].peek([s])
        total = tuple(sum(c[d] for c in charged.values()) for d in range(3))
        assert state.used == total  # every reservation is there, settled, nothing else
        assert state.used[1] <= limit_in and state.used[2] <= limit_out
    finally:
        await backends[0].reset([s])
        for b in backends:
            await b.aclose()
