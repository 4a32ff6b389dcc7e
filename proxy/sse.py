"""Incremental Server-Sent Events splitting for pass-through, with usage detection that parses
JSON only for the few events that can carry a usage object."""

from __future__ import annotations

import re
from typing import Any

import orjson

# A blank line ends an event. With CRLF, LF and lone CR all line endings, every "line ending
# followed by a line ending" contains one of these pairs, starting at the first ending's last
# byte ("\r\n" itself is one ending, never two).
_LF_LF = b"\n\n"
_LF_CR = b"\n\r"
_CR_CR = b"\r\r"
_LF, _CR = 10, 13


def _boundaries(buf: bytes | bytearray, scan: int) -> tuple[list[int], int, int]:
    """End offsets of the complete events at the start of `buf`.

    `scan`: no terminator pair starts before it (a hint from the previous call). Returns the
    ends, the start of the unconsumed tail, and `hold`: the index of a pair whose terminator
    ends in an ambiguous trailing CR, or -1.
    """
    n = len(buf)
    ends: list[int] = []
    start = 0
    if buf.find(b"\r", scan) < 0:
        # LF-only data (the usual case): one find per event.
        while start < n:
            if buf[start] == _LF:  # a blank line on its own
                start += 1
            else:
                p = buf.find(_LF_LF, start if start > scan else scan)
                if p < 0:
                    break
                start = p + 2
            ends.append(start)
        return ends, start, -1
    # Next position of each pair at or after `scan`; recomputed only once passed, so a chunk
    # with many events is scanned about once per pair, not once per event.
    lf_lf = buf.find(_LF_LF, scan)
    lf_cr = buf.find(_LF_CR, scan)
    cr_cr = buf.find(_CR_CR, scan)
    while start < n:
        first = buf[start]
        if first in (_LF, _CR):
            # A line ending at an event start is a blank line on its own (dispatches nothing).
            if first == _LF:
                end = start + 1
            elif start + 1 < n:
                end = start + 2 if buf[start + 1] == _LF else start + 1
            else:
                break
            ends.append(end)
            start = end
            continue
        if 0 <= lf_lf < start:
            lf_lf = buf.find(_LF_LF, start)
        if 0 <= lf_cr < start:
            lf_cr = buf.find(_LF_CR, start)
        if 0 <= cr_cr < start:
            cr_cr = buf.find(_CR_CR, start)
        p = min((q for q in (lf_lf, lf_cr, cr_cr) if q >= 0), default=-1)
        if p < 0:
            break
        if buf[p + 1] == _LF:
            end = p + 2
        elif p + 2 < n:
            end = p + 3 if buf[p + 2] == _LF else p + 2
        else:
            return ends, start, p  # "...\r" at the end: CR or the start of CRLF? wait
        ends.append(end)
        start = end
    return ends, start, -1


class EventSplitter:
    """Feed raw bytes, get complete raw events back (terminator included, bytes unchanged).

    An event whose terminator ends with a lone CR is held back until the next byte shows it is
    not the first half of a CRLF (or until flush()); LF and CRLF streams are never delayed.
    """

    __slots__ = ("_buf", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()  # the partial tail; grows in place, so huge events stay linear
        self._scan = 0  # no terminator pair starts before this index of _buf

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf
        if not buf:
            # Fast path: nothing pending, split the chunk itself (no copy into the buffer).
            ends, start, hold = _boundaries(chunk, 0)
            events = []
            prev = 0
            for end in ends:
                events.append(chunk[prev:end])
                prev = end
            n = len(chunk)
            if start < n:
                buf += memoryview(chunk)[start:]
        else:
            buf += chunk
            ends, start, hold = _boundaries(buf, self._scan)
            n = len(buf)
            events = []
            if ends:
                with memoryview(buf) as view:
                    prev = 0
                    for end in ends:
                        events.append(bytes(view[prev:end]))
                        prev = end
                del buf[:start]
        if start >= n:
            self._scan = 0
        elif hold >= 0:
            self._scan = hold - start
        else:
            # No pair in the tail, except possibly one starting at its last byte.
            self._scan = n - start - 1
        return events

    def flush(self) -> bytes:
        """The unterminated tail (an event cut off by the end of the stream); resets state."""
        tail = bytes(self._buf)
        self._buf.clear()
        self._scan = 0
        return tail

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the end of their event."""
        return len(self._buf)


def _lines(event: bytes) -> list[bytes]:
    # bytes.splitlines splits exactly on \n, \r\n and \r: the SSE line endings.
    return event.splitlines()


def event_data(event: bytes) -> bytes | None:
    """The event's data field (data lines joined by \\n), or None when it has no data line."""
    # Fast path: the usual single line "data: ...\n\n".
    nl = event.find(b"\n")
    if nl == len(event) - 2 and event.startswith(b"data:") and b"\r" not in event:
        return event[6:nl] if event[5] == 0x20 else event[5:nl]
    parts: list[bytes] = []
    for line in _lines(event):
        if line.startswith(b"data"):
            if len(line) == 4:
                parts.append(b"")  # "data" alone: the field with an empty value
            elif line[4] == 0x3A:  # ':'
                value = line[5:]
                parts.append(value[1:] if value[:1] == b" " else value)
    if not parts:
        return None
    return b"\n".join(parts)


_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_USAGE_KEY = b'"usage"'


def is_done(data: bytes) -> bool:
    """True for the terminating `[DONE]` payload."""
    return data == b"[DONE]" or (len(data) < 32 and data.strip() == b"[DONE]")


def has_usage(data: bytes) -> bool:
    """Cheap check (no parsing) that the payload may hold a non-null usage object:
    `"usage"` followed by `:` and `{`, whitespace allowed. Inside JSON strings quotes are
    escaped, so streamed text cannot fake it. Works on a raw event as well as on its data."""
    # rfind: providers put usage last, so the search from the end stops after a few bytes.
    i = data.rfind(_USAGE_KEY)
    if i < 0:
        return False
    if data.startswith(b":{", i + 7):
        return True
    if data.startswith(b":null", i + 7):
        return False
    return _USAGE_OBJECT.search(data) is not None  # unusual spacing: the general pattern


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _usage_pair(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    if "prompt_tokens" not in usage and "completion_tokens" not in usage:
        return None
    for value in (prompt, completion):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
    return prompt, completion


def usage_of(data: bytes) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of the payload's usage object, if it has one."""
    if not has_usage(data):
        return None
    obj = _loads(data)
    if not isinstance(obj, dict):
        return None
    return _usage_pair(obj.get("usage"))


def is_usage_only(data: bytes) -> bool:
    """True for the extra chunk of include_usage: empty choices and a usage object."""
    if not has_usage(data) or _EMPTY_CHOICES.search(data) is None:
        return False
    obj = _loads(data)
    return (
        isinstance(obj, dict)
        and obj.get("choices") == []
        and _usage_pair(obj.get("usage")) is not None
    )


def delta_text(data: bytes) -> str:
    """The text a chunk streams (chat deltas incl. tool-call arguments, or completion text).

    Used to estimate output tokens when a stream ends without usage; "" for anything else.
    """
    obj = _loads(data)
    if not isinstance(obj, dict):
        return ""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return ""
    out: list[str] = []
    for choice in choices:
        if isinstance(choice, dict):
            choice_text(choice, out)
    return "".join(out)


def choice_text(choice: dict[str, Any], out: list[str]) -> None:
    """Add one choice's streamed text to ``out``: chat deltas (content, reasoning, refusal,
    tool-call names and arguments) or a completion's text."""
    text = choice.get("text")
    if isinstance(text, str):
        out.append(text)
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    for key in ("content", "reasoning_content", "reasoning", "refusal"):
        value = delta.get(key)
        if isinstance(value, str):
            out.append(value)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            if isinstance(call, dict):
                _function_text(call.get("function"), out)
    _function_text(delta.get("function_call"), out)


def _function_text(function: Any, out: list[str]) -> None:
    if isinstance(function, dict):
        for key in ("name", "arguments"):
            value = function.get(key)
            if isinstance(value, str):
                out.append(value)
