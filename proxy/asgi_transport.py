"""An httpx transport that calls an in-process ASGI app and streams its response body.

httpx's own ASGITransport collects the whole body before returning, which would turn the
built-in mock's streams into one burst; this one hands chunks over as the app sends them, with
a small queue for back-pressure, and cancels the app when the response is closed early.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

_END = object()


class _Body(httpx.AsyncByteStream):
    def __init__(self, queue: asyncio.Queue, task: asyncio.Task, gone: asyncio.Event) -> None:
        self._queue = queue
        self._task = task
        self._gone = gone

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise httpx.ReadError("the upstream closed the connection mid-response") from item
            yield item

    async def aclose(self) -> None:
        self._gone.set()
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class StreamingASGITransport(httpx.AsyncBaseTransport):
    def __init__(self, app: Any, queue_size: int = 16) -> None:
        self.app = app
        self.queue_size = queue_size

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([part async for part in request.stream])  # type: ignore[union-attr]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port or 80),
            "client": ("127.0.0.1", 0),
            "root_path": "",
        }
        queue: asyncio.Queue = asyncio.Queue(self.queue_size)
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        gone = asyncio.Event()
        sent_request = False

        async def receive() -> dict:
            nonlocal sent_request
            if not sent_request:
                sent_request = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                if not started.done():
                    started.set_result((message["status"], message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if gone.is_set():
                    raise OSError("the client closed the response")
                chunk = message.get("body", b"")
                if chunk:
                    await queue.put(chunk)
                if not message.get("more_body", False):
                    await queue.put(_END)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except BaseException as exc:
                if not started.done():
                    started.set_exception(
                        httpx.RemoteProtocolError("the upstream failed before responding")
                    )
                elif not gone.is_set():
                    queue.put_nowait(exc) if not queue.full() else await queue.put(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if not started.done():
                started.set_exception(httpx.RemoteProtocolError("the upstream sent no response"))

        task = asyncio.ensure_future(run())
        try:
            status, headers = await started
        except BaseException:
            task.cancel()
            raise
        return httpx.Response(status, headers=headers, stream=_Body(queue, task, gone))
