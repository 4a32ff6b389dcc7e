"""From a key's policy and a request's cost to one backend decision, its headers, and settlement."""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass

from .backends.base import (
    DIMENSIONS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REQUESTS,
    UNLIMITED,
    Backend,
    Decision,
    Reservation,
    Scope,
    ScopeState,
    Triple,
)
from .config import Config, KeyConfig, Limits
from .errors import RateLimited


def _limits(lim: Limits) -> Triple:
    return (
        lim.rpm if lim.rpm is not None else UNLIMITED,
        lim.input_tpm if lim.input_tpm is not None else UNLIMITED,
        lim.output_tpm if lim.output_tpm is not None else UNLIMITED,
    )


def scope_tag(key_name: str) -> str:
    """A short, brace-free tag for a key's scopes: they share one Redis Cluster slot."""
    return hashlib.sha1(key_name.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A client key's scopes, built once per configuration."""

    name: str
    key_scope: Scope | None  # None when the key has no key-wide limits
    model_scopes: dict[str, Scope]

    def scopes_for(self, model: str | None) -> tuple[Scope, ...]:
        ms = self.model_scopes.get(model) if model else None
        if self.key_scope is None:
            return (ms,) if ms else ()
        return (self.key_scope, ms) if ms else (self.key_scope,)

    def all_scopes(self) -> tuple[Scope, ...]:
        head = (self.key_scope,) if self.key_scope else ()
        return head + tuple(self.model_scopes.values())


def build_policy(key: KeyConfig, window_ms: int) -> KeyPolicy:
    tag = scope_tag(key.name)
    key_scope = None if key.limits.empty else Scope(tag, "k", _limits(key.limits), window_ms)
    models = {
        model: Scope(tag, f"m:{model}", _limits(lim), window_ms)
        for model, lim in key.models.items()
        if not lim.empty
    }
    return KeyPolicy(key.name, key_scope, models)


def build_policies(cfg: Config) -> dict[str, KeyPolicy]:
    """Digest of the client key -> policy."""
    return {k.digest: build_policy(k, cfg.window_ms) for k in cfg.keys}


def format_duration(ms: int) -> str:
    """OpenAI's reset format: ``12ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


_UNIT = {REQUESTS: "requests", INPUT_TOKENS: "input tokens", OUTPUT_TOKENS: "output tokens"}
_SHORT = {REQUESTS: "RPM", INPUT_TOKENS: "input TPM", OUTPUT_TOKENS: "output TPM"}
# (limit, remaining, reset) header names per dimension, indexed like REQUESTS, INPUT_TOKENS,
# OUTPUT_TOKENS (0, 1, 2), then for -tokens at 3; built once.
_NAMES = tuple(
    (f"x-ratelimit-limit-{n}", f"x-ratelimit-remaining-{n}", f"x-ratelimit-reset-{n}")
    for n in ("requests", "input-tokens", "output-tokens", "tokens")
)
_TOKENS = 3


def ratelimit_headers(
    scopes: tuple[Scope, ...], states: tuple[ScopeState, ...], adjust: Triple = (0, 0, 0)
) -> dict[str, str]:
    """``x-ratelimit-*`` for the tightest scope per dimension.

    ``-tokens`` repeats whichever of input or output tokens has less remaining, since OpenAI's
    clients know only one token budget. ``adjust`` is added to usage (e.g. actual - reserved
    after settlement, so the headers reflect what was really charged).
    """
    # Built on every answer, so written for speed: no per-call dicts or name formatting.
    best: list[tuple[int, int, int] | None] = [None, None, None]  # (remaining, limit, reset)
    for scope, state in zip(scopes, states, strict=True):
        limits, used = scope.limits, state.used
        for d in (REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS):
            limit = limits[d]
            if limit == UNLIMITED:
                continue
            remaining = limit - used[d] - adjust[d]
            if remaining < 0:
                remaining = 0
            cur = best[d]
            if cur is None or remaining < cur[0]:
                best[d] = (remaining, limit, state.reset_ms)
    headers: dict[str, str] = {}
    for d in (REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS):
        b = best[d]
        if b is not None:
            limit_name, remaining_name, reset_name = _NAMES[d]
            headers[limit_name] = str(b[1])
            headers[remaining_name] = str(b[0])
            headers[reset_name] = format_duration(b[2])
    inp, out = best[INPUT_TOKENS], best[OUTPUT_TOKENS]
    tokens = inp if out is None else out if inp is None else min(inp, out)
    if tokens is not None:
        limit_name, remaining_name, reset_name = _NAMES[_TOKENS]
        headers[limit_name] = str(tokens[1])
        headers[remaining_name] = str(tokens[0])
        headers[reset_name] = format_duration(tokens[2])
    return headers


@dataclass(slots=True)
class Admission:
    """An admitted request: its reservation (None when the key is unlimited) and headers."""

    policy: KeyPolicy
    scopes: tuple[Scope, ...]
    reservation: Reservation | None
    states: tuple[ScopeState, ...]
    settled: bool = False
    charged: Triple | None = None

    def headers(self) -> dict[str, str]:
        if not self.scopes:
            return {}
        adjust: Triple = (0, 0, 0)
        if self.charged is not None and self.reservation is not None:
            c, r = self.charged, self.reservation.cost
            adjust = (c[0] - r[0], c[1] - r[1], c[2] - r[2])
        return ratelimit_headers(self.scopes, self.states, adjust)


def _window_phrase(window_ms: int) -> str:
    return "per min" if window_ms == 60_000 else f"per {format_duration(window_ms)} window"


class Limiter:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._ids = itertools.count(1)
        self._node = os.urandom(6).hex()

    def _new_id(self) -> str:
        return f"{self._node}{next(self._ids):x}"

    async def admit(
        self, policy: KeyPolicy, model: str | None, input_tokens: int, output_tokens: int
    ) -> Admission:
        """Reserve the request's cost or raise RateLimited."""
        scopes = policy.scopes_for(model)
        if not scopes:
            return Admission(policy, scopes, None, ())
        cost: Triple = (1, input_tokens, output_tokens)
        for scope in scopes:
            for d in (INPUT_TOKENS, OUTPUT_TOKENS):
                limit = scope.limits[d]
                if limit != UNLIMITED and cost[d] > limit:
                    raise self._never_fits(policy, scope, d, cost[d])
        decision = await self.backend.reserve(scopes, cost, self._new_id())
        if not decision.admitted:
            raise self._refusal(policy, scopes, decision, cost)
        return Admission(policy, scopes, decision.reservation, decision.states)

    async def settle(self, admission: Admission, actual: Triple) -> None:
        """Reconcile the reservation to what was really used; safe to call more than once."""
        if admission.settled:
            return
        admission.settled = True
        admission.charged = actual
        if admission.reservation is None or actual == admission.reservation.cost:
            return
        await self.backend.reconcile(admission.reservation, actual)

    def _subject(self, policy: KeyPolicy, scope: Scope) -> str:
        if scope.name.startswith("m:"):
            return f"key {policy.name} and model {scope.name[2:]}"
        return f"key {policy.name}"

    def _never_fits(self, policy: KeyPolicy, scope: Scope, dim: int, requested: int) -> RateLimited:
        limit = scope.limits[dim]
        hint = (
            "Shorten the prompt."
            if dim == INPUT_TOKENS
            else "Lower max_tokens / max_completion_tokens (or n)."
        )
        return RateLimited(
            f"Request too large for {self._subject(policy, scope)} on {_SHORT[dim]} "
            f"({_UNIT[dim]} {_window_phrase(scope.window_ms)}): Limit {limit}, Requested "
            f"{requested}. This request can never fit in the limit; it will not be retried. {hint}",
            dimension=DIMENSIONS[dim],
            headers={"x-should-retry": "false"},
        )

    def _refusal(
        self, policy: KeyPolicy, scopes: tuple[Scope, ...], decision: Decision, cost: Triple
    ) -> RateLimited:
        scope = scopes[decision.blocked_scope]
        d = decision.blocked_dim
        used = decision.states[decision.blocked_scope].used[d]
        wait_ms = decision.retry_after_ms
        headers = ratelimit_headers(scopes, decision.states)
        headers["retry-after"] = str(max(1, -(-wait_ms // 1000)))
        headers["retry-after-ms"] = str(wait_ms)
        return RateLimited(
            f"Rate limit reached for {self._subject(policy, scope)} on {_SHORT[d]} "
            f"({_UNIT[d]} {_window_phrase(scope.window_ms)}): Limit {scope.limits[d]}, "
            f"Used {used}, Requested {cost[d]}. Please try again in {format_duration(wait_ms)}.",
            dimension=DIMENSIONS[d],
            headers=headers,
        )
