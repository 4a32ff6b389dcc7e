"""SIGTERM: no new connections, in-flight streams finish within shutdown_grace_s, a stream still
running at the end is cut and settled for what was sent, and every settlement reaches Redis
before the process exits."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import uuid

import httpx
import orjson
import pytest

from proxy.backends.redis import RedisBackend, RedisSettings
from proxy.config import load_config
from proxy.limiter import build_policies
from proxy.tokens import TokenCounter
from tests.conftest import KEY_A, auth
from tests.ops_support import chat, wait_until
from tests.procs import start_proxy, write_config

pytestmark = pytest.mark.redis
MODEL = "gpt-4o-mini"


def stack(tmp_path, redis_server, grace: float):
    prefix = f"s{uuid.uuid4().hex}"
    cfg = {
        "backend": {"type": "redis", "url": redis_server.url, "key_prefix": prefix},
        "upstreams": {"mock": {"type": "mock", "tokens_per_second": 20}},
        "default_upstream": "mock",
        "shutdown_grace_s": grace,
        "keys": [{"name": "t", "key": KEY_A, "limits": {"rpm": 100, "output_tpm": 100_000}}],
    }
    path = write_config(cfg, tmp_path)
    return path, prefix, start_proxy(path)


def usage(path, redis_server, prefix: str) -> tuple[int, int, int]:
    (policy,) = build_policies(load_config(path)).values()

    async def peek():
        backend = RedisBackend.from_settings(RedisSettings(url=redis_server.url, key_prefix=prefix))
        try:
            (state,) = await backend.peek(policy.all_scopes())
        finally:
            await backend.aclose()
        return state.used

    return asyncio.run(peek())


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def exited_gracefully(proxy) -> bool:
    # uvicorn re-raises the SIGTERM it handled once it has shut down: -15 is the normal end.
    code = proxy.popen.wait(30)
    out = proxy.output()
    return code in (0, -signal.SIGTERM) and "Application shutdown complete" in out


def content_of(lines: list[str]) -> str:
    text = ""
    for line in lines:
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:]).get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
    return text


def test_in_flight_stream_finishes_and_settles(tmp_path, redis_server) -> None:
    path, prefix, proxy = stack(tmp_path, redis_server, grace=30)
    try:
        # Reserve 200 output tokens; the answer ends naturally after 100 (5 s at 20 tokens/s).
        body = chat(MODEL, max_tokens=200, stream=True)
        headers = {**auth(), "x-mock-fault": "length=100"}
        url = proxy.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert usage(path, redis_server, prefix)[2] == 200  # reserved while it runs
            proxy.signal(signal.SIGTERM)
            wait_until(lambda: refused(proxy.url), "the listener to close")
            assert proxy.popen.poll() is None  # ... while the stream is still being served
            rest = [first, *lines]
        assert [x for x in rest if x][-1] == "data: [DONE]"
        assert exited_gracefully(proxy)
    finally:
        proxy.stop()
    text = content_of(rest)
    out_tokens = TokenCounter("cl100k_base").count_text(text, MODEL)
    assert out_tokens >= 95
    # After the exit, Redis holds the settled charge, not the reservation.
    used = usage(path, redis_server, prefix)
    assert used[0] == 1 and used[2] == 100
    assert "timeout graceful shutdown exceeded" not in proxy.output()


def test_stream_cut_at_the_end_of_grace_is_settled_for_what_was_sent(
    tmp_path, redis_server
) -> None:
    path, prefix, proxy = stack(tmp_path, redis_server, grace=1)
    lines: list[str] = []
    try:
        body = chat(MODEL, max_tokens=400, stream=True)  # 20 s: far longer than the grace
        url = proxy.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=auth(), timeout=60) as r:
            it = r.iter_lines()
            lines.append(next(it))
            proxy.signal(signal.SIGTERM)
            with contextlib.suppress(httpx.HTTPError):  # the proxy closed it mid-stream
                lines.extend(it)
        assert exited_gracefully(proxy)
    finally:
        proxy.stop()
    assert "data: [DONE]" not in lines
    received = TokenCounter("cl100k_base").count_text(content_of(lines), MODEL)
    assert 0 < received < 400
    used = usage(path, redis_server, prefix)
    assert used[0] == 1
    # The reservation of 400 was replaced by what was streamed (a chunk in the socket at the
    # cut may not have reached us).
    assert received <= used[2] <= received + 3
    out = proxy.output()
    assert "timeout graceful shutdown exceeded" in out
    (line,) = [orjson.loads(x) for x in out.splitlines() if x.startswith('{"time"')]
    assert line["stream"] is True and line["output_tokens_charged"] == used[2]
