"""One record per HTTP request (id, key, outcome, reservation, timings), read at its end by
the access log, the metrics and the refusal buffer; an ASGI middleware creates and finishes it."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import (
    LimiterUnavailable,
    ProxyError,
    RateLimited,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .limiter import Admission

log = logging.getLogger("proxy")

MAX_REQUEST_ID = 128
REQUEST_ID = "x-request-id"
_REQUEST_ID_RAW = REQUEST_ID.encode()
SCOPE_KEY = "proxy.request_id"  # the id in the ASGI scope, for the outermost error handler

_ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class Exchange:
    """What happened to one request; filled in along the request path, read once at the end."""

    __slots__ = (
        "admission",
        "decision_s",
        "end",
        "endpoint",
        "error",
        "failed",
        "key",
        "method",
        "model",
        "outcome",
        "path",
        "request_id",
        "start",
        "status",
        "stream",
        "stream_end",
        "upstream",
        "upstream_s",
        "wall",
    )

    def __init__(self, request_id: str, method: str, path: str) -> None:
        self.request_id = request_id
        self.method = method
        self.path = path
        self.wall = time.time()
        self.start = time.perf_counter()
        self.end = 0.0
        # "chat" | "completions" | "embeddings" | "passthrough" for the API, "admin" for admin
        # actions; None for probes, scrapes and the page (neither logged nor counted).
        self.endpoint: str | None = _ENDPOINTS.get(path) or (
            "passthrough" if path.startswith("/v1/") else None
        )
        self.key: str | None = None  # the key's configured name once authenticated
        self.model: str | None = None
        self.status: int | None = None
        self.error: ProxyError | None = None  # the error the proxy answered with
        self.failed: str | None = None  # an unexpected exception's type name
        self.admission: Admission | None = None
        self.upstream: str | None = None
        self.upstream_s: float | None = None  # time to the upstream's response headers
        self.decision_s: float | None = None  # the limiter's reserve call
        self.stream = False
        self.stream_end: str | None = None  # completed | client_gone | upstream_error | incomplete
        self.outcome = "-"

    @property
    def total_s(self) -> float:
        return self.end - self.start

    def reserved(self) -> tuple[int, int, int] | None:
        a = self.admission
        return a.reservation.cost if a is not None and a.reservation is not None else None

    def charged(self) -> tuple[int, int, int] | None:
        a = self.admission
        if a is None:
            return None
        if a.charged is not None:
            return a.charged
        # Never settled (passthrough): the reservation itself is the charge.
        return a.reservation.cost if a.reservation is not None else None


# A dummy for code run outside the middleware (direct calls in tests): writes go nowhere useful.
_NOWHERE = Exchange("-", "-", "-")
_CURRENT: contextvars.ContextVar[Exchange] = contextvars.ContextVar("exchange", default=_NOWHERE)


def current() -> Exchange:
    """The record of the request being handled by this task."""
    return _CURRENT.get()


def outcome_of(ex: Exchange) -> str:
    err = ex.error
    if err is not None:
        if isinstance(err, RateLimited):
            return "limited_" + err.type  # limited_requests / _input_tokens / _output_tokens
        if isinstance(err, Unauthorized):
            return "auth_failure"
        if isinstance(err, UpstreamUnreachable | UpstreamTimeout):
            return "upstream_error"
        if isinstance(err, LimiterUnavailable):
            return "backend_unavailable"
        return "bad_request" if err.status < 500 else "error"
    if ex.failed is not None:
        return "error"
    if ex.admission is not None:
        status = ex.status or 500
        if status >= 500 or ex.stream_end == "upstream_error":
            return "upstream_error"
        return "admitted"
    return "-"


def _printable(value: str) -> bool:
    return all(" " <= ch <= "~" for ch in value)


def request_id_of(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The client's ``x-request-id`` if it is printable ASCII (cut to a bounded length), else a
    new random one."""
    for k, v in headers:
        if k == _REQUEST_ID_RAW:
            value = v[:MAX_REQUEST_ID].decode("latin-1").strip()
            if value and _printable(value):
                return value
            break
    return os.urandom(8).hex()


Finisher = Callable[[Exchange], None]


class InFlight:
    """The requests being handled by this process, for reload and shutdown to wait on."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests: set[Exchange] = set()

    def __len__(self) -> int:
        return len(self.requests)

    def started_before(self, t: float) -> bool:
        """Is any request that started before ``t`` (``time.perf_counter``) still in flight?"""
        return any(ex.start < t for ex in self.requests)

    async def drained(self, timeout: float, poll: float = 0.05) -> bool:
        """Wait until nothing is in flight, at most ``timeout`` seconds; True if drained."""
        deadline = time.perf_counter() + timeout
        while self.requests and time.perf_counter() < deadline:
            await asyncio.sleep(poll)
        return not self.requests


class ExchangeMiddleware:
    """Creates the record, echoes the request id on every response, tracks requests in flight,
    and hands each finished record to the finishers (cheap, synchronous, never raising)."""

    def __init__(
        self,
        app: Any,
        finishers: Sequence[Finisher] = (),
        on_stream: Callable[[int], None] | None = None,
        inflight: InFlight | None = None,
    ) -> None:
        self.app = app
        self.finishers = tuple(finishers)
        self.on_stream = on_stream
        self.inflight = (inflight if inflight is not None else InFlight()).requests

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = Exchange(request_id_of(scope["headers"]), scope["method"], scope["path"])
        scope[SCOPE_KEY] = ex.request_id
        rid = (_REQUEST_ID_RAW, ex.request_id.encode("latin-1"))
        stream_open = False

        async def send_with_id(message: Any) -> None:
            nonlocal stream_open
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), rid]}
                if ex.stream and self.on_stream is not None:
                    stream_open = True
                    self.on_stream(1)
            await send(message)

        token = _CURRENT.set(ex)
        self.inflight.add(ex)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if ex.error is None:
                ex.failed = type(exc).__name__
            if ex.status is None:
                ex.status = 500
            raise
        except BaseException:
            # Cancelled: the client went away, or shutdown ended the grace period.
            if ex.status is None:
                ex.status = 499
            raise
        finally:
            _CURRENT.reset(token)
            self.inflight.discard(ex)
            if stream_open and self.on_stream is not None:
                self.on_stream(-1)
            ex.end = time.perf_counter()
            ex.outcome = outcome_of(ex)
            for finish in self.finishers:
                try:
                    finish(ex)
                except Exception:
                    log.exception("recording a finished request failed")
