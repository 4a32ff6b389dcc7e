"""The outage policy around a shared backend: fail closed, fail open, or fall back to local limits.

When the shared store fails, the node stops calling it on the request path (so no request waits
for a dead server's timeout), applies the policy, and probes the store in the background with
exponential backoff until it answers again. Each transition is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Literal

from .base import (
    UNLIMITED,
    Backend,
    BackendUnavailable,
    Decision,
    Reservation,
    Scope,
    ScopeState,
    Triple,
)
from .memory import MemoryBackend

log = logging.getLogger("proxy.backend")

Policy = Literal["fail_closed", "fail_open", "local"]
_LOCAL = "~"  # reservation ids of the local fallback start with this


def _divided(scope: Scope, nodes: int) -> Scope:
    limits = tuple(lim if lim == UNLIMITED else max(1, lim // nodes) for lim in scope.limits)
    return Scope(scope.tag, scope.name, limits, scope.window_ms)  # type: ignore[arg-type]


class FailoverBackend(Backend):
    def __init__(
        self,
        primary: Backend,
        policy: Policy,
        local_node_count: int = 1,
        *,
        backoff_s: tuple[float, float] = (0.2, 5.0),
        on_state: Callable[[str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.primary = primary
        self.policy = policy
        self.nodes = local_node_count
        self.local = MemoryBackend()
        self._backoff = backoff_s
        self._on_state = on_state
        self._on_error = on_error
        self._probe: asyncio.Task | None = None
        self.healthy = True

    @property
    def state(self) -> str:
        return "ok" if self.healthy else f"outage:{self.policy}"

    def _down(self, exc: BaseException, operation: str) -> None:
        if self._on_error:
            self._on_error(operation)
        if self.healthy:
            self.healthy = False
            log.warning(
                "limiter backend unavailable (%s); applying outage policy %s", exc, self.policy
            )
            if self._on_state:
                self._on_state(self.state)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        delay, ceiling = self._backoff
        while not self.healthy:
            await asyncio.sleep(delay)
            delay = min(delay * 2, ceiling)
            if await self.primary.ping():
                self.healthy = True
                log.warning("limiter backend reachable again; shared limits restored")
                if self._on_state:
                    self._on_state(self.state)

    async def _fallback(self, scopes: Sequence[Scope], cost: Triple, rid: str) -> Decision:
        if self.policy == "fail_closed":
            raise BackendUnavailable("limiter backend unavailable (policy fail_closed)")
        if self.policy == "fail_open":
            # Admit and count nothing: no reservation, so settlement is a no-op.
            return Decision(True, tuple(ScopeState((0, 0, 0), 0) for _ in scopes))
        local = [_divided(s, self.nodes) for s in scopes]
        return await self.local.reserve(local, cost, _LOCAL + rid)

    async def reserve(self, scopes: Sequence[Scope], cost: Triple, reservation_id: str) -> Decision:
        if self.healthy:
            try:
                return await self.primary.reserve(scopes, cost, reservation_id)
            except BackendUnavailable as exc:
                self._down(exc, "reserve")
        return await self._fallback(scopes, cost, reservation_id)

    async def reconcile(self, reservation: Reservation, actual: Triple) -> None:
        if reservation.id.startswith(_LOCAL):
            await self.local.reconcile(reservation, actual)
            return
        # While the store is down the entry stays as reserved and expires with its window
        # (never under-charged beyond this one request), and nothing waits on a dead store.
        if not self.healthy:
            return
        try:
            await self.primary.reconcile(reservation, actual)
        except BackendUnavailable as exc:
            self._down(exc, "reconcile")

    async def peek(self, scopes: Sequence[Scope]) -> tuple[ScopeState, ...]:
        if self.healthy:
            try:
                return await self.primary.peek(scopes)
            except BackendUnavailable as exc:
                self._down(exc, "peek")
        if self.policy == "local":
            return await self.local.peek([_divided(s, self.nodes) for s in scopes])
        raise BackendUnavailable("limiter backend unavailable")

    async def reset(self, scopes: Sequence[Scope]) -> None:
        await self.local.reset([_divided(s, self.nodes) for s in scopes])
        await self.primary.reset(scopes)

    async def ping(self) -> bool:
        return await self.primary.ping()

    def sweep(self) -> int:
        return self.local.sweep()

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self.primary.aclose()
