"""Faults injected around a real proxy process: a misbehaving upstream (the mock's faults and a
raw-socket server for resets, trickles, half and huge bodies) and misbehaving clients.

After every fault: the node is up, the answer is the right OpenAI-shaped error within its
timeout, another key's traffic still works, and the reservation is settled (read through the
admin API, which reads the backend without reserving anything).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from proxy.tokens import TokenCounter
from tests.procs import Proc, start_mock, start_proxy, write_config
from tests.rawnet import (
    BIG_BYTES,
    STREAM_EVENTS,
    RawUpstream,
    ResetListener,
    connect,
    http_request,
    read_all,
    reset,
)

pytestmark = pytest.mark.timeout(120)

UPSTREAM_TIMEOUT_S = 1.5
CLIENT_TIMEOUT_S = 15.0  # far above every upstream timeout: a hang shows as a client timeout
ADMIN_TOKEN = "adm-faults-token-0123456789"
UPSTREAM_KEY = "sk-faults-upstream-0123456789"
OTHER_KEY = "sk-faults-other-0123456789"
N_KEYS = 40
LIMITS = {"rpm": 1000, "input_tpm": 1_000_000, "output_tpm": 1_000_000}
MOCK_MODEL = "gpt-4o-mini"  # routed to the mock process
RAW_MODEL = "raw-model"  # routed to the raw-socket upstream
RESET_MODEL = "reset-model"  # routed to a listener that resets every connection
PROMPT = [{"role": "user", "content": "Hello"}]
INPUT_TOKENS = TokenCounter().count_chat(PROMPT, MOCK_MODEL)
MAX_TOKENS = 50  # the reservation; every settled charge below differs from it


@dataclass
class Stack:
    proxy: Proc
    mock: Proc
    raw: RawUpstream
    mock_log: Path
    keys: Iterator[tuple[str, str]]


def _upstream(url: str) -> dict:
    return {
        "type": "http",
        "base_url": url + "/v1",
        "api_key_env": "FAULTS_UP_KEY",
        "timeout_s": UPSTREAM_TIMEOUT_S,
        "connect_timeout_s": 1,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("faults")
    mock_log = tmp / "mock.jsonl"
    with RawUpstream() as raw, ResetListener() as resetter:
        mock = start_mock(log_path=str(mock_log))
        keys = [
            {"name": f"f{i}", "key": f"sk-faults-key-{i:02d}-0123456789", "limits": LIMITS}
            for i in range(N_KEYS)
        ]
        keys.append({"name": "other", "key": OTHER_KEY, "limits": LIMITS})
        keys.append({"name": "bulk", "key": "sk-faults-bulk-0123456789", "limits": {"rpm": 100}})
        cfg = {
            "backend": {"type": "memory"},
            "upstreams": {
                "mock": _upstream(mock.url),
                "raw": _upstream(raw.url),
                "resetter": _upstream(resetter.url),
            },
            "default_upstream": "mock",
            "routes": {f"{RAW_MODEL}*": "raw", f"{RESET_MODEL}*": "resetter"},
            "window_s": 600,  # nothing expires during the module: usage only grows
            "admin": {"token_env": "FAULTS_ADMIN"},
            "keys": keys,
        }
        env = {"FAULTS_UP_KEY": UPSTREAM_KEY, "FAULTS_ADMIN": ADMIN_TOKEN}
        proxy = start_proxy(write_config(cfg, tmp), env=env)
        pairs = iter([(k["name"], k["key"]) for k in keys[:N_KEYS]])
        try:
            yield Stack(proxy, mock, raw, mock_log, pairs)
        finally:
            proxy.stop()
            mock.stop()


@pytest.fixture
def key(stack: Stack) -> tuple[str, str]:
    """A key of the test's own, so its usage is exactly what the test did."""
    return next(stack.keys)


# -- building blocks ------------------------------------------------------------------------------
def usage(stack: Stack, name: str) -> tuple[int, int, int]:
    r = httpx.get(
        f"{stack.proxy.url}/admin/keys/{name}",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=5,
    )
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    return (u["requests"], u["input_tokens"], u["output_tokens"])


def settles_to(stack: Stack, name: str, expected: tuple[int, int, int]) -> None:
    """Streams settle after the client saw their end: wait (bounded) for the charge."""
    deadline = time.monotonic() + 10
    got = usage(stack, name)
    while got != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        got = usage(stack, name)
    assert got == expected


def still_healthy(stack: Stack) -> None:
    """The node is up and another key's traffic is served normally."""
    assert httpx.get(stack.proxy.url + "/healthz", timeout=5).status_code == 200
    r = httpx.post(
        stack.proxy.url + "/v1/chat/completions",
        json={"model": MOCK_MODEL, "messages": PROMPT, "max_tokens": 3},
        headers={"authorization": f"Bearer {OTHER_KEY}"},
        timeout=CLIENT_TIMEOUT_S,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3


def chat(
    stack: Stack,
    secret: str,
    model: str = MOCK_MODEL,
    *,
    mock_fault: str | None = None,
    raw_fault: str | None = None,
    stream: bool = False,
) -> httpx.Response:
    headers = {"authorization": f"Bearer {secret}"}
    if mock_fault:
        headers["x-mock-fault"] = mock_fault
    if raw_fault:
        headers["x-raw-fault"] = raw_fault
    body = {"model": model, "messages": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream}
    return httpx.post(
        stack.proxy.url + "/v1/chat/completions",
        json=body,
        headers=headers,
        timeout=CLIENT_TIMEOUT_S,
    )


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    assert UPSTREAM_KEY not in r.text


def sse_datas(text: str) -> list[str]:
    return [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]


def mock_entries(stack: Stack) -> list[dict]:
    if not stack.mock_log.exists():
        return []
    return [orjson.loads(line) for line in stack.mock_log.read_text().splitlines() if line]


def wait_mock_entry(stack: Stack, fault: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [e for e in mock_entries(stack) if e.get("fault") == fault]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"the mock never finished the request with fault {fault!r}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# -- the upstream misbehaves ---------------------------------------------------------------------
@pytest.mark.parametrize("status", [429, 500, 503])
def test_upstream_error_status_passes_through_and_refunds_tokens(stack, key, status) -> None:
    name, secret = key
    r = chat(stack, secret, mock_fault=f"status={status}")
    assert_openai_error(r, status)
    assert r.json()["error"]["message"] == f"mock fault: status {status}"  # the upstream's body
    assert usage(stack, name) == (1, 0, 0)  # counted as a request, its tokens refunded
    still_healthy(stack)


def test_slow_first_byte_within_the_timeout_is_served(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, mock_fault="delay-first-ms=300,length=5")
    assert r.status_code == 200, r.text
    assert usage(stack, name) == (1, INPUT_TOKENS, 5)


@pytest.mark.parametrize("fault", ["delay-first-ms=3000", "hang"])
def test_first_byte_beyond_the_timeout_is_504(stack, key, fault) -> None:
    name, secret = key
    r = chat(stack, secret, mock_fault=fault)
    assert_openai_error(r, 504, "upstream_timeout")
    assert usage(stack, name) == (1, 0, 0)
    if fault == "hang":
        # The proxy gave up and closed its upstream connection: the mock saw the disconnect.
        assert wait_mock_entry(stack, fault)["status"] == 499
    still_healthy(stack)


def test_trickle_longer_than_the_timeout_in_total_is_served(stack, key) -> None:
    # 12 pieces 0.15 s apart: 1.65 s in all, more than timeout_s (1.5 s). The timeout bounds
    # each wait for bytes, not the whole response (a long stream must not be cut).
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="trickle")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "slow but steady"
    assert usage(stack, name) == (1, 7, 3)  # the upstream's usage


def test_body_that_stalls_beyond_the_timeout_is_504(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="stall")
    assert_openai_error(r, 504, "upstream_timeout")
    assert usage(stack, name) == (1, 0, 0)
    still_healthy(stack)


@pytest.mark.parametrize("where", ["before reading the request", "after reading the request"])
def test_connection_reset_before_the_response_is_502(stack, key, where) -> None:
    name, secret = key
    if where == "before reading the request":
        r = chat(stack, secret, RESET_MODEL)
    else:
        r = chat(stack, secret, RAW_MODEL, raw_fault="reset")
    assert_openai_error(r, 502, "upstream_unreachable")
    assert usage(stack, name) == (1, 0, 0)
    still_healthy(stack)


@pytest.mark.parametrize("source", ["raw", "mock"])
def test_connection_reset_in_the_middle_of_the_body_is_502(stack, key, source) -> None:
    name, secret = key
    if source == "raw":  # headers and part of the body, then an RST
        r = chat(stack, secret, RAW_MODEL, raw_fault="half-reset")
    else:  # the mock's cut-after on a non-streaming answer: half the body, then a close
        r = chat(stack, secret, mock_fault="cut-after=1")
    assert_openai_error(r, 502, "upstream_unreachable")
    assert usage(stack, name) == (1, 0, 0)
    still_healthy(stack)


def test_malformed_json_from_the_upstream_is_502(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="malformed")
    assert_openai_error(r, 502, "upstream_unreachable")
    assert "not valid JSON" in r.json()["error"]["message"]
    assert usage(stack, name) == (1, 0, 0)
    still_healthy(stack)


def test_stream_reset_midway_ends_the_stream_and_charges_what_was_sent(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="stream-reset", stream=True)
    assert r.status_code == 200
    datas = sse_datas(r.text)
    assert "[DONE]" not in datas  # the client can tell the stream did not complete
    text = "".join(orjson.loads(d)["choices"][0]["delta"]["content"] for d in datas)
    assert text == " sit sed do"
    # No usage came: charged the counted input and the counted streamed text.
    settles_to(stack, name, (1, INPUT_TOKENS, TokenCounter().count_text(text, RAW_MODEL)))
    still_healthy(stack)


def test_stream_with_a_malformed_event_stops_before_it(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, mock_fault="malformed-after=3", stream=True)
    assert r.status_code == 200
    datas = sse_datas(r.text)
    chunks = [orjson.loads(d) for d in datas]  # every event the client got is valid JSON
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert [c for c in contents if c] != [] and "[DONE]" not in datas
    assert len([c for c in contents if c]) == 3
    settles_to(stack, name, (1, INPUT_TOKENS, 3))
    still_healthy(stack)


def test_a_long_stream_with_an_invalid_escape_is_relayed_to_the_end(stack, key) -> None:
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="bad-escape-stream", stream=True)
    assert r.status_code == 200
    assert sse_datas(r.text)[-1] == "[DONE]"
    deadline = time.monotonic() + 10
    while usage(stack, name)[2] == MAX_TOKENS and time.monotonic() < deadline:
        time.sleep(0.05)
    # About 4 000 words were streamed and no usage came: charged the counted text.
    assert usage(stack, name)[2] > 3_000
    assert "Traceback" not in stack.proxy.output()


def test_a_20_mib_response_passes_through(stack, key) -> None:
    # Non-streaming bodies are read whole (usage is in the body), so this costs the node
    # about two copies of the body while it is handled; it must still come through intact.
    name, secret = key
    r = chat(stack, secret, RAW_MODEL, raw_fault="big")
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]
    assert len(content) == BIG_BYTES and set(content) == {"a"}
    assert usage(stack, name) == (1, 7, 3)
    still_healthy(stack)


# -- the client misbehaves -----------------------------------------------------------------------
@pytest.mark.parametrize("close", ["fin", "rst"])
def test_client_gone_before_sending_the_whole_body(stack, key, close) -> None:
    name, secret = key
    s = connect(stack.proxy.port)
    head = [("authorization", f"Bearer {secret}"), ("content-length", "5000")]
    partial = http_request(
        "POST", "/v1/chat/completions", head, b'{"model": "x', content_length=False
    )
    s.sendall(partial)
    time.sleep(0.2)
    reset(s) if close == "rst" else s.close()
    time.sleep(0.3)
    assert usage(stack, name) == (0, 0, 0)  # nothing was reserved
    still_healthy(stack)


@pytest.mark.parametrize("close", ["fin", "rst"])
def test_client_gone_while_the_upstream_works(stack, key, close) -> None:
    # A non-streaming request whose client leaves: the upstream's answer still comes and is
    # charged (the upstream bills it), then dropped; the reservation does not linger.
    name, secret = key
    s = connect(stack.proxy.port)
    body = orjson.dumps({"model": MOCK_MODEL, "messages": PROMPT, "max_tokens": MAX_TOKENS})
    head = [("authorization", f"Bearer {secret}"), ("x-mock-fault", "delay-first-ms=500,length=5")]
    s.sendall(http_request("POST", "/v1/chat/completions", head, body))
    time.sleep(0.2)
    reset(s) if close == "rst" else s.close()
    settles_to(stack, name, (1, INPUT_TOKENS, 5))
    still_healthy(stack)


def _open_stream(stack: Stack, secret: str, model: str, max_tokens: int, **kw) -> socket.socket:
    body = orjson.dumps(
        {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    )
    s = connect(stack.proxy.port, **kw)
    head = [("authorization", f"Bearer {secret}")]
    if model == RAW_MODEL:
        head.append(("x-raw-fault", "slow-stream"))
    s.sendall(http_request("POST", "/v1/chat/completions", head, body))
    return s


def test_client_gone_mid_stream_closes_the_upstream_and_settles(stack, key) -> None:
    name, secret = key
    seen_before = len(stack.raw.seen)
    s = _open_stream(stack, secret, RAW_MODEL, MAX_TOKENS)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    time.sleep(0.2)
    reset(s)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ups = stack.raw.seen[seen_before:]
        if ups and ups[-1].closed_early:
            break
        time.sleep(0.05)
    up = stack.raw.seen[-1]
    assert up.closed_early and up.sent_events < STREAM_EVENTS  # the proxy hung up upstream
    # Charged what was relayed (each event is one token), not the reservation of 50.
    deadline = time.monotonic() + 10
    while usage(stack, name)[2] == MAX_TOKENS and time.monotonic() < deadline:
        time.sleep(0.05)
    requests, input_tokens, output_tokens = usage(stack, name)
    assert (requests, input_tokens) == (1, INPUT_TOKENS)
    assert 0 <= output_tokens <= up.sent_events < MAX_TOKENS
    still_healthy(stack)


def test_client_gone_mid_stream_from_a_fast_upstream_closes_it(stack, key) -> None:
    _, secret = key
    fault = "delay-first-ms=1,length=300000"  # a unique tag for the mock log; no real fault
    body = orjson.dumps(
        {"model": MOCK_MODEL, "messages": PROMPT, "max_tokens": 300_000, "stream": True}
    )
    s = connect(stack.proxy.port)
    head = [("authorization", f"Bearer {secret}"), ("x-mock-fault", fault)]
    s.sendall(http_request("POST", "/v1/chat/completions", head, body))
    assert s.recv(65536).startswith(b"HTTP/1.1 200")
    time.sleep(0.3)
    s.close()
    entry = wait_mock_entry(stack, fault)
    # The mock saw its client (the proxy) go away well before producing the whole answer.
    assert entry["status"] == 499 and entry["completion_tokens"] < 150_000


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_a_client_that_does_not_read_gets_back_pressure_not_buffering(stack) -> None:
    """A stream much larger than any buffer, to a client with a tiny receive window that
    reads nothing: the proxy must hold only about a socket buffer's worth, not the stream."""
    secret = "sk-faults-bulk-0123456789"  # no token limits: 300 000 output tokens may reserve
    warm = _open_stream(stack, secret, MOCK_MODEL, 5)  # the tokenizer and code paths loaded
    read_all(warm)
    warm.close()
    s = _open_stream(stack, secret, MOCK_MODEL, 300_000, rcvbuf=4096)
    try:
        time.sleep(0.5)  # the pipe fills: kernel buffers, then uvicorn's flow control
        before = rss_mb(stack.proxy.pid)
        time.sleep(2.5)  # unthrottled, the mock would have sent ~50 MiB meanwhile
        after = rss_mb(stack.proxy.pid)
        assert after - before < 16, (before, after)
        still_healthy(stack)  # a stalled stream does not stall the node
    finally:
        reset(s)
    still_healthy(stack)


def test_hundreds_of_idle_connections_do_not_stop_service(stack) -> None:
    idle = [connect(stack.proxy.port) for _ in range(300)]
    # And some that started a request and never finished its headers (slowloris-style).
    partial = [connect(stack.proxy.port) for _ in range(50)]
    for s in partial:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-")
    try:
        for _ in range(5):
            still_healthy(stack)
    finally:
        for s in idle + partial:
            s.close()
    still_healthy(stack)
