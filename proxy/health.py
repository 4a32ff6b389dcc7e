"""``GET /readyz``: 200 when the configuration is loaded and the limiter backend answers a ping;
upstream reachability (a TCP connect) is reported but does not decide readiness."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response

from .config import HttpUpstream
from .metrics import record_backend_error

PING_TIMEOUT_S = 1.0
CONNECT_TIMEOUT_S = 1.0


async def _backend_ok(request: Request) -> bool:
    backend = request.app.state.node.backend
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            ok = bool(await backend.ping())
    except Exception:
        ok = False
    if not ok:
        record_backend_error("ping")
    return ok


async def _reachable(cfg: object) -> bool:
    if not isinstance(cfg, HttpUpstream):
        return True  # the built-in mock lives in this process
    url = urlsplit(cfg.base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(url.hostname, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


async def readyz(request: Request) -> Response:
    snap = request.app.state.node.snapshot
    names = list(snap.config.upstreams)
    backend_ok, *reach = await asyncio.gather(
        _backend_ok(request), *(_reachable(snap.config.upstreams[n]) for n in names)
    )
    body = {
        "status": "ready" if backend_ok else "unavailable",
        "config": {"loaded": True, "keys": len(snap.config.keys)},
        "backend": {"type": snap.config.backend.type, "reachable": backend_ok},
        "upstreams": {n: {"reachable": ok} for n, ok in zip(names, reach, strict=True)},
    }
    return Response(orjson.dumps(body), 200 if backend_ok else 503, media_type="application/json")
