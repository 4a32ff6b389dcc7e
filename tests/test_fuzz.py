"""Fuzzing the parsers that see untrusted bytes: the request body parser (only InvalidRequest
may escape, and what it accepts the token counter can count) and the SSE splitter and usage
functions (no exception on any input, bytes never changed, splits never matter)."""

from __future__ import annotations

import re
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.payload import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    MAX_N,
    MAX_OUTPUT,
    parse_json,
    parse_request,
)
from proxy.sse import (
    EventSplitter,
    delta_text,
    event_data,
    has_usage,
    is_done,
    is_usage_only,
    usage_of,
)
from proxy.streaming import _collect
from proxy.tokens import TokenCounter

# ~30 s for the whole file on a small machine; derandomized so CI explores the same inputs.
FUZZ = settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS)
COUNTER = TokenCounter()


# -- JSON values ---------------------------------------------------------------------------------
def _scalars(ints: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        ints,
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(["", "user", "text", "gpt-4o", "\x00", "\ud7ff", "[DONE]"]),
    )


def _json(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )


# Python values (any int) for the parser; values JSON can carry in 64 bits for round trips.
scalars = _scalars(st.integers(-(2**70), 2**70))
json_values = _json(scalars)
json_values64 = _json(_scalars(st.integers(-(2**63), 2**63 - 1)))
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "tools",
)
# Plausible values for the fields the proxy reads, mixed with arbitrary JSON: most bodies get
# past the first checks, so the later ones are reached too.
part = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.one_of(st.text(max_size=20), scalars)}
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio"])}),
    json_values,
)
msg = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"])},
        optional={
            "content": st.one_of(st.text(max_size=30), st.lists(part, max_size=3), json_values),
            "name": st.one_of(st.text(max_size=8), scalars),
            "tool_calls": json_values,
        },
    ),
    json_values,
)
token_ids = st.lists(st.integers(-2, 300_000), max_size=5)
text_input = st.one_of(
    st.text(max_size=30),
    st.lists(st.text(max_size=10), max_size=3),
    token_ids,
    st.lists(token_ids, max_size=3),
    json_values,
)
field_values = {
    "model": st.one_of(st.sampled_from(["gpt-4o-mini", "gpt-4", "m", "o1-mini"]), scalars),
    "messages": st.one_of(st.lists(msg, max_size=3), json_values),
    "prompt": text_input,
    "input": text_input,
    "max_tokens": st.one_of(st.integers(-5, MAX_OUTPUT + 5), scalars),
    "max_completion_tokens": st.one_of(st.integers(-5, MAX_OUTPUT + 5), scalars),
    "n": st.one_of(st.integers(-2, MAX_N + 2), scalars),
    "best_of": st.one_of(st.integers(-2, MAX_N + 2), scalars),
    "stream": st.one_of(st.booleans(), scalars),
    "stream_options": st.one_of(
        st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), scalars)}),
        json_values,
    ),
    "tools": json_values,
}
bodies = st.fixed_dictionaries({}, optional={f: field_values[f] for f in FIELDS})


def _count(endpoint: str, body: dict[str, Any], model: str) -> int:
    """What Node.count_input does with an accepted body (it turns TypeError/ValueError into
    a 400; anything else would be a 500)."""
    if endpoint == CHAT:
        return COUNTER.count_chat(body["messages"], model, body.get("tools"))
    if endpoint == COMPLETIONS:
        return COUNTER.count_prompt(body["prompt"], model)
    return COUNTER.count_embedding_input(body["input"], model)


def _check_request(endpoint: str, body: Any) -> None:
    try:
        p = parse_request(endpoint, body, 256)
    except InvalidRequest as exc:
        assert exc.status == 400 and exc.message
        return
    assert isinstance(p.model, str) and p.model
    assert isinstance(p.stream, bool) and isinstance(p.include_usage, bool)
    assert isinstance(p.output_reservation, int) and not isinstance(p.output_reservation, bool)
    if endpoint == EMBEDDINGS:
        assert p.output_reservation == 0 and not p.stream
    else:
        assert 1 <= p.output_reservation <= MAX_OUTPUT * MAX_N
    try:
        tokens = _count(endpoint, body, p.model)
    except (TypeError, ValueError):
        return  # the app answers 400
    assert isinstance(tokens, int) and tokens >= 0


@FUZZ
@given(st.binary(max_size=300))
def test_parse_json_on_arbitrary_bytes(raw: bytes) -> None:
    try:
        body = parse_json(raw)
    except InvalidRequest as exc:
        assert exc.status == 400
        return
    assert isinstance(body, dict)


@FUZZ
@given(json_values64)
def test_parse_json_on_arbitrary_json(value: Any) -> None:
    raw = orjson.dumps(value)
    try:
        body = parse_json(raw)
    except InvalidRequest:
        assert not isinstance(value, dict)
        return
    assert body == value


@FUZZ
@given(st.sampled_from(ENDPOINTS), json_values)
def test_parse_request_on_arbitrary_json(endpoint: str, body: Any) -> None:
    if isinstance(body, dict):
        _check_request(endpoint, body)


@FUZZ
@given(st.sampled_from(ENDPOINTS), bodies)
def test_parse_request_on_plausible_bodies(endpoint: str, body: dict[str, Any]) -> None:
    _check_request(endpoint, body)


# -- SSE -----------------------------------------------------------------------------------------
sse_pieces = st.sampled_from(
    [
        *(b"data: ", b"data:", b"data", b"\n", b"\r", b"\r\n", b"\n\n", b":", b"event: x"),
        *(b"{", b"}", b'"usage":', b'"usage": {"prompt_tokens": 1}', b'"choices":[]'),
        *(b"[DONE]", b"\xff"),
    ]
)
sse_streams = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(sse_pieces, st.binary(max_size=8)), max_size=40).map(b"".join),
)


def _split(blob: bytes, cuts: list[int]) -> tuple[list[bytes], bytes, list[int]]:
    splitter = EventSplitter()
    events: list[bytes] = []
    pendings: list[int] = []
    prev = 0
    for cut in [*sorted(cuts), len(blob)]:
        events.extend(splitter.feed(blob[prev:cut]))
        pendings.append(splitter.pending)
        prev = cut
    return events, splitter.flush(), pendings


_TERMINATED = re.compile(rb"(\r\n|\n|\r)(\r\n|\n|\r)\Z|\A(\r\n|\n|\r)\Z")


@FUZZ
@given(sse_streams, st.data())
def test_sse_splitter_on_arbitrary_bytes_split_arbitrarily(blob: bytes, data) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=10))
    events, tail, pendings = _split(blob, cuts)
    assert b"".join(events) + tail == blob  # bytes pass through unchanged, none lost
    for ev in events:
        assert ev and _TERMINATED.search(ev)  # an event ends at a blank line (or is one)
    # The same events whichever way the bytes were split, and whole.
    whole, whole_tail, _ = _split(blob, [])
    assert events == whole and tail == whole_tail
    assert pendings[-1] == len(tail)


@FUZZ
@given(sse_streams)
def test_sse_usage_functions_never_raise(blob: bytes) -> None:
    for ev in [blob, *EventSplitter().feed(blob)]:
        data = event_data(ev)
        assert data is None or isinstance(data, bytes)
        for payload in (ev, data or b""):
            usage = usage_of(payload)
            if usage is not None:
                assert has_usage(payload)
                assert all(isinstance(v, int) and v >= 0 for v in usage)
            assert isinstance(is_usage_only(payload), bool)
            assert isinstance(is_done(payload), bool)
            assert isinstance(delta_text(payload), str)


@FUZZ
@given(json_values64)
def test_usage_of_agrees_with_a_full_parse(value: Any) -> None:
    payload = orjson.dumps({"choices": [], "usage": value})
    usage = usage_of(payload)
    ok = (
        isinstance(value, dict)
        and ("prompt_tokens" in value or "completion_tokens" in value)
        and all(
            isinstance(value.get(k, 0), int)
            and not isinstance(value.get(k, 0), bool)
            and value.get(k, 0) >= 0
            for k in ("prompt_tokens", "completion_tokens")
        )
    )
    if ok:
        assert usage == (value.get("prompt_tokens", 0), value.get("completion_tokens", 0))
    else:
        assert usage is None


# The relay reads the text of long streams without parsing them (a regex over the raw chunk):
# whatever an upstream puts between the quotes, reducing it must not raise.
escaped_content = st.from_regex(rb'(?:[^"\\\r\n]|\\.){0,12}', fullmatch=True)


@FUZZ
@given(escaped_content)
def test_stream_text_reduction_never_raises(content: bytes) -> None:
    ev = b'data: {"choices":[{"index":0,"delta":{"content":"' + content + b'"}}]}\n\n'
    texts: dict[int, list[str]] = {}
    _collect(ev, texts)
    assert all(isinstance(t, str) for parts in texts.values() for t in parts)
