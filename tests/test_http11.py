"""The lean HTTP/1.1 connection under httpx's pool, against a scripted loopback server."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from proxy.http11 import LeanConnection, LeanPool, LeanTransport

BIG = bytes(range(256)) * 4096  # 1 MiB: more than the read buffer, so reading pauses


class Server:
    """Answers by path; counts connections and requests."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, bytes, dict[bytes, bytes], bytes]] = []
        self.server: asyncio.Server | None = None
        self.release = asyncio.Event()

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self.release.set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *lines = head[:-4].split(b"\r\n")
                method, path, _ = line.split(b" ")
                headers = {}
                for h in lines:
                    k, _, v = h.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get(b"content-length", 0)))
                self.requests.append((method, path, headers, body))
                if not await self.answer(path.decode(), writer, body):
                    return
        except asyncio.CancelledError:
            return  # the server is closing
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def answer(self, path: str, w: asyncio.StreamWriter, body: bytes) -> bool:
        """Write the response; False closes the connection."""
        if path == "/echo":
            w.write(
                b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-a: 1\r\n\r\n%s" % (len(body), body)
            )
        elif path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await w.drain()
            await self.release.wait()  # the client must see "first" before this
            w.write(b"6\r\nsecond\r\n0\r\n\r\n")
        elif path == "/close":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await w.drain()
            return False
        elif path == "/eof-body":
            w.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
            await w.drain()
            return False
        elif path == "/cut":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
            await w.drain()
            return False
        elif path == "/nothing":
            return False
        elif path == "/hang":
            await self.release.wait()
            return False
        elif path == "/continue":
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            w.write(b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone")
        elif path == "/head":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        elif path == "/big":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BIG))
            w.write(BIG)
        elif path == "/twice":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\naHTTP/1.1 200 OK\r\n\r\n")
        elif path == "/slow":
            await asyncio.sleep(0.05)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
        await w.drain()
        return True


def client(**kw) -> httpx.AsyncClient:
    limits = kw.pop("limits", httpx.Limits(max_connections=10))
    return httpx.AsyncClient(transport=LeanTransport(limits=limits), **kw)


def pool_of(c: httpx.AsyncClient) -> LeanPool:
    return c._transport._pool  # type: ignore[attr-defined]


async def test_body_headers_and_keep_alive() -> None:
    async with Server() as s, client() as c:
        for i in range(3):
            r = await c.post(s.url + "/echo", content=b"hello %d" % i, headers={"x-b": "2"})
            assert r.status_code == 200 and r.content == b"hello %d" % i
            assert r.headers["x-a"] == "1" and r.http_version == "HTTP/1.1"
        assert s.connections == 1  # one connection, reused
        method, path, headers, _ = s.requests[0]
        assert (method, path, headers[b"x-b"]) == (b"POST", b"/echo", b"2")
        assert headers[b"host"].startswith(b"127.0.0.1:")
        (conn,) = pool_of(c).connections
        assert isinstance(conn, LeanConnection) and conn.is_idle()


async def test_chunked_body_streams_as_it_arrives() -> None:
    async with Server() as s, client() as c:
        async with c.stream("GET", s.url + "/chunked") as r:
            parts = r.aiter_raw()
            assert await anext(parts) == b"first"
            s.release.set()
            rest = b"".join([p async for p in parts])
        assert rest == b"second"
        r2 = await c.get(s.url + "/echo")
        assert r2.status_code == 200 and s.connections == 1


async def test_connection_close_and_eof_delimited_body() -> None:
    async with Server() as s, client() as c:
        assert (await c.get(s.url + "/close")).content == b"ok"
        assert (await c.get(s.url + "/eof-body")).content == b"until the end"
        assert (await c.get(s.url + "/echo")).status_code == 200
        assert s.connections == 3  # neither of the first two could be reused


async def test_server_closing_an_idle_connection_is_noticed() -> None:
    async with Server() as s, client() as c:
        await c.get(s.url + "/echo")
        (conn,) = pool_of(c).connections
        conn._proto.transport.close()  # as if the server had timed it out
        await asyncio.sleep(0.01)
        assert (await c.get(s.url + "/echo")).status_code == 200
        assert s.connections == 2


async def test_cut_body_and_no_response_are_errors() -> None:
    async with Server() as s, client() as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(s.url + "/cut")
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(s.url + "/nothing")
        assert (await c.get(s.url + "/echo")).status_code == 200


async def test_read_timeout_and_connect_error() -> None:
    async with Server() as s, client(timeout=httpx.Timeout(5, read=0.1)) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.get(s.url + "/hang")
        assert pool_of(c).connections == [] or all(
            not x.is_available() for x in pool_of(c).connections
        )
        s.release.set()
    async with Server() as s:
        url = s.url
    async with client() as c:
        with pytest.raises(httpx.ConnectError):
            await c.get(url + "/echo")


async def test_informational_response_is_skipped() -> None:
    async with Server() as s, client() as c:
        r = await c.get(s.url + "/continue")
        assert (r.status_code, r.content) == (201, b"done")


async def test_head_has_no_body_and_is_not_reused() -> None:
    async with Server() as s, client() as c:
        r = await c.head(s.url + "/head")
        assert r.status_code == 200 and r.content == b""
        await c.get(s.url + "/echo")
        assert s.connections == 2


async def test_large_body_with_flow_control() -> None:
    async with Server() as s, client() as c:
        async with c.stream("GET", s.url + "/big") as r:
            got = bytearray()
            async for part in r.aiter_raw():
                got += part
                await asyncio.sleep(0)  # a slow reader: the connection must pause and resume
        assert bytes(got) == BIG


async def test_a_second_response_spoils_the_connection() -> None:
    async with Server() as s, client() as c:
        assert (await c.get(s.url + "/twice")).content == b"a"
        assert (await c.get(s.url + "/echo")).status_code == 200
        assert s.connections == 2


async def test_header_injection_is_refused() -> None:
    async with Server() as s, client() as c:
        req = c.build_request("GET", s.url + "/echo")
        req.headers._list.append((b"x-evil", b"x-evil", b"a\r\nx-injected: 1"))  # as raw bytes
        with pytest.raises(httpx.LocalProtocolError):
            await c.send(req)
        assert s.requests == []


async def test_concurrency_is_bounded_by_max_connections() -> None:
    async with Server() as s, client(limits=httpx.Limits(max_connections=4)) as c:
        rs = await asyncio.gather(*(c.get(s.url + "/slow") for _ in range(20)))
        assert all(r.content == b"slow" for r in rs)
        assert s.connections <= 4
        assert len(pool_of(c).connections) <= 4


async def test_cancelled_request_frees_its_connection() -> None:
    async with Server() as s, client(limits=httpx.Limits(max_connections=1)) as c:
        task = asyncio.create_task(c.get(s.url + "/hang"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        r = await asyncio.wait_for(c.get(s.url + "/echo"), 5)
        assert r.status_code == 200
        s.release.set()


async def test_https_origins_keep_httpcore_connections() -> None:
    import httpcore

    pool = LeanPool()
    conn = pool.create_connection(httpcore.Origin(b"https", b"example.invalid", 443))
    assert not isinstance(conn, LeanConnection)
    lean = pool.create_connection(httpcore.Origin(b"http", b"127.0.0.1", 80))
    assert isinstance(lean, LeanConnection)
    await pool.aclose()


async def test_idle_connections_expire_and_other_origins_get_room() -> None:
    limits = httpx.Limits(max_connections=1, keepalive_expiry=0.05)
    async with Server() as a, Server() as b, client(limits=limits) as c:
        await c.get(a.url + "/echo")
        await c.get(b.url + "/echo")  # the idle connection to a is closed to make room
        await asyncio.sleep(1.1)  # past the expiry and the next sweep
        await c.get(b.url + "/echo")
        assert (a.connections, b.connections) == (1, 2)
        assert len(pool_of(c).connections) == 1
