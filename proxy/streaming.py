"""SSE pass-through with settlement on every exit path.

The relay is a plain ASGI callable rather than a StreamingResponse: settlement must happen in
``finally`` of the coroutine that pumps the stream, shielded from cancellation, and not in a
background task that a raised or abandoned stream would skip.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx
import orjson

from .sse import EventSplitter, choice_text, event_data, has_usage, is_done, usage_of
from .tokens import LARGE_TEXT_CHARS

log = logging.getLogger("proxy.stream")

# The usual event: one compact JSON chunk on one LF-terminated data line. Checked on the raw
# event so the common case needs neither event_data() nor a JSON parse.
_DATA_OBJ = b"data: {"
_OBJ_END = b"}\n\n"
_USAGE_KEY = b'"usage"'
_NULL = b":null"
_OBJ = b":{"
_USAGE_NULL = b',"usage":null'  # what include_usage adds to every chunk (OpenAI, the mock)
_ERROR_DATA = b'{"error"'
_COMMA = 0x2C
# The same null field with other spacing or position, for the rare non-compact upstream.
_USAGE_NULL_ANY = re.compile(rb'\s*,\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
# Forwarded bytes kept raw for counting if usage never comes; past this, they are reduced to
# their text so a long stream holds its text, not its JSON framing.
RAW_BUDGET = 256 * 1024


class StreamOutcome:
    """What the relay saw, for settlement and the access log."""

    __slots__ = ("client_gone", "completed", "error", "output_tokens", "usage")

    def __init__(self) -> None:
        self.usage: tuple[int, int] | None = None  # the upstream's (prompt, completion) usage
        self.completed = False  # [DONE] or a clean end of the upstream body
        self.client_gone = False
        self.error: str | None = None  # why the upstream's stream was not usable to its end
        # Without usage: tokens of the text forwarded (None: counting failed, charge reserved).
        self.output_tokens: int | None = 0


# What _slow() returns for the two events that change the course of the stream.
_HOLD = b"<done>"  # [DONE]: settle first, then forward it and what follows
_STOP = b"<stop>"  # a malformed event: forward nothing more


class StreamRelay:
    """ASGI app that relays an upstream SSE response and calls ``settle`` exactly once.

    ``strip_usage``: the proxy asked for usage the client did not: the usage-only chunk and the
    ``"usage":null`` field of every other chunk are removed. ``count_text`` counts the output
    tokens of a text, for a stream that ends without usage.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        headers: dict[str, str],
        settle: Callable[[StreamOutcome], Awaitable[None]],
        strip_usage: bool,
        count_text: Callable[[str], int],
    ) -> None:
        self.upstream = upstream
        self.headers = headers
        self.settle = settle
        self.strip_usage = strip_usage
        self.count_text = count_text
        self.outcome = StreamOutcome()
        self._usage_event: bytes | None = None  # the last event with a usage object, unparsed
        self._sent: list[bytes] = []  # forwarded bodies not yet reduced to text
        self._sent_bytes = 0
        self._texts: dict[int, list[str]] = {}  # choice index -> text, from reduced bodies
        self._held: bytes | None = None  # [DONE] and what came after it in the same read
        self._stopped = False
        self._done = False  # [DONE] was forwarded: a disconnect now is not an abandoned stream
        self._ending = False  # the response is being completed: disconnects are the server's
        self._settled = False
        self._closed = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        outcome = self.outcome
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while True:
                        msg = await receive()
                        if msg["type"] == "http.disconnect":
                            # Servers also report a disconnect once the response is complete.
                            if not self._ending:
                                outcome.client_gone = not self._done
                                tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch)
                await self._run(send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()

    async def _run(self, send: Any) -> None:
        outcome = self.outcome
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._pump(send)
            # Settled before the response ends (and before [DONE] is forwarded): a client that
            # sends its next request once this stream is over sees this one's real usage.
            self._ending = True
            with anyio.CancelScope(shield=True):
                await self._finish()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers that raise on a send to a closed connection
            outcome.client_gone = not self._done

    async def _finish(self) -> None:
        """Close the upstream (so it stops generating), then settle."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self.upstream.aclose()
        await self._settle_once()

    async def _settle_once(self) -> None:
        if self._settled:
            return
        self._settled = True
        outcome = self.outcome
        try:
            if outcome.usage is None and self._usage_event is not None:
                data = event_data(self._usage_event)
                outcome.usage = usage_of(data) if data is not None else None
            if outcome.usage is None:
                outcome.output_tokens = await self._count_forwarded()
        except Exception:
            log.exception("counting a stream's output failed; the reservation is charged")
            outcome.output_tokens = None
        try:
            await self.settle(outcome)
        except Exception:
            log.exception("settlement of a stream failed")

    async def _pump(self, send: Any) -> None:
        outcome = self.outcome
        splitter = EventSplitter()
        try:
            upstream = self.upstream
            # Straight from the transport unless the body needs decoding: httpx's decoder
            # layers were a third of the relay's time per chunk.
            if "content-encoding" in upstream.headers:
                source = upstream.aiter_bytes()
            else:
                source = upstream.stream  # type: ignore[assignment]
            async for chunk in source:  # type: ignore[union-attr]
                if outcome.client_gone:
                    # A cancel may never be delivered while the upstream always has data
                    # ready: stop pulling (and paying for) a stream nobody reads.
                    return
                whole = not splitter.pending  # the read starts at an event boundary
                events = splitter.feed(chunk)
                if events and await self._forward(
                    send, events, chunk if whole and not splitter.pending else None
                ):
                    return
            tail = splitter.flush()  # an unterminated last event: passed on as it came
            if tail and await self._forward(send, [tail], tail):
                return
            outcome.completed = True
        except httpx.HTTPError as exc:
            # The upstream broke mid-stream: end the client's stream cleanly; settle what was sent.
            outcome.error = type(exc).__name__
            log.warning("upstream stream ended abnormally: %s", outcome.error)

    async def _forward(self, send: Any, events: list[bytes], whole: bytes | None) -> bool:
        """Send what these events become; True when the stream must stop here."""
        body = self._filter(events, whole)
        if body:
            await self._send(send, body)
        if self._stopped:
            return True
        if self._held is not None:
            held, self._held = self._held, None
            self._done = True
            with anyio.CancelScope(shield=True):
                await self._settle_once()
            await self._send(send, held)
        return False

    async def _send(self, send: Any, body: bytes) -> None:
        # Recorded before sending: a body the server accepted counts as streamed.
        self._sent.append(body)
        self._sent_bytes += len(body)
        if self._sent_bytes > RAW_BUDGET:
            self._reduce()
        await send({"type": "http.response.body", "body": body, "more_body": True})

    def _filter(self, events: list[bytes], whole: bytes | None) -> bytes:
        """The bytes to forward for these events. ``whole``: the read they came from, when it
        is exactly these events (then forwarded as it is unless something must change)."""
        strip = self.strip_usage
        nulls = False  # a compact `,"usage":null` to remove
        out: list[bytes] | None = None  # set once an event is dropped or rewritten
        for n, ev in enumerate(events):
            if ev.startswith(_DATA_OBJ) and ev.endswith(_OBJ_END):
                i = ev.rfind(_USAGE_KEY)
                if i < 0:
                    if ev.startswith(_ERROR_DATA, 6):
                        self.outcome.error = "error event"
                    if out is not None:
                        out.append(ev)
                    continue
                if ev.startswith(_NULL, i + 7) and ev[i - 1] == _COMMA:
                    nulls = True
                    if out is not None:
                        out.append(ev)
                    continue
                if not strip and ev.startswith(_OBJ, i + 7):
                    # Usage the client asked for (cumulative with continuous_usage_stats):
                    # only the last one counts, so it is parsed once, at the end.
                    self._usage_event = ev
                    if out is not None:
                        out.append(ev)
                    continue
            new = self._slow(ev)
            if new is ev:
                if out is not None:
                    out.append(ev)
                continue
            if out is None:
                out = events[:n]
            if new is _HOLD:
                self._held = b"".join(events[n:])
                break
            if new is _STOP:
                self._stopped = True
                break
            if new is not None:
                out.append(new)
        if out is not None:
            whole = b"".join(out)
        elif whole is None:
            whole = b"".join(events)
        return whole.replace(_USAGE_NULL, b"") if strip and nulls else whole

    def _slow(self, ev: bytes) -> bytes | None:
        """Any event off the fast path: what to forward (``ev`` itself, a rewrite, or None)."""
        outcome = self.outcome
        data = event_data(ev)
        if data is None:
            return ev  # a comment (keep-alive), or a field without data
        if is_done(data):
            outcome.completed = True
            return _HOLD
        if data[:1] != b"{" or data.rstrip()[-1:] != b"}":
            return self._malformed()
        if data.startswith(_ERROR_DATA):
            outcome.error = "error event"
        strip = self.strip_usage
        if not has_usage(data):
            if strip and _USAGE_KEY in data:
                cleaned = _USAGE_NULL_ANY.sub(b"", data)
                if cleaned != data:
                    return _with_data(ev, cleaned)
            return ev
        if not strip:
            self._usage_event = ev
            return ev
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            return self._malformed()
        usage = usage_of(data)
        if usage is not None:
            outcome.usage = usage  # cumulative when reported on every chunk: the last counts
        if obj.get("choices") == []:
            return None  # the usage-only chunk the client did not ask for
        # Usage on a chunk that also carries choices: servers that do this (llama.cpp's
        # completions) send it whether asked or not, and continuous_usage_stats is never passed
        # on with the injected include_usage, so the client would see it without the proxy too.
        return ev

    def _malformed(self) -> bytes:
        # A broken event: end the stream here rather than hand the client half a JSON; the rest
        # of this upstream response cannot be trusted either.
        self.outcome.error = "malformed event"
        log.warning("upstream sent a malformed stream event; stream ended")
        return _STOP

    def _reduce(self) -> None:
        """Turn the raw forwarded bodies into per-choice text (long streams only)."""
        splitter = EventSplitter()
        for body in self._sent:
            for ev in splitter.feed(body):
                _collect(ev, self._texts)
        tail = splitter.flush()
        if tail:
            _collect(tail, self._texts)
        self._sent = []
        self._sent_bytes = 0

    async def _count_forwarded(self) -> int:
        self._reduce()
        # Each choice is its own text: counting them joined would merge tokens across them.
        texts = ["".join(parts) for parts in self._texts.values()]
        if sum(map(len, texts)) > LARGE_TEXT_CHARS:
            return await anyio.to_thread.run_sync(self._count_all, texts)
        return self._count_all(texts)

    def _count_all(self, texts: list[str]) -> int:
        return sum(self.count_text(t) for t in texts if t)


def _with_data(ev: bytes, data: bytes) -> bytes:
    """``ev`` with its data field replaced (other fields, e.g. id or event, kept)."""
    lines = [line for line in ev.splitlines() if line and not line.startswith(b"data")]
    lines.append(b"data: " + data)
    return b"\n".join(lines) + b"\n\n"


# The usual content chunks, compact, whose choices carry nothing but text: their text is read
# without parsing the JSON (a JSON string cannot contain an unescaped quote, so a match is the
# whole string); any other shape is parsed.
_CHAT_TEXT = re.compile(rb'\{"index":(\d+),"delta":\{"content":"((?:[^"\\]|\\.)*)"\}')
_COMPLETION_TEXT = re.compile(rb'\{"text":"((?:[^"\\]|\\.)*)","index":(\d+)')


def _string(raw: bytes) -> str:
    if b"\\" in raw:
        try:
            return orjson.loads(b'"' + raw + b'"')
        except orjson.JSONDecodeError:
            # An invalid escape from the upstream: count the text as it came rather than fail.
            return raw.decode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def _collect(ev: bytes, texts: dict[int, list[str]]) -> None:
    """Add the text an event streams to its choice's list."""
    found = _CHAT_TEXT.findall(ev)
    if found and ev.count(b'"delta"') == len(found):
        for index, raw in found:
            texts.setdefault(int(index), []).append(_string(raw))
        return
    found = _COMPLETION_TEXT.findall(ev)
    if found and ev.count(b'"text"') == len(found):
        for raw, index in found:
            texts.setdefault(int(index), []).append(_string(raw))
        return
    data = event_data(ev)
    if data is None or data[:1] != b"{":
        return
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", 0)
        if not isinstance(index, int):
            index = 0
        parts = texts.setdefault(index, [])
        choice_text(choice, parts)
