"""The generator's own ceiling: requests/s it reaches against a server that does nothing.

A raw asyncio protocol answers every request with the same small JSON, so the number measured
is what this machine's generator (and that trivial server) can do; a real run near it is
limited by the generator, not by the system under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import cast

_BODY = b'{"id":"x","object":"chat.completion","usage":{"prompt_tokens":1,"completion_tokens":1}}'
_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_BODY)).encode()
    + b"\r\n\r\n"
    + _BODY
)


class TrivialProtocol(asyncio.Protocol):
    """Answers each complete request (head + content-length body) with ``_RESPONSE``."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = 0
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end].lower()
            length = 0
            if (i := head.find(b"content-length:")) >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15 : j if j >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            out += 1
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(_RESPONSE * out)


async def serve_trivial(port: int, max_seconds: float, announce: bool = True) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TrivialProtocol, "127.0.0.1", port, backlog=1024)
    if announce:
        bound = server.sockets[0].getsockname()[1]
        sys.stdout.write(f"{bound}\n")
        sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)  # never outlives its measurement
    server.close()


def start_trivial_server(max_seconds: float = 120.0) -> tuple[subprocess.Popen[str], int]:
    """The trivial server in its own process (so it does not share the generator's core)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "trivial-server", "--max-seconds", str(max_seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError("trivial server did not start")
    return proc, int(line)


def stop_process(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(processes: int = 1, duration: float = 2.0, concurrency: int | None = None) -> float:
    """Closed-loop requests/s against a fresh trivial server, in this process."""
    from loadtest.config import LoadConfig
    from loadtest.generator import run_load_sync

    proc, port = start_trivial_server(max_seconds=duration + 60)
    try:
        cfg = LoadConfig(
            urls=(f"http://127.0.0.1:{port}",),
            concurrency=concurrency or max(64, 32 * processes),
            duration=duration,
            processes=processes,
            measure_ceiling=False,
            timeout=10.0,
        )
        results = run_load_sync(cfg)
    finally:
        stop_process(proc)
    ok = sum(1 for s in results["status"] if s == 200)
    return ok / results.elapsed_s if results.elapsed_s > 0 else 0.0


def measure_in_subprocess(processes: int = 1, duration: float = 2.0) -> float:
    """``measure`` in a fresh interpreter: callable from a running event loop or a forked
    worker without disturbing either."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest",
            "ceiling",
            "--json",
            "--processes",
            str(processes),
            "--duration",
            str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 120,
        check=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return float(json.loads(out.stdout)["ceiling_rps"])
