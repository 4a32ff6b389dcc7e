"""The admin API (keys, their limits and live usage, reset, recent 429s) and the usage page.

Enabled by ``admin: {token_env: ...}``; every JSON route needs ``Authorization: Bearer <token>``.
Without the section every admin URL is an unknown URL (404). The page itself is static and
public; it asks for the token and sends it with each call. Usage is read from the backend, so
with Redis it is the usage shared by all nodes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections import deque
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .backends.base import UNLIMITED, BackendUnavailable, Scope, ScopeState
from .config import constant_time_equal
from .errors import LimiterUnavailable, NotFound, RateLimited, Unauthorized
from .exchange import Exchange, current
from .limiter import KeyPolicy
from .metrics import record_backend_error

_DIMS = ("requests", "input_tokens", "output_tokens")
_MAX_MODEL = 200


class Refusals:
    """The latest 429s of this node, newest last (a bounded ring buffer)."""

    def __init__(self, size: int = 100) -> None:
        self.items: deque[dict[str, Any]] = deque(maxlen=size)

    def finish(self, ex: Exchange) -> None:
        err = ex.error
        if not isinstance(err, RateLimited):
            return
        retry = err.headers.get("retry-after-ms")
        self.items.append(
            {
                "time": datetime.fromtimestamp(ex.wall, UTC).isoformat(timespec="milliseconds"),
                "key": ex.key,
                "model": ex.model[:_MAX_MODEL] if ex.model else ex.model,
                "dimension": err.type,
                "retry_after_ms": int(retry) if retry is not None else None,
            }
        )


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(data),
        status,
        headers={"cache-control": "no-store"},
        media_type="application/json",
    )


def _enabled(request: Request) -> str:
    admin = request.app.state.node.snapshot.config.admin
    if admin is None or not admin.token:
        raise NotFound(f"Unknown request URL: {request.method} {request.url.path}.")
    return admin.token


def _authorize(request: Request) -> None:
    token = _enabled(request)
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not constant_time_equal(given.strip(), token):
        raise Unauthorized(
            "The admin API needs the admin token: Authorization: Bearer <admin token>.",
            headers={"www-authenticate": "Bearer"},
        )


def _limits(scope: Scope) -> dict[str, int | None]:
    return {d: (v if v != UNLIMITED else None) for d, v in zip(_DIMS, scope.limits, strict=True)}


def _scope_view(scope: Scope, state: ScopeState) -> dict[str, Any]:
    return {
        "limits": _limits(scope),
        "usage": dict(zip(_DIMS, state.used, strict=True)),
        "reset_ms": state.reset_ms,
    }


async def _key_view(request: Request, policy: KeyPolicy, window_s: float) -> dict[str, Any]:
    scopes = policy.all_scopes()
    states: tuple[ScopeState, ...] = ()
    if scopes:
        try:
            states = await request.app.state.node.backend.peek(scopes)
        except BackendUnavailable as exc:
            record_backend_error("peek")
            raise LimiterUnavailable("The rate limiter's storage is unavailable.") from exc
    by_scope = dict(zip(scopes, states, strict=True))
    view: dict[str, Any] = {"name": policy.name, "window_s": window_s}
    if policy.key_scope is not None:
        view.update(_scope_view(policy.key_scope, by_scope[policy.key_scope]))
    else:
        view.update({"limits": dict.fromkeys(_DIMS), "usage": None, "reset_ms": None})
    view["models"] = [
        {"model": model, **_scope_view(scope, by_scope[scope])}
        for model, scope in policy.model_scopes.items()
    ]
    return view


def _policy(request: Request) -> KeyPolicy:
    name = request.path_params["name"]
    for policy in request.app.state.node.snapshot.policies.values():
        if policy.name == name:
            return policy
    raise NotFound(f"No key named {name!r}.")


async def list_keys(request: Request) -> Response:
    _authorize(request)
    snap = request.app.state.node.snapshot
    views = await asyncio.gather(
        *(_key_view(request, p, snap.config.window_s) for p in snap.policies.values())
    )
    return _json({"window_s": snap.config.window_s, "keys": list(views)})


async def get_key(request: Request) -> Response:
    _authorize(request)
    snap = request.app.state.node.snapshot
    return _json(await _key_view(request, _policy(request), snap.config.window_s))


async def reset_key(request: Request) -> Response:
    _authorize(request)
    policy = _policy(request)
    ex = current()
    ex.endpoint, ex.key = "admin", policy.name  # an admin action: access-logged
    try:
        await request.app.state.node.backend.reset(policy.all_scopes())
    except BackendUnavailable as exc:
        record_backend_error("reset")
        raise LimiterUnavailable("The rate limiter's storage is unavailable.") from exc
    return _json({"reset": policy.name})


async def recent_429s(request: Request) -> Response:
    _authorize(request)
    items = list(request.app.state.refusals.items)
    items.reverse()  # newest first
    return _json({"refusals": items})


def _inline_sources(page: bytes, tag: str) -> str:
    """CSP sources allowing exactly the page's own inline ``<tag>`` blocks."""
    bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S)
    digests = [base64.b64encode(hashlib.sha256(b).digest()).decode() for b in bodies]
    return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"


def _load_page() -> tuple[bytes, str]:
    page = (resources.files("proxy") / "static" / "admin.html").read_bytes()
    csp = (
        f"default-src 'none'; script-src {_inline_sources(page, 'script')}; "
        f"style-src {_inline_sources(page, 'style')}; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return page, csp


_PAGE: tuple[bytes, str] | None = None


async def page(request: Request) -> Response:
    _enabled(request)
    global _PAGE
    if _PAGE is None:
        _PAGE = _load_page()
    body, csp = _PAGE
    return Response(
        body,
        headers={
            "content-security-policy": csp,
            "cache-control": "no-store",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
        },
        media_type="text/html; charset=utf-8",
    )


def routes() -> list[Route]:
    return [
        Route("/admin/", page, methods=["GET"]),
        Route("/admin/keys", list_keys, methods=["GET"]),
        Route("/admin/keys/{name:str}", get_key, methods=["GET"]),
        Route("/admin/keys/{name:str}/reset", reset_key, methods=["POST"]),
        Route("/admin/recent-429s", recent_429s, methods=["GET"]),
    ]
