"""A lean HTTP/1.1 connection under httpx's connection pool, for plain-http upstreams: httpx
keeps its API, timeouts and errors; below its pool, one write per request and no polling."""

# Why: httpx's stock stack writes a request's head and body in two writes (each a wake-up of
# the upstream), polls every pooled socket on every request, and re-scans the pool
# quadratically when a request starts or ends; on a small machine that cost more CPU than the
# rest of a proxied request. One connection here is an asyncio protocol with httptools parsing;
# the pool's bookkeeping is linear. https origins keep httpcore's own connection.

from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable
from typing import Any

import httpcore
import httptools
import httpx

_CRLF = b"\r\n"
_READ_HIGH_WATER = 256 * 1024  # buffered body bytes before reading from the socket pauses
_NEW, _ACTIVE, _IDLE, _CLOSED = range(4)


class _Protocol(asyncio.Protocol):
    """Parses responses on one connection; a coroutine waits for the head and the body."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.spoiled = False  # bytes arrived that belong to no request: never reuse
        self.can_write: asyncio.Future | None = None
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.framed = False  # content-length or chunked: EOF before the end is an error
        self.error: BaseException | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpcore.RemoteProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(httpcore.RemoteProtocolError(f"malformed response: {exc}"))

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)
        if self.complete or self.error is not None:
            self._wake()
            return
        if self.head_done and not self.framed:
            self.complete = True  # a body delimited by the end of the connection
            self._wake()
        elif self.head_done:
            self._fail(httpcore.RemoteProtocolError("peer closed connection mid-body"))
        else:
            self._fail(httpcore.RemoteProtocolError("Server disconnected without a response."))

    def pause_writing(self) -> None:
        self.can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)
        self.can_write = None

    # -- httptools callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            # A second response to one request (no pipelining here): the stream is unusable.
            self.spoiled = True
            if self.transport is not None:
                self.transport.close()

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value):
            self.framed = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # Informational (100 Continue ...): not the response; the real one follows.
            self.headers, self.reason, self.framed = [], b"", False
            return
        self.status = status
        self.head_done = True
        self.keep_alive = self.parser.should_keep_alive()  # valid until the message ends
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.status == 0 or self.complete:
            return
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self.complete:
            return  # the end of an informational (or unsolicited) response
        self.complete = True
        self._wake()

    # -- waiting -----------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, timeout: float | None, what: str) -> None:
        """Until the next event (head, body, end or error), or raise ReadTimeout."""
        w = self.waiter = self.loop.create_future()
        handle = None
        if timeout is not None:
            handle = self.loop.call_later(timeout, _expire, w, what)
        try:
            await w
        finally:
            self.waiter = None
            if handle is not None:
                handle.cancel()

    def take(self) -> bytes:
        """Everything buffered, as one chunk: a reader that fell behind catches up in one step
        (one event relayed, one write) instead of one per segment that arrived."""
        body = self.body
        chunk = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk


def _expire(waiter: asyncio.Future, what: str) -> None:
    if not waiter.done():
        waiter.set_exception(httpcore.ReadTimeout(f"timed out waiting for the {what}"))


class _Body:
    """The response body for httpcore's pool: chunks as they arrive; closing frees the
    connection (kept alive if the response ended cleanly)."""

    __slots__ = ("_conn", "_read_timeout")

    def __init__(self, conn: LeanConnection, read_timeout: float | None) -> None:
        self._conn = conn
        self._read_timeout = read_timeout

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        proto = self._conn._proto
        while True:
            if proto.body:
                return proto.take()
            if proto.error is not None:
                raise proto.error
            if proto.complete:
                raise StopAsyncIteration
            await proto.wait(self._read_timeout, "response body")

    async def aclose(self) -> None:
        self._conn._response_closed()


class LeanConnection(httpcore.AsyncConnectionInterface):
    """One keep-alive HTTP/1.1 connection to one plain-http origin."""

    def __init__(
        self,
        origin: httpcore.Origin,
        keepalive_expiry: float | None,
        on_idle: Callable[[LeanConnection], None] | None = None,
    ) -> None:
        self._origin = origin
        self._key = (origin.scheme, origin.host, origin.port)  # Origin is not hashable
        self._on_idle = on_idle
        self._keepalive_expiry = keepalive_expiry
        self._state = _NEW
        self._proto: _Protocol = None  # type: ignore[assignment]
        self._expire_at: float | None = None
        self._requests = 0
        self._keep = True

    async def _connect(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        host = self._origin.host.decode("ascii")
        try:
            async with asyncio.timeout(timeout):
                _, proto = await loop.create_connection(
                    lambda: _Protocol(loop), host, self._origin.port
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"connect to {host}:{self._origin.port}") from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = proto.transport.get_extra_info("socket")  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._proto = proto

    async def handle_async_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._state == _IDLE and self._proto.lost:
            self._state = _CLOSED
        if self._state not in (_NEW, _IDLE):
            raise httpcore.ConnectionNotAvailable()
        fresh = self._state == _NEW
        self._state = _ACTIVE
        self._expire_at = None
        self._requests += 1
        timeouts = request.extensions.get("timeout", {})
        try:
            if fresh:
                await self._connect(timeouts.get("connect"))
            proto = self._proto
            proto.reset()
            head = _head(request)
            stream = request.stream
            if isinstance(stream, httpx.ByteStream):
                body = b"".join(stream)
            else:
                body = b"".join([part async for part in stream])  # type: ignore[union-attr]
            if proto.lost:
                raise httpcore.WriteError("the connection was closed")
            # One write for head and body: one wake-up of the upstream, one segment.
            if len(body) <= 65536:
                proto.transport.write(head + body)  # type: ignore[union-attr]
            else:
                proto.transport.writelines((head, body))  # type: ignore[union-attr]
            if proto.can_write is not None:
                try:
                    async with asyncio.timeout(timeouts.get("write")):
                        await proto.can_write
                except TimeoutError as exc:
                    raise httpcore.WriteTimeout("timed out sending the request") from exc
            read_timeout = timeouts.get("read")
            while not proto.head_done:
                if proto.error is not None:
                    raise proto.error
                await proto.wait(read_timeout, "response headers")
            self._keep = request.method != b"HEAD" and proto.keep_alive
            if request.method == b"HEAD":
                proto.complete = True  # no body follows, whatever the headers say
            return _response(
                proto.status,
                proto.headers,
                _Body(self, read_timeout),
                {"http_version": b"HTTP/1.1", "reason_phrase": proto.reason},
            )
        except BaseException:
            self._close()
            raise

    def _response_closed(self) -> None:
        proto = self._proto
        if self._state != _ACTIVE:
            return
        reusable = proto.complete and not proto.body and proto.error is None
        if reusable and self._keep and not proto.lost and not proto.spoiled:
            self._state = _IDLE
            if self._keepalive_expiry is not None:
                self._expire_at = time.monotonic() + self._keepalive_expiry
            if self._on_idle is not None:
                self._on_idle(self)
        else:
            self._close()

    def _close(self) -> None:
        self._state = _CLOSED
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def aclose(self) -> None:
        self._close()

    def can_handle_request(self, origin: httpcore.Origin) -> bool:
        return origin == self._origin

    def is_available(self) -> bool:
        return self._state == _IDLE

    def has_expired(self) -> bool:
        if self._state != _IDLE:
            return False
        if self._proto.lost or self._proto.spoiled:
            return True
        return self._expire_at is not None and time.monotonic() > self._expire_at

    def is_idle(self) -> bool:
        return self._state == _IDLE

    def is_closed(self) -> bool:
        return self._state == _CLOSED

    def info(self) -> str:
        state = ("NEW", "ACTIVE", "IDLE", "CLOSED")[self._state]
        return f"HTTP/1.1, {state}, Request Count: {self._requests}"

    def __repr__(self) -> str:
        return f"<LeanConnection [{self._origin}, {self.info()}]>"


def _make_response(
    status: int, headers: list[tuple[bytes, bytes]], body: Any, extensions: dict
) -> httpcore.Response:
    """httpcore.Response without re-validating what the parser produced (bytes headers, an
    async body): its checks cost more than the rest of building a response."""
    r = httpcore.Response.__new__(httpcore.Response)
    r.status, r.headers, r.stream, r.extensions = status, headers, body, extensions
    r._stream_consumed = False
    return r


def _response_builder() -> Callable[..., httpcore.Response]:
    # Only if this httpcore's Response holds exactly these attributes; else its constructor.
    stock = httpcore.Response(200, headers=[(b"a", b"b")], content=b"", extensions={})
    fast = _make_response(200, [(b"a", b"b")], b"", {})
    if vars(stock).keys() == vars(fast).keys():
        return _make_response
    return lambda status, headers, body, extensions: httpcore.Response(
        status, headers=headers, content=body, extensions=extensions
    )


_response = _response_builder()


def _head(request: httpcore.Request) -> bytes:
    headers = request.headers
    parts = [request.method, b" ", request.url.target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, _CRLF)
    parts.append(_CRLF)
    head = b"".join(parts)
    # Exactly one CR and one LF per line: no header can smuggle in a line of its own.
    lines = len(headers) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise httpcore.LocalProtocolError("a header name or value holds CR or LF")
    return head


def _assign(pool_request: Any, conn: httpcore.AsyncConnectionInterface) -> None:
    """``pool_request.assign_to_connection(conn)``, without waking a waiter that is not there:
    the stock call sets an anyio event, which is built (library detection included) on first
    use. A request assigned before it waits never waits: it finds its connection set."""
    event = getattr(pool_request, "_connection_acquired", None)
    if getattr(event, "_backend", None) == "" and hasattr(pool_request, "connection"):
        pool_request.connection = conn
    else:
        pool_request.assign_to_connection(conn)


class LeanPool(httpcore.AsyncConnectionPool):
    """httpcore's pool with lean connections for http:// and cheap bookkeeping.

    Only ``create_connection`` and the pool's private bookkeeping are replaced, so everything
    that hooks the pool's ``handle_async_request`` (respx in the tests) still sees every
    request. Idle lean connections wait on a stack per origin (the most recently used is reused
    first); closed and expired ones are swept once a second, not on every request."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._idle: dict[tuple[bytes, bytes, int], list[LeanConnection]] = {}
        self._others: list[httpcore.AsyncConnectionInterface] = []  # httpcore's own (https)
        self._next_sweep = 0.0

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        if origin.scheme == b"http" and self._uds is None and self._proxy is None:
            return LeanConnection(origin, self._keepalive_expiry, self._push_idle)
        conn = super().create_connection(origin)
        self._others.append(conn)
        return conn

    def _push_idle(self, conn: LeanConnection) -> None:
        self._idle.setdefault(conn._key, []).append(conn)

    def _take(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface | None:
        stack = self._idle.get((origin.scheme, origin.host, origin.port))
        while stack:
            conn = stack.pop()
            if conn.is_available() and not conn.has_expired():
                return conn
        for conn in self._others:
            if conn.can_handle_request(origin) and conn.is_available():
                return conn
        return None

    def _sweep(self) -> list[httpcore.AsyncConnectionInterface]:
        """Drop closed connections, close expired and surplus idle ones, rebuild the stacks."""
        closing: list[httpcore.AsyncConnectionInterface] = []
        kept: list[httpcore.AsyncConnectionInterface] = []
        idle = 0
        for conn in self._connections:
            if conn.is_closed():
                continue
            if conn.has_expired():
                closing.append(conn)
                continue
            if conn.is_idle():
                idle += 1
                if idle > self._max_keepalive_connections:
                    closing.append(conn)
                    continue
            kept.append(conn)
        self._connections = kept
        self._others = [c for c in self._others if c in kept]
        stacks: dict[tuple[bytes, bytes, int], list[LeanConnection]] = {}
        for conn in kept:
            if isinstance(conn, LeanConnection) and conn.is_available():
                stacks.setdefault(conn._key, []).append(conn)
        self._idle = stacks
        return closing

    def _assign_requests_to_connections(self) -> list[httpcore.AsyncConnectionInterface]:
        closing: list[httpcore.AsyncConnectionInterface] = []
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            closing = self._sweep()
        for pool_request in self._requests:
            if not pool_request.is_queued():
                continue
            origin = pool_request.request.url.origin
            conn = self._take(origin)
            if conn is None:
                if len(self._connections) >= self._max_connections:
                    closing += self._sweep()  # closed connections may leave room
                if len(self._connections) < self._max_connections:
                    conn = self.create_connection(origin)
                    self._connections.append(conn)
                else:
                    # Full: make room by closing an idle connection to another origin (an
                    # idle one to this origin was taken above, or was just assigned).
                    spare = next(
                        (
                            c
                            for c in self._connections
                            if c.is_idle() and not c.can_handle_request(origin)
                        ),
                        None,
                    )
                    if spare is None:
                        continue  # wait until a connection is released
                    self._connections.remove(spare)
                    closing.append(spare)
                    conn = self.create_connection(origin)
                    self._connections.append(conn)
            _assign(pool_request, conn)
        return closing

    async def _close_connections(self, closing: list[httpcore.AsyncConnectionInterface]) -> None:
        if closing:  # the stock one enters a cancel-shield scope even for nothing to close
            await super()._close_connections(closing)

    async def aclose(self) -> None:
        self._idle = {}
        self._others = []
        await super().aclose()


class LeanTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over ``LeanPool``."""

    def __init__(self, limits: httpx.Limits = httpx.Limits(), **kw: Any) -> None:  # noqa: B008
        super().__init__(limits=limits, **kw)
        stock = self._pool
        self._pool = LeanPool(
            ssl_context=stock._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
        )
