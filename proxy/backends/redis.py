"""The shared backend: the memory backend's exact sliding windows, kept in Redis, changed in Lua.

One code path for a single server, a Redis Cluster and a Sentinel-managed master; each operation
is one EVALSHA of a script from ``scripts_lua/`` (one round trip, atomic over all its scopes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import site
import sys
import sysconfig
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from .base import Backend, BackendUnavailable, Decision, Reservation, Scope, ScopeState, Triple
from .pipelining import Pipeliner


def _scripts_dir() -> Path:
    """``scripts_lua/`` at the top of a source tree (or editable install), else where a wheel
    puts it (pyproject's data-files): ``<prefix>/share/llm-ratelimit-proxy/scripts_lua``."""
    in_tree = Path(__file__).resolve().parents[2] / "scripts_lua"
    installed = [
        Path(base) / "share" / "llm-ratelimit-proxy" / "scripts_lua"
        for base in (sysconfig.get_path("data"), sys.prefix, site.USER_BASE)
        if base
    ]
    for folder in (in_tree, *installed):
        if (folder / "lib.lua").is_file():
            return folder
    return in_tree  # _Script's error then names the folder it looked in


SCRIPTS_DIR = _scripts_dir()
TTL_MARGIN_MS = 5_000  # keys outlive their newest entry by this much, then Redis drops them
_TIME = -1  # ARGV "now" meaning: use the server's TIME
# Everything that means "Redis did not answer properly"; turned into BackendUnavailable.
# AttributeError: redis-py's async cluster client can drop a connection's writer under a
# concurrent reconnect and then fails with it; for the caller that is a connection failure.
_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError, AttributeError)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the Redis is and how to talk to it; built by the config from ``backend:``."""

    url: str  # redis:// or rediss://, password and db in the URL; sentinel form: db/password only
    cluster: bool = False
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    timeout_ms: int = 250  # bound of every call, connect included
    key_prefix: str = "rl"

    def __post_init__(self) -> None:
        if self.timeout_ms <= 0:
            raise ValueError("timeout_ms must be > 0")
        if not self.key_prefix or any(ch in self.key_prefix for ch in "{}"):
            # A brace in the prefix would become the cluster hash tag of every key.
            raise ValueError("key_prefix must be non-empty and contain no braces")
        if self.sentinels and not self.service_name:
            raise ValueError("sentinels need a service_name")
        if self.sentinels and self.cluster:
            raise ValueError("cluster and sentinels are exclusive")


@lru_cache(maxsize=65536)
def slot_tag(tag: str) -> str:
    """The braces-safe form of ``Scope.tag``: 16 hex chars of its SHA-1.

    Always hashed, so any tag (braces, colons, any length) gives a short key, one cluster slot
    per API key, and different keys spread evenly over the slots.
    """
    return hashlib.sha1(tag.encode()).hexdigest()[:16]


def scope_keys(prefix: str, scope: Scope) -> tuple[str, str, str]:
    """``<prefix>:{<slot tag>}:<scope name>:<z|c|u>`` (see scripts_lua/lib.lua for the layout)."""
    base = f"{prefix}:{{{slot_tag(scope.tag)}}}:{scope.name}:"
    return base + "z", base + "c", base + "u"


class _Script:
    """A script body with its SHA-1; sent with SCRIPT LOAD only when the server lacks it."""

    __slots__ = ("body", "name", "sha")

    def __init__(self, name: str, folder: Path = SCRIPTS_DIR) -> None:
        if not (folder / f"{name}.lua").is_file():
            raise FileNotFoundError(f"Lua scripts not found in {folder}")
        lib = (folder / "lib.lua").read_text()
        body = (folder / f"{name}.lua").read_text()
        if body.startswith("#!"):  # the shebang (script flags) must stay the first line
            shebang, _, rest = body.partition("\n")
            body = f"{shebang}\n{lib}\n{rest}"
        else:
            body = f"{lib}\n{body}"
        self.name = name
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()


class _FewCommands(AsyncCommandsParser):
    """Key positions of the one multi-key command this backend sends (DEL), by COMMAND INFO.

    The cluster client finds EVALSHA's keys from its numkeys and sends SCRIPT LOAD and PING to
    fixed nodes; only DEL needs the table. redis-py's own parser reads the whole COMMAND table
    at every (re)initialization: ~100 ms of parsing, which on a busy node exceeds a 250 ms
    timeout, so every cold start or reconnect looked like an outage.
    """

    async def initialize(self, node: Any = None) -> None:
        if node is not None:
            self.node = node
        info = await self.node.execute_command("COMMAND", "INFO", "del")
        self.commands = {name.lower(): cmd for name, cmd in info.items()}


def _client_from_settings(s: RedisSettings) -> tuple[Any, list[Any]]:
    """The client for the three forms, and further clients to close with it."""
    timeout = s.timeout_ms / 1000
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # No retries: a failed call goes straight to the outage policy instead of waiting.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,  # dead pooled connections are noticed when taken out ...
        # ... but only with RESP2: under RESP3 redis-py 8 enables maintenance notifications,
        # which skip that check, so the first call after a Redis restart would fail.
        "protocol": 2,
    }
    if s.cluster:
        cluster = RedisCluster.from_url(s.url, **common)
        cluster.commands_parser = _FewCommands()
        return cluster, []
    # Every call is bounded by RedisBackend's own timeout; redis-py's per-read timeout on top
    # would cost a timer (and, for writes, a task) per command.
    data = {**common, "socket_timeout": None}
    if s.sentinels:
        conn = parse_url(s.url)
        kwargs = {k: v for k, v in conn.items() if k in ("db", "username", "password")}
        if conn.get("connection_class") is SSLConnection:
            kwargs["ssl"] = True
        sentinel = Sentinel(list(s.sentinels), sentinel_kwargs=dict(common), **data)
        return sentinel.master_for(s.service_name, **kwargs), list(sentinel.sentinels)
    return aioredis.Redis.from_url(s.url, **data), []


class RedisBackend(Backend):
    """``clock=None``: the script reads Redis's TIME, so every node shares one window even if
    the proxies' clocks disagree. An injected clock (ms) is passed in instead (tests)."""

    def __init__(
        self,
        client: Any,
        *,
        key_prefix: str = "rl",
        timeout_ms: int = 250,
        clock: Callable[[], int] | None = None,
        cluster: bool = False,
        ttl_margin_ms: int = TTL_MARGIN_MS,
        also_close: Sequence[Any] = (),
    ) -> None:
        self._client = client
        self._also_close = list(also_close)
        self._prefix = key_prefix
        self._timeout_s = timeout_ms / 1000
        self._clock = clock
        self._cluster = cluster
        self._init_lock = asyncio.Lock()
        self._margin = ttl_margin_ms
        self._reserve = _Script("reserve")
        self._reconcile = _Script("reconcile")
        self._peek = _Script("peek")
        # The cluster client routes each call by its keys; the others share one pool, where
        # the calls of one loop turn go out as one pipeline.
        self._pipeliner = None if cluster else Pipeliner(client.connection_pool, timeout_ms / 1000)

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, clock: Callable[[], int] | None = None
    ) -> RedisBackend:
        client, also_close = _client_from_settings(settings)
        return cls(
            client,
            key_prefix=settings.key_prefix,
            timeout_ms=settings.timeout_ms,
            clock=clock,
            cluster=settings.cluster,
            also_close=also_close,
        )

    # -- the one boundary to Redis -------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> AsyncIterator[None]:
        """Bound the whole call by the timeout and turn every failure into BackendUnavailable."""
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._cluster:
                    # Let one call (re)discover the cluster while the others wait here: when
                    # many calls start that inside redis-py together, some fail on
                    # connections closed under them. A no-op once the client is initialized.
                    async with self._init_lock:
                        await self._client.initialize()
                yield
        except _FAILURES as exc:
            raise BackendUnavailable(f"redis {what}: {type(exc).__name__}: {exc}") from exc

    async def _run(self, script: _Script, keys: list[str], args: list[int | str]) -> list[int]:
        # The hot path: written out rather than through _guard, a context manager per call.
        try:
            if self._pipeliner is not None:
                # Bounded by its batch's own timeout (connect included): no second timer on
                # the way that nearly every call takes.
                call = self._pipeliner.call
                deadline = asyncio.get_running_loop().time() + self._timeout_s
                try:
                    return await call("EVALSHA", script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    # Restarted or flushed server: load once, retry once, all within the one
                    # timeout of this call.
                    async with asyncio.timeout_at(deadline):
                        await self._client.script_load(script.body)
                        return await call("EVALSHA", script.sha, len(keys), *keys, *args)
            async with asyncio.timeout(self._timeout_s):
                async with self._init_lock:  # see _guard
                    await self._client.initialize()
                try:
                    return await self._client.evalsha(script.sha, len(keys), *keys, *args)
                except NoScriptError:
                    await self._client.script_load(script.body)
                    return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except _FAILURES as exc:
            raise BackendUnavailable(f"redis {script.name}: {type(exc).__name__}: {exc}") from exc

    def _now_arg(self) -> int:
        return self._clock() if self._clock is not None else _TIME

    def _keys(self, scopes: Sequence[Scope]) -> list[str]:
        if self._cluster and len({s.tag for s in scopes}) > 1:
            raise ValueError("in cluster mode all scopes of one call must share one tag")
        keys: list[str] = []
        for scope in scopes:
            keys.extend(scope_keys(self._prefix, scope))
        return keys

    # -- Backend -------------------------------------------------------------------------------
    async def reserve(self, scopes: Sequence[Scope], cost: Triple, reservation_id: str) -> Decision:
        args: list[int | str] = [self._now_arg(), reservation_id, *cost, self._margin]
        for scope in scopes:
            args.extend((scope.window_ms, *scope.limits))
        r = await self._run(self._reserve, self._keys(scopes), args)
        admitted, now, retry, blocked_scope, blocked_dim = r[:5]
        states = tuple(
            ScopeState((r[i], r[i + 1], r[i + 2]), r[i + 3]) for i in range(5, len(r), 4)
        )
        if admitted:
            return Decision(True, states, Reservation(reservation_id, tuple(scopes), cost, now))
        return Decision(False, states, None, retry, blocked_scope, blocked_dim)

    async def reconcile(self, reservation: Reservation, actual: Triple) -> None:
        args: list[int | str] = [
            self._now_arg(),
            reservation.id,
            *reservation.cost,
            *actual,
            self._margin,
        ]
        args.extend(scope.window_ms for scope in reservation.scopes)
        await self._run(self._reconcile, self._keys(reservation.scopes), args)

    async def peek(self, scopes: Sequence[Scope]) -> tuple[ScopeState, ...]:
        args: list[int | str] = [self._now_arg()]
        args.extend(scope.window_ms for scope in scopes)
        r = await self._run(self._peek, self._keys(scopes), args)
        return tuple(ScopeState((r[i], r[i + 1], r[i + 2]), r[i + 3]) for i in range(1, len(r), 4))

    async def reset(self, scopes: Sequence[Scope]) -> None:
        keys = [k for scope in scopes for k in scope_keys(self._prefix, scope)]
        if not keys:
            return
        async with self._guard("reset"):
            await self._client.delete(*keys)  # the cluster client splits this by slot

    async def ping(self) -> bool:
        """True if Redis answered within the timeout; never raises."""
        try:
            async with self._guard("ping"):
                return bool(await self._client.ping())
        except BackendUnavailable:
            return False

    async def aclose(self) -> None:
        if self._pipeliner is not None:
            await self._pipeliner.aclose()
        for client in (self._client, *self._also_close):
            # Closing the client of a dead server must not fail the shutdown.
            with contextlib.suppress(*_FAILURES):
                await client.aclose()
