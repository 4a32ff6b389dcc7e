"""Streaming through the proxy vs the upstream alone: first-byte latency, per-chunk relay latency,
and the proxy's CPU per streamed chunk, all on loopback in one run.

Run: ``python -m loadtest.bench_stream [--samples N] [--streams N] [--concurrency N] [--tps N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from loadtest.procs import (
    HOST,
    Child,
    free_port,
    machine,
    process_cpu_s,
    start_mock,
    start_proxy,
    stop_all,
    write_yaml,
)
from proxy.sse import EventSplitter

KEY = "sk-bench-stream-0123456789"
_STAMP = re.compile(rb'"t":(\d+)')

# --------------------------------------------------------------------------- stamping upstream
# A minimal OpenAI-shaped SSE server whose every chunk carries the CLOCK_MONOTONIC time it was
# written ("t", ns). The clock is the same for every process on the machine, so a client can
# tell exactly how long each chunk took to reach it: straight, or through the proxy.


def _stamp_event(t_ns: int, include_usage: bool) -> bytes:
    tail = b',"usage":null}' if include_usage else b"}"
    return (
        b'data: {"id":"chatcmpl-stamp","object":"chat.completion.chunk","created":1,'
        b'"model":"stamp","system_fingerprint":"fp_stamp","choices":[{"index":0,"delta":'
        b'{"content":" sit"},"logprobs":null,"finish_reason":null}],"t":%d%s\n\n' % (t_ns, tail)
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _stamp_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            raw = await reader.readexactly(length) if length else b""
            if not head.startswith(b"POST"):
                body = b'{"object":"list","data":[]}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                continue
            req = orjson.loads(raw)
            chunks = int(req.get("max_tokens") or 16)
            gap = float(req.get("stamp_gap_us", 2000)) / 1e6
            opts = req.get("stream_options") or {}
            usage = opts.get("include_usage") is True
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            await writer.drain()
            for _ in range(chunks):
                await asyncio.sleep(gap)
                writer.write(_chunk(_stamp_event(time.monotonic_ns(), usage)))
            tail = b""
            if usage:
                tail = (
                    b'data: {"id":"chatcmpl-stamp","object":"chat.completion.chunk","created":1,'
                    b'"model":"stamp","choices":[],"usage":{"prompt_tokens":9,'
                    b'"completion_tokens":%d,"total_tokens":%d}}\n\n' % (chunks, chunks + 9)
                )
            writer.write(_chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_stamp(port: int) -> None:
    server = await asyncio.start_server(_stamp_conn, HOST, port)
    async with server:
        await server.serve_forever()


def start_stamp() -> Child:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.bench_stream", "--stamp-server", str(port)]
    return Child("stamp", args, f"http://{HOST}:{port}").wait_http("/v1/models")


# --------------------------------------------------------------------------- raw client


@dataclass
class Timing:
    t_headers: int = 0  # ns from the request's write to the end of the response headers
    t_first: int = 0  # ns to the first body byte
    chunk_lags: list[int] = field(default_factory=list)  # stamped chunks: ns from write to read
    events: int = 0


class Conn:
    """One keep-alive HTTP/1.1 connection; reads chunked SSE with the time of every read."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict, on_stamp: bool = False) -> Timing:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.reader, self.writer
        assert reader is not None
        payload = orjson.dumps(body)
        request = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
            f"authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        timing = Timing()
        t0 = time.monotonic_ns()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        timing.t_headers = time.monotonic_ns() - t0
        status = int(head.split(b" ", 2)[1])
        if status != 200 or b"chunked" not in head.lower():
            raise RuntimeError(f"unexpected response: {head[:200]!r}")
        splitter = EventSplitter()
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            now = time.monotonic_ns()
            if not timing.t_first:
                timing.t_first = now - t0
            for event in splitter.feed(data[:-2]):
                timing.events += 1
                if on_stamp:
                    m = _STAMP.search(event)
                    if m:
                        timing.chunk_lags.append(now - int(m.group(1)))
        return timing

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- phases


def _pcts(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p90": q[89], "p99": q[98], "n": len(values)}


def _chat(model: str, max_tokens: int, **extra: object) -> dict:
    messages = [{"role": "user", "content": "Write a short poem about rate limits."}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, **extra}


async def first_byte(direct: str, proxied: str, samples: int) -> dict[str, dict]:
    """Sequential streams, alternating targets: time to the first body byte (and headers)."""
    out: dict[str, dict[str, list[float]]] = {
        t: {"first_byte_ms": [], "headers_ms": []} for t in ("direct", "proxy")
    }
    conns = {"direct": Conn(direct), "proxy": Conn(proxied)}
    body = _chat("gpt-4o-mini", 1)
    for _ in range(20):  # warm up: connections, caches, the proxy's first-request work
        for c in conns.values():
            await c.post("/v1/chat/completions", body)
    for _ in range(samples):
        for name, c in conns.items():
            t = await c.post("/v1/chat/completions", body)
            out[name]["first_byte_ms"].append(t.t_first / 1e6)
            out[name]["headers_ms"].append(t.t_headers / 1e6)
    for c in conns.values():
        c.close()
    return {name: {k: _pcts(v) for k, v in d.items()} for name, d in out.items()}


async def relay_lag(direct: str, proxied: str, samples: int, chunks: int) -> dict[str, dict]:
    """Stamped chunks: from the upstream's write to the client's read, first and every chunk."""
    out: dict[str, dict[str, list[float]]] = {
        t: {"first": [], "all": []} for t in ("direct", "proxy")
    }
    conns = {"direct": Conn(direct), "proxy": Conn(proxied)}
    body = _chat("stamp-bench", chunks, stamp_gap_us=2000)
    for _ in range(5):
        for c in conns.values():
            await c.post("/v1/chat/completions", body, on_stamp=True)
    for _ in range(samples):
        for name, c in conns.items():
            t = await c.post("/v1/chat/completions", body, on_stamp=True)
            lags = [lag / 1e3 for lag in t.chunk_lags]
            out[name]["first"].append(lags[0])
            out[name]["all"].extend(lags)
    for c in conns.values():
        c.close()
    return {name: {k: _pcts(v) for k, v in d.items()} for name, d in out.items()}


async def _drive(url: str, streams: int, concurrency: int, tokens: int) -> int:
    """``streams`` streams of ``tokens`` tokens, ``concurrency`` at a time; events received."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(streams):
        queue.put_nowait(i)
    body = _chat("gpt-4o-mini", tokens)
    total = 0

    async def worker() -> None:
        nonlocal total
        conn = Conn(url)
        try:
            while not queue.empty():
                queue.get_nowait()
                events = (await conn.post("/v1/chat/completions", body)).events
                total += events  # not `total += await ...`: that reads total before awaiting
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


async def cpu_per_chunk(
    target: str, pids: dict[str, int], streams: int, concurrency: int, lengths: tuple[int, int]
) -> dict[str, dict[str, float]]:
    """CPU seconds of each process (/proc/PID/stat: user + system, all threads) over a short and
    a long run; the difference gives the cost per chunk, the short run the rest per stream."""
    await _drive(target, concurrency, concurrency, 4)  # warm up
    runs = []
    for tokens in lengths:
        before = {n: process_cpu_s(p) or 0.0 for n, p in pids.items()}
        t0 = time.monotonic()
        events = await _drive(target, streams, concurrency, tokens)
        wall = time.monotonic() - t0
        after = {n: process_cpu_s(p) or 0.0 for n, p in pids.items()}
        runs.append((events, wall, {n: after[n] - before[n] for n in pids}))
    (e_short, _, cpu_short), (e_long, wall_long, cpu_long) = runs
    out = {}
    for name in pids:
        per_chunk = (cpu_long[name] - cpu_short[name]) / (e_long - e_short)
        per_stream = (cpu_short[name] - per_chunk * e_short) / streams
        out[name] = {
            "us_per_chunk": per_chunk * 1e6,
            "us_per_stream": per_stream * 1e6,
            "cpu_share_long_run": cpu_long[name] / wall_long,
        }
    out["run"] = {"events_long": e_long, "chunks_per_s_long": e_long / wall_long}
    return out


# --------------------------------------------------------------------------- main


def _proxy_config(mock_url: str, stamp_url: str) -> dict:
    return {
        "backend": {"type": "memory"},
        "upstreams": {
            "mock": {"type": "http", "base_url": mock_url + "/v1"},
            "stamp": {"type": "http", "base_url": stamp_url + "/v1"},
        },
        "default_upstream": "mock",
        "routes": {"stamp-*": "stamp"},
        "logging": {"level": "warning"},
        "keys": [{"name": "bench", "key": KEY, "limits": {"rpm": 10_000_000}}],
    }


async def _bench(args: argparse.Namespace, mock: Child, stamp: Child, proxy: Child) -> dict:
    result: dict = {
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    result["first_byte"] = await first_byte(mock.url, proxy.url, args.samples)
    result["relay_lag_us"] = await relay_lag(stamp.url, proxy.url, args.samples // 4 or 1, 32)
    lengths = (args.short_tokens, args.long_tokens)
    pids = {"proxy": proxy.pid, "mock": mock.pid}
    result["cpu_through_proxy"] = await cpu_per_chunk(
        proxy.url, pids, args.streams, args.concurrency, lengths
    )
    result["cpu_direct"] = await cpu_per_chunk(
        mock.url, {"mock": mock.pid}, args.streams, args.concurrency, lengths
    )
    return result


def _print(r: dict) -> None:
    m = r["machine"]
    print(f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, {m['platform']}")
    fb = r["first_byte"]
    n = fb["direct"]["first_byte_ms"]["n"]
    print(f"\nTime to first body byte (and to the headers), ms, {n} sequential streams each")
    print(f"  {'':32s}{'p50':>8s}{'p90':>8s}{'p99':>8s}")
    for name, label in (("direct", "direct to the mock"), ("proxy", "through the proxy")):
        for key, what in (("first_byte_ms", "first byte"), ("headers_ms", "headers")):
            p = fb[name][key]
            print(f"  {label + ', ' + what:32s}{p['p50']:8.2f}{p['p90']:8.2f}{p['p99']:8.2f}")
    lag = r["relay_lag_us"]
    print("\nUpstream's write of a chunk -> client's read of it, us (stamped upstream)")
    print(f"  {'':32s}{'p50':>8s}{'p90':>8s}{'p99':>8s}")
    for name, label in (("direct", "direct"), ("proxy", "through the proxy")):
        for key, what in (("first", "first chunk"), ("all", "every chunk")):
            p = lag[name][key]
            print(f"  {label + ', ' + what:32s}{p['p50']:8.0f}{p['p90']:8.0f}{p['p99']:8.0f}")
    a = r["args"]
    cp, cd = r["cpu_through_proxy"], r["cpu_direct"]
    print(
        f"\nCPU, {a['concurrency']} concurrent streams at {a['tps']:g} tokens/s each "
        f"({cp['run']['chunks_per_s_long']:.0f} chunks/s), fit of {a['short_tokens']}- and "
        f"{a['long_tokens']}-token runs"
    )
    print(f"  {'':34s}{'us/chunk':>10s}{'us/stream':>11s}{'CPU share':>11s}")
    rows: list[tuple[str, dict[str, float]]] = [
        ("proxy", cp["proxy"]),
        ("mock, behind the proxy", cp["mock"]),
        ("mock alone (client direct)", cd["mock"]),
    ]
    for label, v in rows:
        print(
            f"  {label:34s}{v['us_per_chunk']:10.1f}{v['us_per_stream']:11.0f}"
            f"{v['cpu_share_long_run']:10.0%}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="sequential first-byte samples")
    parser.add_argument("--streams", type=int, default=128, help="streams per CPU run")
    parser.add_argument("--concurrency", type=int, default=32, help="streams at once (CPU runs)")
    parser.add_argument("--tps", type=float, default=100, help="mock tokens/s per stream")
    parser.add_argument("--short-tokens", type=int, default=20)
    parser.add_argument("--long-tokens", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--stamp-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stamp_server:
        asyncio.run(_serve_stamp(args.stamp_server))
        return 0
    children: list[Child] = []
    try:
        mock = start_mock(extra=("--tokens-per-second", str(args.tps)))
        children.append(mock)
        stamp = start_stamp()
        children.append(stamp)
        with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
            config = write_yaml(_proxy_config(mock.url, stamp.url), tmp, "proxy.yaml")
            proxy = start_proxy(config)
            children.append(proxy)
            result = _run(lambda: _bench(args, mock, stamp, proxy))
    finally:
        stop_all(children)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _run(factory: Callable) -> dict:
    try:
        import uvloop

        return uvloop.run(factory())
    except ImportError:
        return asyncio.run(factory())


if __name__ == "__main__":
    raise SystemExit(main())
