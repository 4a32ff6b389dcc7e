"""A minimal HTTP/1.1 keep-alive client on asyncio streams, just enough for load generation.

General clients spend tens of microseconds per request on features a load generator never uses;
this one writes a pre-built request and parses the status line, headers and a content-length,
chunked or read-to-EOF body. Server-sent events are counted as they arrive, not kept.
"""

from __future__ import annotations

import asyncio
import time

from loadtest.classify import SseCounter

_HEADER_END = b"\r\n\r\n"
_CRLF = b"\r\n"
_READ_SIZE = 65536


class NoResponse(Exception):
    """The connection failed before any response byte arrived: safe to retry elsewhere."""


class ConnectFailed(NoResponse):
    """The TCP connection could not be opened."""


class BadResponse(Exception):
    """The response started but was cut off or malformed: not retried (it may have executed)."""


class Response:
    __slots__ = ("body", "bytes_in", "first_byte", "headers", "keep_alive", "sse", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.keep_alive = True
        self.first_byte = 0.0  # monotonic time of the first body byte (headers, if no body)
        self.bytes_in = 0
        self.body = b""  # kept for JSON bodies; empty for event streams
        self.sse: SseCounter | None = None


class Connection:
    __slots__ = ("reader", "reused", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False  # True once a response came back on it

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except OSError as e:
            raise ConnectFailed(f"connect {host}:{port}: {e}") from e
        return cls(reader, writer)

    def close(self, graceful: bool = False) -> None:
        """Graceful (FIN) for idle connections at the end; otherwise abort (RST), so a
        failed or timed-out exchange leaves nothing lingering on either side."""
        transport = self.writer.transport
        if transport.is_closing():
            return
        if graceful:
            transport.close()
        else:
            transport.abort()

    async def exchange(self, request: bytes) -> Response:
        """Send ``request`` and read one complete response."""
        reader = self.reader
        try:
            self.writer.write(request)
            await self.writer.drain()
            head = await reader.readuntil(_HEADER_END)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise BadResponse("connection closed inside the response head") from e
            raise NoResponse("connection closed before any response byte") from e
        except (ConnectionError, OSError) as e:
            raise NoResponse(f"connection failed before any response byte: {e}") from e
        except asyncio.LimitOverrunError as e:
            raise BadResponse("response head too large") from e
        resp = Response()
        resp.bytes_in = len(head)
        try:
            _parse_head(head, resp)
            await _read_body(reader, resp)
        except asyncio.IncompleteReadError as e:
            raise BadResponse("connection closed inside the response body") from e
        except (ConnectionError, OSError) as e:
            raise BadResponse(f"connection failed inside the response: {e}") from e
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise BadResponse(f"malformed response: {e}") from e
        self.reused = True
        return resp


def _parse_head(head: bytes, resp: Response) -> None:
    lines = head[:-4].split(_CRLF)
    status_line = lines[0]
    if not status_line.startswith(b"HTTP/1."):
        raise ValueError(f"bad status line {status_line[:40]!r}")
    resp.status = int(status_line[9:12])
    headers = resp.headers
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    conn = headers.get(b"connection", b"").lower()
    resp.keep_alive = conn != b"close" if status_line[7:8] == b"1" else conn == b"keep-alive"


async def _read_body(reader: asyncio.StreamReader, resp: Response) -> None:
    headers = resp.headers
    sse = (
        SseCounter() if headers.get(b"content-type", b"").startswith(b"text/event-stream") else None
    )
    resp.sse = sse
    if resp.status in (204, 304) or 100 <= resp.status < 200:
        resp.first_byte = time.monotonic()
        return
    if headers.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
        await _read_chunked(reader, resp, sse)
        return
    length = headers.get(b"content-length")
    if length is not None:
        n = int(length)
        if n == 0:
            resp.first_byte = time.monotonic()
            return
        if sse is None:
            resp.body = await reader.readexactly(n)
            resp.first_byte = time.monotonic()
            resp.bytes_in += n
            return
        while n > 0:
            data = await reader.read(min(n, _READ_SIZE))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            _take(resp, sse, data)
            n -= len(data)
        return
    # Neither length nor chunked: the body runs to EOF and the connection cannot be reused.
    resp.keep_alive = False
    parts = []
    while data := await reader.read(_READ_SIZE):
        if sse is None:
            parts.append(data)
        _take(resp, sse, data)
    resp.body = b"".join(parts)
    if not resp.first_byte:
        resp.first_byte = time.monotonic()


async def _read_chunked(
    reader: asyncio.StreamReader, resp: Response, sse: SseCounter | None
) -> None:
    parts = []
    while True:
        size_line = await reader.readuntil(_CRLF)
        size = int(size_line.split(b";", 1)[0], 16)
        resp.bytes_in += len(size_line)
        if size == 0:
            # Trailers (normally none), then the blank line that ends the message.
            while (line := await reader.readuntil(_CRLF)) != _CRLF:
                resp.bytes_in += len(line)
            resp.bytes_in += 2
            break
        data = await reader.readexactly(size + 2)
        if data[-2:] != _CRLF:
            raise ValueError("chunk not followed by CRLF")
        resp.bytes_in += 2
        data = data[:-2]
        if sse is None:
            parts.append(data)
        _take(resp, sse, data)
    if sse is None:
        resp.body = b"".join(parts)
    if not resp.first_byte:
        resp.first_byte = time.monotonic()


def _take(resp: Response, sse: SseCounter | None, data: bytes) -> None:
    if not resp.first_byte:
        resp.first_byte = time.monotonic()
    resp.bytes_in += len(data)
    if sse is not None:
        sse.feed(data)
