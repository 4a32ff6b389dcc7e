"""SSE splitting (property-based over line endings and split points) and usage detection."""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sse import (
    EventSplitter,
    delta_text,
    event_data,
    has_usage,
    is_done,
    is_usage_only,
    usage_of,
)

# --------------------------------------------------------------------------- property test

EOLS = (b"\n", b"\r\n", b"\r")
value_text = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=30,
)


@dataclass
class Line:
    raw: bytes  # without line ending
    data: bytes | None  # the value this line adds to the data field, if it is a data line


@st.composite
def lines(draw: st.DrawFn) -> Line:
    kind = draw(st.sampled_from(["data", "data", "data", "bare", "comment", "field", "lookalike"]))
    value = draw(value_text).encode()
    if kind == "data":
        return Line(b"data:" + value, value[1:] if value.startswith(b" ") else value)
    if kind == "bare":
        return Line(b"data", b"")
    if kind == "comment":
        return Line(b":" + value, None)
    if kind == "field":
        name = draw(st.sampled_from([b"event", b"id", b"retry"]))
        return Line(name + b": " + value, None)
    return Line(b"datum: " + value, None)  # starts like "data" but is another field


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[bytes | None], bytes]:
    """A stream as bytes, its raw events, their data, and an unterminated tail."""
    events = draw(st.lists(st.lists(lines(), max_size=4), max_size=8))
    raw_events: list[bytes] = []
    datas: list[bytes | None] = []
    prev = b""

    def eol() -> bytes:
        nonlocal prev
        # A lone CR followed by LF would read as one CRLF: not a serialisation of these lines.
        choices = [e for e in EOLS if not (prev == b"\r" and e.startswith(b"\n"))]
        prev = draw(st.sampled_from(choices))
        return prev

    for event in events:
        raw = b"".join(line.raw + eol() for line in event) + eol()
        raw_events.append(raw)
        parts = [line.data for line in event if line.data is not None]
        datas.append(b"\n".join(parts) if parts else None)
    tail = b""
    if draw(st.booleans()):
        tail = b"data: " + draw(value_text).encode()  # never starts with a line ending
    return b"".join(raw_events) + tail, raw_events, datas, tail


@settings(max_examples=400, deadline=None)
@given(streams(), st.data())
def test_any_split_yields_the_same_events(
    stream: tuple[bytes, list[bytes], list[bytes | None], bytes], data: st.DataObject
) -> None:
    blob, raw_events, datas, tail = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    splitter = EventSplitter()
    got: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(blob)]:
        got.extend(splitter.feed(blob[prev:cut]))
        prev = cut
    rest = splitter.flush()
    if not tail and rest:
        # Only an event ending in a lone CR may wait for flush (CR or first half of CRLF?).
        assert rest.endswith(b"\r")
        got.append(rest)
        rest = b""
    assert got == raw_events
    assert rest == tail
    assert [event_data(e) for e in got] == datas


@settings(max_examples=100, deadline=None)
@given(streams())
def test_byte_by_byte_equals_whole(
    stream: tuple[bytes, list[bytes], list[bytes | None], bytes],
) -> None:
    blob = stream[0]
    whole, single = EventSplitter(), EventSplitter()
    a = whole.feed(blob)
    b = [e for i in range(len(blob)) for e in single.feed(blob[i : i + 1])]
    assert a == b
    assert whole.flush() == single.flush()


# --------------------------------------------------------------------------- explicit cases


def test_typical_openai_stream() -> None:
    chunk = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    s = EventSplitter()
    assert s.feed(chunk + chunk[:10]) == [chunk]
    assert s.pending == 10
    assert s.feed(chunk[10:] + b"data: [DONE]\n\n") == [chunk, b"data: [DONE]\n\n"]
    assert s.flush() == b""
    assert is_done(event_data(b"data: [DONE]\n\n") or b"")
    assert not is_done(event_data(chunk) or b"")


def test_comments_and_keep_alives() -> None:
    s = EventSplitter()
    events = s.feed(b": keep-alive\n\n:\n\ndata: x\n\n")
    assert events == [b": keep-alive\n\n", b":\n\n", b"data: x\n\n"]
    assert [event_data(e) for e in events] == [None, None, b"x"]


def test_crlf_and_cr_line_endings() -> None:
    s = EventSplitter()
    assert s.feed(b"data: a\r\n\r\ndata: b\r\rdata: c\n\r\n") == [
        b"data: a\r\n\r\n",
        b"data: b\r\r",
        b"data: c\n\r\n",
    ]
    # A trailing CR terminator might be the start of CRLF: held until the next byte.
    assert s.feed(b"data: d\r\r") == []
    assert s.feed(b"\n") == [b"data: d\r\r\n"]
    assert s.feed(b"data: e\r\r") == []
    assert s.flush() == b"data: e\r\r"


def test_blank_lines_between_events() -> None:
    s = EventSplitter()
    assert s.feed(b"\n\ndata: x\n\n\r\n") == [b"\n", b"\n", b"data: x\n\n", b"\r\n"]


def test_multiple_data_lines_and_spaces() -> None:
    assert event_data(b"data: a\ndata:b\ndata:  c\n\n") == b"a\nb\n c"
    assert event_data(b"event: x\r\ndata: {}\r\nid: 7\r\n\r\n") == b"{}"
    assert event_data(b"data\n\n") == b""
    assert event_data(b"data:\n\n") == b""
    assert event_data(b"id: 1\n\n") is None
    assert event_data(b"database: 1\n\n") is None


def test_large_event_fed_in_small_pieces() -> None:
    payload = b"data: " + b"x" * 100_000 + b"\n\n"
    s = EventSplitter()
    out = [e for i in range(0, len(payload), 7) for e in s.feed(payload[i : i + 7])]
    assert out == [payload]


USAGE = b'{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34}}'


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (USAGE, (12, 34)),
        (b'{"choices":[],"usage" : {\n "prompt_tokens": 1, "completion_tokens": 2}}', (1, 2)),
        (b'{"choices":[{"delta":{"content":"x"}}],"usage":null}', None),
        (b'{"choices":[{"delta":{"content":"x"}}], "usage": null}', None),
        (b'{"choices":[{"delta":{"content":"x"}}]}', None),
        # "usage":{ inside streamed text is escaped, so it is neither detected nor parsed.
        (b'{"choices":[{"delta":{"content":"\\"usage\\":{\\"prompt_tokens\\":5}"}}]}', None),
        (b'{"usage":{"prompt_tokens":"many"}}', None),
        (b'{"usage":{"prompt_tokens":true,"completion_tokens":1}}', None),
        (b'{"usage":{}}', None),
        (b'{"usage":{"prompt_tokens":3', None),  # truncated JSON
        (b"[DONE]", None),
    ],
)
def test_usage_of(data: bytes, expected: tuple[int, int] | None) -> None:
    assert usage_of(data) == expected


def test_has_usage_is_a_cheap_superset() -> None:
    assert has_usage(USAGE)
    assert not has_usage(b'{"usage":null}')
    assert has_usage(b'{"usage":{"prompt_tokens":3')  # detected; usage_of then rejects it


def test_is_usage_only() -> None:
    assert is_usage_only(USAGE)
    assert is_usage_only(b'{"choices": [ ], "usage": {"prompt_tokens":1,"completion_tokens":0}}')
    cont = (
        b'{"choices":[{"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    )
    assert not is_usage_only(cont)  # vLLM continuous usage: choices are not empty
    assert not is_usage_only(b'{"choices":[],"usage":null}')
    assert not is_usage_only(b"[DONE]")


def test_delta_text() -> None:
    chat = {
        "choices": [
            {"index": 0, "delta": {"content": "Hello"}},
            {
                "index": 1,
                "delta": {
                    "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a"'}}]
                },
            },
        ]
    }
    assert delta_text(orjson.dumps(chat)) == 'Hellof{"a"'
    assert delta_text(b'{"choices":[{"text":" world","index":0}]}') == " world"
    assert delta_text(b'{"choices":[{"delta":{"role":"assistant","content":""}}]}') == ""
    assert delta_text(b'{"choices":[{"delta":{"content":null}}]}') == ""
    assert delta_text(USAGE) == ""
    assert delta_text(b"[DONE]") == ""
    assert delta_text(b'{"choices": "nope"}') == ""
