"""The narrow storage interface of the limiter, shared by the memory and Redis backends.

A *scope* is one set of limits that a request counts against (an API key, or an API key and a
model). A reservation puts one *entry* (timestamp, cost per dimension) into every scope of a
request, all or nothing. An entry counts while ``entry.ts > now - window``: the windows are exact
sliding windows with millisecond resolution, not fixed minutes or interpolated buckets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

# Index of each dimension in every cost, limit and usage triple.
REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS = 0, 1, 2
DIMENSIONS = ("requests", "input_tokens", "output_tokens")
UNLIMITED = -1

Triple = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits. ``tag`` groups the scopes of one API key (a Redis Cluster hash tag)."""

    tag: str
    name: str
    limits: Triple  # per window; UNLIMITED (-1) disables a dimension
    window_ms: int


@dataclass(frozen=True, slots=True)
class ScopeState:
    """Usage of one scope in its window at decision time (including the new entry if admitted)."""

    used: Triple
    reset_ms: int  # ms until the oldest counted entry leaves the window; 0 when nothing counts


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    scopes: tuple[Scope, ...]
    cost: Triple
    at_ms: int  # the backend clock's time of the entry


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    states: tuple[ScopeState, ...]  # one per scope, in the order given
    reservation: Reservation | None = None
    retry_after_ms: int = 0  # refused: ms until enough of the window expires for the cost to fit
    blocked_scope: int = -1  # refused: index of the scope that refused (the one that waits longest)
    blocked_dim: int = -1  # refused: REQUESTS, INPUT_TOKENS or OUTPUT_TOKENS


class BackendUnavailable(Exception):
    """The storage could not be reached or did not answer in time."""


class Backend(ABC):
    """What the limiter needs from a storage. Every method is one round trip at most."""

    @abstractmethod
    async def reserve(self, scopes: Sequence[Scope], cost: Triple, reservation_id: str) -> Decision:
        """Admit ``cost`` into every scope, or into none.

        Admitted iff for every scope and dimension with a limit: used + cost <= limit. The caller
        has already refused a cost that can never fit (cost > limit).
        """

    @abstractmethod
    async def reconcile(self, reservation: Reservation, actual: Triple) -> None:
        """Replace the reservation's cost by ``actual``, in place (the entry keeps its time).

        If the entry has already left the window, any excess of ``actual`` over the reserved cost
        is recorded as a new entry now, so a long stream is never charged less than it used.
        """

    @abstractmethod
    async def peek(self, scopes: Sequence[Scope]) -> tuple[ScopeState, ...]:
        """Read usage without changing anything."""

    @abstractmethod
    async def reset(self, scopes: Sequence[Scope]) -> None:
        """Forget every entry of these scopes."""

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
