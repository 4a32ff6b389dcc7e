"""Redis memory per admitted request: reserve N requests over K API keys on a private server.

Run from the repository root: ``python -m loadtest.redis_memory [--requests N] [--keys K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.backends.base import UNLIMITED, Scope
from proxy.backends.redis import RedisBackend, RedisSettings, scope_keys
from tests.servers import RedisServer

U = UNLIMITED
CONCURRENCY = 64


def scopes_for(key: int, window_ms: int) -> list[Scope]:
    tag = f"team-{key}"
    return [
        Scope(tag, "k", (U, U, U), window_ms),
        Scope(tag, "m:gpt-4o-mini", (U, U, U), window_ms),
    ]


async def measure(server: RedisServer, requests: int, keys: int, window_ms: int) -> dict:
    backend = RedisBackend.from_settings(RedisSettings(url=server.url, timeout_ms=10_000))
    admin = server.client()
    try:
        warm = [Scope("warm-up", "k", (U, U, U), window_ms)]
        await backend.reserve(warm, (1, 1, 1), "warm")  # loads the script, opens connections
        await backend.reset(warm)
        before = admin.info("memory")["used_memory"]

        async def one(i: int) -> None:
            d = await backend.reserve(
                scopes_for(i % keys, window_ms), (1, 500, 256), uuid.uuid4().hex
            )
            assert d.admitted

        for start in range(0, requests, CONCURRENCY):
            await asyncio.gather(
                *(one(i) for i in range(start, min(start + CONCURRENCY, requests)))
            )
        after = admin.info("memory")["used_memory"]
        z, c, u = scope_keys("rl", scopes_for(0, window_ms)[0])
        per_scope = {k[-1]: admin.memory_usage(k, samples=0) for k in (z, c, u)}
        return {
            "delta": after - before,
            "per_scope": per_scope,
            "encodings": (admin.object("encoding", z), admin.object("encoding", c)),
            "entries_per_scope": admin.zcard(z),
            "keys": admin.dbsize(),
        }
    finally:
        admin.close()
        await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=20, help="distinct API keys")
    parser.add_argument("--window-ms", type=int, default=60_000)
    args = parser.parse_args()
    with RedisServer() as server:
        r = asyncio.run(measure(server, args.requests, args.keys, args.window_ms))
        info = server.client().info("server")
        version = info.get("valkey_version") or info.get("redis_version")
    per_request = r["delta"] / args.requests
    scope_bytes = sum(r["per_scope"].values())
    print(
        f"server {Path(server.binary).name} {version}; {args.requests} requests over "
        f"{args.keys} keys, 2 scopes each ({r['entries_per_scope']} entries per scope, "
        f"{r['keys']} Redis keys, zset/hash encoding {r['encodings'][0]}/{r['encodings'][1]})"
    )
    print(f"used_memory delta: {r['delta']} bytes = {per_request:.0f} bytes per admitted request")
    print(
        f"MEMORY USAGE of one scope: z={r['per_scope']['z']} c={r['per_scope']['c']} "
        f"u={r['per_scope']['u']} = {scope_bytes / r['entries_per_scope']:.0f} bytes "
        "per entry per scope"
    )


if __name__ == "__main__":
    main()
