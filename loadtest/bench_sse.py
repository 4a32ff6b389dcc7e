"""Cost per SSE chunk of the pass-through path (split + cheap usage check) vs parsing every chunk.

Run: ``python -m loadtest.bench_sse [--events N]``; prints nanoseconds per chunk (best of 5).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable

import orjson

from proxy.sse import EventSplitter, event_data, has_usage, is_done, usage_of

# A typical chat.completion.chunk as OpenAI sends it with include_usage (about 240 bytes).
CHUNK = (
    b'data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn","object":"chat.completion.chunk",'
    b'"created":1741569952,"model":"gpt-4o-mini","system_fingerprint":"fp_06737a9306",'
    b'"choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}\n\n'
)
USAGE_CHUNK = (
    b'data: {"id":"chatcmpl-B9MBs8CjcvOU2jLn","object":"chat.completion.chunk",'
    b'"created":1741569952,"model":"gpt-4o-mini","choices":[],"usage":'
    b'{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _stream(events: int) -> bytes:
    return CHUNK * (events - 2) + USAGE_CHUNK + DONE


def _reads(blob: bytes, size: int | None) -> list[bytes]:
    """The stream as network reads: one event per read (size None) or fixed-size reads."""
    if size is None:
        return [e + b"\n\n" for e in blob.split(b"\n\n") if e]
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def split_only(reads: list[bytes]) -> int:
    s = EventSplitter()
    n = 0
    for r in reads:
        n += len(s.feed(r))
    return n


def split_and_check(reads: list[bytes]) -> int:
    """Split, take each event's data, look for [DONE] and usage without parsing."""
    s = EventSplitter()
    usage = None
    for r in reads:
        for event in s.feed(r):
            data = event_data(event)
            if data is None or is_done(data):
                continue
            found = usage_of(data)
            if found is not None:
                usage = found
    assert usage == (19, 10)
    return 0


def split_and_check_raw(reads: list[bytes]) -> int:
    """Cheapest: look at the raw event; take its data only when it may carry usage."""
    s = EventSplitter()
    usage = None
    for r in reads:
        for event in s.feed(r):
            if event == DONE:
                continue
            if has_usage(event):
                data = event_data(event)
                found = usage_of(data) if data is not None else None
                if found is not None:
                    usage = found
    assert usage == (19, 10)
    return 0


def split_and_loads(reads: list[bytes]) -> int:
    """The naive alternative: parse every chunk's JSON."""
    s = EventSplitter()
    usage = None
    for r in reads:
        for event in s.feed(r):
            data = event_data(event)
            if data is None or is_done(data):
                continue
            obj = orjson.loads(data)
            if obj.get("usage"):
                usage = obj["usage"]
    assert usage is not None
    return 0


def loads_only(datas: list[bytes]) -> int:
    for d in datas:
        orjson.loads(d)
    return 0


def _ns_per_chunk(fn: Callable[[], object], chunks: int, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number / chunks * 1e9


def measure(events: int = 2000, number: int = 20) -> dict[str, float]:
    """Nanoseconds per chunk for each variant, keyed by a short label."""
    blob = _stream(events)
    out: dict[str, float] = {}
    for label, size in (("1 event/read", None), ("4 KiB reads", 4096)):
        reads = _reads(blob, size)
        out[f"split, {label}"] = _ns_per_chunk(lambda r=reads: split_only(r), events, number)
        out[f"split+usage check, {label}"] = _ns_per_chunk(
            lambda r=reads: split_and_check(r), events, number
        )
        out[f"split+usage check on raw event, {label}"] = _ns_per_chunk(
            lambda r=reads: split_and_check_raw(r), events, number
        )
        out[f"split+orjson.loads, {label}"] = _ns_per_chunk(
            lambda r=reads: split_and_loads(r), events, number
        )
    datas = [d for e in _reads(blob, None) if (d := event_data(e)) and not is_done(d)]
    out["orjson.loads alone"] = _ns_per_chunk(lambda: loads_only(datas), events, number)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events per simulated stream")
    parser.add_argument("--number", type=int, default=20, help="streams per timing run")
    args = parser.parse_args()
    print(f"chunk size {len(CHUNK)} bytes, {args.events} events per stream")
    for label, ns in measure(args.events, args.number).items():
        print(f"{label:48s} {ns:8.0f} ns/chunk")


if __name__ == "__main__":
    main()
