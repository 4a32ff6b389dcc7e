"""/healthz (alive) and /readyz (config loaded, backend answers; upstreams reported only)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy import health
from proxy.backends.memory import MemoryBackend
from proxy.backends.redis import RedisBackend, RedisSettings
from tests.conftest import make_config
from tests.servers import RedisServer, find_server_binary


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when we return: nothing listens there


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def test_healthz(make_client) -> None:
    r = await make_client().get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_readyz_reports_upstreams_but_does_not_need_them(make_client) -> None:
    up = _listening()
    try:
        cfg = make_config(
            upstreams={
                "mock": {"type": "mock"},
                "up": {"type": "http", "base_url": f"http://127.0.0.1:{up.getsockname()[1]}/v1"},
                "down": {"type": "http", "base_url": f"http://127.0.0.1:{_closed_port()}/v1"},
            }
        )
        r = await make_client(cfg).get("/readyz")
    finally:
        up.close()
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["config"] == {"loaded": True, "keys": 2}
    assert body["backend"] == {"type": "memory", "reachable": True}
    assert body["upstreams"] == {
        "mock": {"reachable": True},
        "up": {"reachable": True},
        "down": {"reachable": False},
    }


class _PingBackend(MemoryBackend):
    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer = answer

    async def ping(self) -> bool:
        if self.answer == "hang":
            await asyncio.sleep(3600)
        if self.answer == "raise":
            raise OSError("boom")
        return self.answer == "yes"


@pytest.mark.parametrize("answer", ["no", "hang", "raise"])
async def test_readyz_503_when_backend_does_not_answer(make_client, monkeypatch, answer) -> None:
    monkeypatch.setattr(health, "PING_TIMEOUT_S", 0.05)
    r = await make_client(backend=_PingBackend(answer)).get("/readyz")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"
    assert r.json()["backend"]["reachable"] is False
    # Liveness is not readiness: the process itself is fine.
    assert (await make_client(backend=_PingBackend(answer)).get("/healthz")).status_code == 200


@pytest.mark.redis
async def test_readyz_follows_a_real_redis(make_client) -> None:
    try:
        binary = find_server_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with RedisServer(binary=binary) as server:
        backend = RedisBackend.from_settings(RedisSettings(url=server.url, timeout_ms=200))
        cfg = make_config(backend={"type": "redis", "url": server.url})
        c = make_client(cfg, backend=backend)
        assert (await c.get("/readyz")).status_code == 200
        server.stop()
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["backend"] == {"type": "redis", "reachable": False}
        server.start()
        assert (await c.get("/readyz")).status_code == 200
        await backend.aclose()
