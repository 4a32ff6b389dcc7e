"""Raw sockets for tests: an HTTP client that sends exactly the bytes given, and a scripted
upstream that misbehaves on request (resets, trickles, half bodies, huge bodies, echoes)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Self

import orjson

HOST = "127.0.0.1"
FAULT_HEADER = "x-raw-fault"


# -- client ------------------------------------------------------------------------------------
@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return orjson.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
    resp = RawResponse(status, headers, body)  # type: ignore[arg-type]
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        resp.body = _dechunk(body)
    return resp


def connect(port: int, timeout: float = 10.0, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # before connect, so the window is small from the handshake on
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect((HOST, port))
    return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def raw_request(port: int, data: bytes, timeout: float = 15.0) -> RawResponse:
    """Send ``data`` as is (it should ask for ``Connection: close``) and read to the end."""
    with connect(port, timeout) as s:
        s.sendall(data)
        return parse_response(read_all(s))


def http_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """Bytes of one HTTP/1.1 request; header values are taken literally (CR/LF included)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if content_length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def reset(s: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# -- the scripted upstream -----------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the upstream received it."""

    raw: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    fault: str
    sent_events: int = 0  # for streaming faults: how many events went out before it ended
    closed_early: bool = False  # the other side went away before the upstream finished

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def completion_json(content: str = "hi", prompt_tokens: int = 7, completion_tokens: int = 3):
    return orjson.dumps(
        {
            "id": "chatcmpl-raw",
            "object": "chat.completion",
            "created": 1,
            "model": "raw",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def sse_event(content: str) -> bytes:
    obj = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "raw",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(body: bytes, status: int = 200, extra: list[tuple[str, str]] | None = None):
    # One request per connection: the pool must never reuse one this server is closing.
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    return _head(status, headers + (extra or [])) + body


KNOWN_PATHS = ("/v1/chat/completions", "/v1/models")
_ERROR = {"message": "not found", "type": "invalid_request_error", "param": None, "code": None}
NOT_FOUND = orjson.dumps({"error": _ERROR})
SSE_HEAD = _head(200, [("content-type", "text/event-stream"), ("connection", "close")])
BIG_BYTES = 20 * 1024 * 1024
STREAM_EVENTS = 40  # slow-stream: at most this many events, one per STREAM_GAP_S
STREAM_GAP_S = 0.05
TRICKLE_PIECES, TRICKLE_GAP_S = 12, 0.15  # 1.65 s in all, no gap near a 1.5 s timeout


class _Listener:
    """A loopback TCP listener whose accept loop runs on a thread; ``_accepted`` takes each
    connection."""

    def __init__(self, backlog: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        self._thread.join(5)

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted(conn)

    def _accepted(self, conn: socket.socket) -> None:
        raise NotImplementedError


class RawUpstream(_Listener):
    """A threaded TCP server that plays one fault per request, chosen by ``x-raw-fault``.

    Faults: ``ok`` (a valid completion; 404 off the known paths), ``reset`` (RST after
    reading the request), ``half-reset`` (headers and half the body, then RST),
    ``stream-reset`` (3 SSE events, then RST), ``slow-stream`` (an event every 50 ms, up to
    40, until the reader goes away), ``malformed`` (200 with invalid JSON), ``big`` (a 20 MiB
    completion), ``trickle`` (the body in 12 pieces 0.15 s apart), ``stall`` (half the body,
    then silence for 5 s), ``bad-escape-stream`` (300 KiB of events, one with an invalid JSON
    escape, 300 KiB more), ``echo`` (401 whose body and headers echo every request header).
    Every request is recorded in ``seen``. A reset before the request is read: ResetListener.
    """

    def __init__(self) -> None:
        super().__init__(backlog=512)
        self.seen: list[Seen] = []

    def _accepted(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> Seen | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            rest += chunk
        fault = next((v for k, v in headers if k.lower() == FAULT_HEADER), "ok")
        return Seen(buf, method, target, headers, rest, fault)  # type: ignore[arg-type]

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            seen = self._read_request(conn)
            if seen is None:
                conn.close()
                return
            self.seen.append(seen)
            self._play(conn, seen)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _play(self, conn: socket.socket, seen: Seen) -> None:
        fault = seen.fault
        if fault == "ok":
            if seen.target.split("?")[0] in KNOWN_PATHS:
                conn.sendall(json_response(completion_json()))
            else:
                conn.sendall(json_response(NOT_FOUND, 404))
        elif fault == "reset":
            reset(conn)
        elif fault == "half-reset":
            data = json_response(completion_json("x" * 2000))
            conn.sendall(data[: len(data) - 1000])
            time.sleep(0.05)
            reset(conn)
        elif fault == "stream-reset":
            conn.sendall(SSE_HEAD + b"".join(sse_event(w) for w in (" sit", " sed", " do")))
            time.sleep(0.05)
            reset(conn)
        elif fault == "slow-stream":
            conn.sendall(SSE_HEAD)
            try:
                for _ in range(STREAM_EVENTS):
                    time.sleep(STREAM_GAP_S)
                    conn.sendall(sse_event(" sit"))
                    seen.sent_events += 1
                conn.sendall(b"data: [DONE]\n\n")
            except OSError:
                seen.closed_early = True
        elif fault == "bad-escape-stream":
            # Past the relay's raw budget (256 KiB), then a chunk whose JSON string has an
            # invalid escape (\x): a sloppy upstream, not a broken stream.
            bad = sse_event("@").replace(b"@", b"\\x41")
            conn.sendall(SSE_HEAD + sse_event(" sit") * 2000 + bad)
            conn.sendall(sse_event(" sed") * 2000 + b"data: [DONE]\n\n")
        elif fault == "malformed":
            conn.sendall(json_response(b'{"id": "x", "choices": [oops'))
        elif fault == "big":
            content = "a" * BIG_BYTES
            conn.sendall(json_response(completion_json(content, 7, 3)))
        elif fault == "trickle":
            data = json_response(completion_json("slow but steady"))
            step = len(data) // TRICKLE_PIECES + 1
            for i in range(0, len(data), step):
                if i:
                    time.sleep(TRICKLE_GAP_S)
                conn.sendall(data[i : i + step])
        elif fault == "stall":
            data = json_response(completion_json("x" * 2000))
            conn.sendall(data[: len(data) // 2])
            time.sleep(5)
        elif fault == "echo":
            echoed = [f"{k}: {v}" for k, v in seen.headers]
            body = orjson.dumps(
                {
                    "error": {
                        "message": "Incorrect API key provided. You sent: " + " | ".join(echoed),
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                }
            )
            auth = seen.header("authorization") or ""
            conn.sendall(json_response(body, 401, [("x-echo-authorization", auth)]))
        else:
            conn.sendall(json_response(b'{"error": "unknown raw fault"}', 500))


class ResetListener(_Listener):
    """Accepts and immediately resets every connection, before reading anything."""

    def __init__(self) -> None:
        super().__init__(backlog=64)
        self.accepted = 0

    def _accepted(self, conn: socket.socket) -> None:
        self.accepted += 1
        reset(conn)
