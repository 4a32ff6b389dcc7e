"""The in-process backend: exact sliding windows kept in deques, for one single-process node."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from .base import (
    UNLIMITED,
    Backend,
    Decision,
    Reservation,
    Scope,
    ScopeState,
    Triple,
)


def monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Window:
    """Entries of one scope in time order, with running sums so a decision costs O(expired)."""

    __slots__ = ("by_id", "entries", "sums", "window_ms")

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        # entry: [ts_ms, id, requests, input_tokens, output_tokens]; mutable so reconcile is O(1)
        self.entries: deque[list] = deque()
        self.by_id: dict[str, list] = {}
        self.sums = [0, 0, 0]

    def expire(self, now: int, window_ms: int) -> None:
        horizon = now - window_ms
        entries, sums = self.entries, self.sums
        while entries and entries[0][0] <= horizon:
            e = entries.popleft()
            if self.by_id.get(e[1]) is e:
                del self.by_id[e[1]]
            sums[0] -= e[2]
            sums[1] -= e[3]
            sums[2] -= e[4]

    def state(self, now: int, window_ms: int) -> ScopeState:
        reset = self.entries[0][0] + window_ms - now if self.entries else 0
        s = self.sums
        return ScopeState((s[0], s[1], s[2]), reset)

    def live_state(self, now: int, window_ms: int) -> ScopeState:
        """Like ``state`` after ``expire``, without removing anything: a peek under a shorter
        window (a reload) must not drop what a longer one still counts."""
        horizon = now - window_ms
        gone = [0, 0, 0]
        oldest = None
        for e in self.entries:
            if e[0] > horizon:
                oldest = e[0]
                break
            gone[0] += e[2]
            gone[1] += e[3]
            gone[2] += e[4]
        s = self.sums
        used = (s[0] - gone[0], s[1] - gone[1], s[2] - gone[2])
        return ScopeState(used, oldest + window_ms - now if oldest is not None else 0)

    def wait_ms(self, dim: int, need: int, now: int, window_ms: int) -> int:
        """ms until entries holding at least ``need`` units of ``dim`` have left the window."""
        freed = 0
        for e in self.entries:
            freed += e[2 + dim]
            if freed >= need:
                return e[0] + window_ms - now
        return window_ms  # only reached if the caller's arithmetic is off; wait a whole window


class MemoryBackend(Backend):
    def __init__(self, clock: Callable[[], int] = monotonic_ms) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def _window(self, scope: Scope) -> _Window:
        k = (scope.tag, scope.name)
        w = self._windows.get(k)
        if w is None:
            w = self._windows[k] = _Window(scope.window_ms)
        else:
            w.window_ms = scope.window_ms
        return w

    async def reserve(self, scopes: Sequence[Scope], cost: Triple, reservation_id: str) -> Decision:
        now = self._clock()
        windows = []
        retry, blocked_scope, blocked_dim = 0, -1, -1
        for i, scope in enumerate(scopes):
            w = self._window(scope)
            w.expire(now, scope.window_ms)
            windows.append(w)
            for d in range(3):
                limit = scope.limits[d]
                if limit == UNLIMITED:
                    continue
                over = w.sums[d] + cost[d] - limit
                if over > 0:
                    wait = w.wait_ms(d, over, now, scope.window_ms)
                    if wait > retry or blocked_scope < 0:
                        retry, blocked_scope, blocked_dim = wait, i, d
        if blocked_scope >= 0:
            states = tuple(w.state(now, s.window_ms) for w, s in zip(windows, scopes, strict=True))
            return Decision(False, states, None, max(retry, 1), blocked_scope, blocked_dim)
        for w in windows:
            e = [now, reservation_id, cost[0], cost[1], cost[2]]
            w.entries.append(e)
            w.by_id[reservation_id] = e
            w.sums[0] += cost[0]
            w.sums[1] += cost[1]
            w.sums[2] += cost[2]
        states = tuple(w.state(now, s.window_ms) for w, s in zip(windows, scopes, strict=True))
        return Decision(True, states, Reservation(reservation_id, tuple(scopes), cost, now))

    async def reconcile(self, reservation: Reservation, actual: Triple) -> None:
        now = self._clock()
        for scope in reservation.scopes:
            w = self._window(scope)
            w.expire(now, scope.window_ms)
            e = w.by_id.get(reservation.id)
            if e is not None:
                for d in range(3):
                    w.sums[d] += actual[d] - e[2 + d]
                    e[2 + d] = actual[d]
                continue
            excess = [max(0, actual[d] - reservation.cost[d]) for d in range(3)]
            if any(excess):
                e = [now, reservation.id, *excess]
                w.entries.append(e)
                w.by_id[reservation.id] = e
                for d in range(3):
                    w.sums[d] += excess[d]
        self._drop_empty(reservation.scopes)

    def _drop_empty(self, scopes: Sequence[Scope]) -> None:
        # An idle key must cost nothing: forget windows that hold no entries.
        for scope in scopes:
            k = (scope.tag, scope.name)
            w = self._windows.get(k)
            if w is not None and not w.entries:
                del self._windows[k]

    async def peek(self, scopes: Sequence[Scope]) -> tuple[ScopeState, ...]:
        now = self._clock()
        out = []
        for scope in scopes:
            w = self._windows.get((scope.tag, scope.name))
            if w is None:
                out.append(ScopeState((0, 0, 0), 0))
                continue
            out.append(w.live_state(now, scope.window_ms))
        return tuple(out)

    async def reset(self, scopes: Sequence[Scope]) -> None:
        for scope in scopes:
            self._windows.pop((scope.tag, scope.name), None)

    def sweep(self) -> int:
        """Expire every window and drop the empty ones; returns how many windows remain.

        The app calls this periodically so that keys that went idle cost no memory.
        """
        now = self._clock()
        for k, w in list(self._windows.items()):
            w.expire(now, w.window_ms)
            if not w.entries:
                del self._windows[k]
        return len(self._windows)
