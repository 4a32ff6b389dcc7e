"""Outage policies around the shared backend, with a primary that fails and recovers on demand."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.backends.base import BackendUnavailable, Scope
from proxy.backends.failover import FailoverBackend
from proxy.backends.memory import MemoryBackend
from tests.conftest import FakeClock

SCOPE = Scope("t", "k", (10, 1000, 1000), 60_000)


class Flaky(MemoryBackend):
    """A memory backend that can be switched off like a dead server."""

    def __init__(self) -> None:
        super().__init__(FakeClock())
        self.up = True
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if not self.up:
            raise BackendUnavailable("down")

    async def reserve(self, scopes, cost, rid):
        self._check()
        return await super().reserve(scopes, cost, rid)

    async def reconcile(self, reservation, actual):
        self._check()
        return await super().reconcile(reservation, actual)

    async def peek(self, scopes):
        self._check()
        return await super().peek(scopes)

    async def ping(self) -> bool:
        return self.up


async def test_fail_closed_raises_and_stops_calling_primary() -> None:
    primary = Flaky()
    fb = FailoverBackend(primary, "fail_closed", backoff_s=(0.01, 0.02))
    primary.up = False
    with pytest.raises(BackendUnavailable):
        await fb.reserve([SCOPE], (1, 1, 1), "a")
    calls = primary.calls
    with pytest.raises(BackendUnavailable):
        await fb.reserve([SCOPE], (1, 1, 1), "b")
    assert primary.calls == calls  # no request waits on a dead store
    primary.up = True
    for _ in range(100):
        if fb.healthy:
            break
        await asyncio.sleep(0.01)
    assert fb.healthy
    d = await fb.reserve([SCOPE], (1, 1, 1), "c")
    assert d.admitted and d.reservation is not None
    await fb.aclose()


async def test_fail_open_admits_and_counts_nothing() -> None:
    primary = Flaky()
    fb = FailoverBackend(primary, "fail_open", backoff_s=(10, 10))
    primary.up = False
    for i in range(50):  # far over rpm 10
        d = await fb.reserve([SCOPE], (1, 1, 1), str(i))
        assert d.admitted and d.reservation is None
    primary.up = True
    assert (await primary.peek([SCOPE]))[0].used == (0, 0, 0)
    await fb.aclose()


async def test_local_policy_divides_limits_by_node_count() -> None:
    primary = Flaky()
    fb = FailoverBackend(primary, "local", local_node_count=3, backoff_s=(10, 10))
    primary.up = False
    admitted = 0
    for i in range(10):
        d = await fb.reserve([SCOPE], (1, 1, 1), str(i))
        admitted += d.admitted
        if d.admitted:
            assert d.reservation is not None
            await fb.reconcile(d.reservation, (1, 0, 0))  # settles locally, not on the dead store
    assert admitted == 10 // 3
    await fb.aclose()


async def test_transitions_logged_once(caplog) -> None:
    primary = Flaky()
    states: list[str] = []
    fb = FailoverBackend(primary, "local", backoff_s=(0.01, 0.01), on_state=states.append)
    primary.up = False
    with caplog.at_level(logging.WARNING, logger="proxy.backend"):
        for i in range(20):
            await fb.reserve([SCOPE], (1, 1, 1), str(i))
        primary.up = True
        for _ in range(100):
            if fb.healthy:
                break
            await asyncio.sleep(0.01)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in msgs) == 1
    assert sum("reachable again" in m for m in msgs) == 1
    assert states == ["outage:local", "ok"]
    await fb.aclose()


async def test_fail_closed_is_503_through_the_app(make_client) -> None:
    from tests.conftest import auth

    primary = Flaky()
    primary.up = False
    c = make_client(backend=FailoverBackend(primary, "fail_closed", backoff_s=(10, 10)))
    r = await c.post(
        "/v1/chat/completions",
        headers=auth(),
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "rate_limiter_unavailable"


async def test_reconcile_skips_a_store_marked_down() -> None:
    primary = Flaky()
    fb = FailoverBackend(primary, "fail_closed", backoff_s=(10, 10))
    d = await fb.reserve([SCOPE], (1, 5, 5), "r1")
    assert d.reservation is not None
    primary.up = False
    with pytest.raises(BackendUnavailable):
        await fb.reserve([SCOPE], (1, 1, 1), "r2")
    calls = primary.calls
    await fb.reconcile(d.reservation, (1, 1, 1))  # returns at once, without a call
    assert primary.calls == calls
    primary.up = True
    assert (await primary.peek([SCOPE]))[0].used == (1, 5, 5)  # kept as reserved
    await fb.aclose()
