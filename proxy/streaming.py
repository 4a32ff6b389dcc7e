"""SSE pass-through with settlement on every exit path.

The relay is a plain ASGI callable rather than a StreamingResponse: settlement must happen in
``finally`` of the coroutine that pumps the stream, shielded from cancellation, and not in a
background task that a raised or abandoned stream would skip.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx

from .sse import EventSplitter, delta_text, event_data, is_done, is_usage_only, usage_of

log = logging.getLogger("proxy.stream")

_USAGE_NULL = b',"usage":null'


class StreamOutcome:
    """What the relay saw, for settlement and the access log."""

    __slots__ = ("client_gone", "completed", "error", "output_text", "usage")

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None
        self.completed = False  # [DONE] or a clean end of the upstream body
        self.client_gone = False
        self.error: str | None = None
        self.output_text = ""


class StreamRelay:
    """ASGI app that relays an upstream SSE response and calls ``settle`` exactly once."""

    def __init__(
        self,
        upstream: httpx.Response,
        headers: dict[str, str],
        settle: Callable[[StreamOutcome], Awaitable[None]],
        strip_usage: bool,
    ) -> None:
        self.upstream = upstream
        self.headers = headers
        self.settle = settle
        self.strip_usage = strip_usage  # the proxy asked for usage; the client did not
        self.outcome = StreamOutcome()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        outcome = self.outcome
        forwarded: list[bytes] = []  # data payloads, counted only if usage never comes
        try:
            raw_headers = [(k.encode(), v.encode()) for k, v in self.headers.items()]
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            outcome.client_gone = True
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
                await self._pump(send, forwarded)
                tg.cancel_scope.cancel()
        except OSError:
            outcome.client_gone = True
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await self.upstream.aclose()
                if outcome.usage is None:
                    outcome.output_text = "".join(delta_text(d) for d in forwarded)
                try:
                    await self.settle(outcome)
                except Exception:
                    log.exception("settlement of a stream failed")

    async def _pump(self, send: Any, forwarded: list[bytes]) -> None:
        outcome = self.outcome
        splitter = EventSplitter()
        strip = self.strip_usage
        try:
            async for chunk in self.upstream.aiter_bytes():
                out = []
                for ev in splitter.feed(chunk):
                    data = event_data(ev)
                    if data is None:
                        out.append(ev)
                        continue
                    if is_done(data):
                        outcome.completed = True
                        out.append(ev)
                        continue
                    if data[:1] != b"{" or data.rstrip()[-1:] != b"}":
                        # A broken event: stop here rather than hand the client half a JSON.
                        outcome.error = "malformed event"
                        log.warning("upstream sent a malformed stream event; stream ended")
                        break
                    usage = usage_of(data)
                    if usage is not None:
                        # Cumulative usage (vLLM's continuous_usage_stats): the last one counts.
                        outcome.usage = usage
                        if strip and is_usage_only(data):
                            continue
                    forwarded.append(data)
                    if strip:
                        ev = ev.replace(_USAGE_NULL, b"")
                    out.append(ev)
                if out:
                    await send(
                        {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                    )
                if outcome.error:
                    break
            else:
                tail = splitter.flush()
                if tail:
                    await send({"type": "http.response.body", "body": tail, "more_body": True})
        except httpx.HTTPError as exc:
            # The upstream broke mid-stream: end the client's stream cleanly; settle what was sent.
            outcome.error = type(exc).__name__
            log.warning("upstream stream ended abnormally: %s", outcome.error)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
