"""Reading OpenAI-shaped responses cheaply: usage, stream events, and which limit a 429 hit."""

from __future__ import annotations

import orjson

# Dimension codes as stored per request (compact arrays hold small ints, not strings).
DIM_NONE, DIM_REQUESTS, DIM_INPUT, DIM_OUTPUT, DIM_UNKNOWN = 0, 1, 2, 3, 4
DIM_NAMES = {
    DIM_REQUESTS: "requests",
    DIM_INPUT: "input_tokens",
    DIM_OUTPUT: "output_tokens",
    DIM_UNKNOWN: "unknown",
}
_DIM_BY_NAME = {
    "requests": DIM_REQUESTS,
    "input_tokens": DIM_INPUT,
    "input-tokens": DIM_INPUT,
    "output_tokens": DIM_OUTPUT,
    "output-tokens": DIM_OUTPUT,
}
# When the body says nothing, the header whose remaining budget is zero names the dimension.
_REMAINING_HEADERS = (
    (b"x-ratelimit-remaining-requests", DIM_REQUESTS),
    (b"x-ratelimit-remaining-input-tokens", DIM_INPUT),
    (b"x-ratelimit-remaining-output-tokens", DIM_OUTPUT),
    (b"x-ratelimit-remaining-tokens", DIM_INPUT),
)


def _json(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def usage_of(obj: object) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from a parsed response or stream chunk."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def usage_from_body(body: bytes) -> tuple[int, int] | None:
    if b'"usage"' not in body:
        return None
    return usage_of(_json(body))


def rate_limit_dimension(body: bytes, headers: dict[bytes, bytes]) -> int:
    """Which limit a 429 reports: the error body's ``type`` (or ``code``/``param``) first,
    then an ``x-ratelimit-*`` header."""
    obj = _json(body) if body else None
    if isinstance(obj, dict) and isinstance(err := obj.get("error"), dict):
        for field in ("type", "code", "param"):
            value = err.get(field)
            if isinstance(value, str) and value in _DIM_BY_NAME:
                return _DIM_BY_NAME[value]
    for name, value in headers.items():
        # A header whose value names the dimension (e.g. x-ratelimit-limited: input_tokens).
        if name.startswith(b"x-ratelimit-"):
            dim = _DIM_BY_NAME.get(value.decode("latin-1").strip().lower())
            if dim is not None:
                return dim
    for name, dim in _REMAINING_HEADERS:
        if headers.get(name) == b"0":
            return dim
    return DIM_UNKNOWN


class SseCounter:
    """Counts ``data:`` events of a server-sent event stream fed in arbitrary pieces and keeps
    the last reported usage. Lines may end in LF or CRLF."""

    __slots__ = ("_buf", "done", "events", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.events = 0  # data events other than [DONE]
        self.done = False  # saw data: [DONE]
        self.usage: tuple[int, int] | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf + data
        if b"\r" in buf:
            # Keep a trailing CR: its LF may come in the next piece.
            tail = b"\r" if buf.endswith(b"\r") else b""
            buf = buf[: len(buf) - len(tail)].replace(b"\r\n", b"\n") + tail
        if b"\n\n" not in buf:
            self._buf = buf
            return
        *events, self._buf = buf.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            self.events += 1
            if b'"usage"' in payload and b'"usage":null' not in payload.replace(b" ", b""):
                usage = usage_of(_json(payload))
                if usage is not None:
                    self.usage = usage
