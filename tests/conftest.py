"""Shared fixtures: configs built in code, an in-process app client, real Redis servers."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.backends.memory import MemoryBackend
from proxy.config import Config, parse_config
from tests.servers import redis_cluster, redis_sentinel, redis_server  # noqa: F401

ROOT_EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.yaml"
KEY_A = "sk-test-key-a-0123456789"
KEY_B = "sk-test-key-b-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"

BASE_CONFIG: dict[str, Any] = {
    "backend": {"type": "memory"},
    "upstreams": {"mock": {"type": "mock"}},
    "default_upstream": "mock",
    "keys": [
        {
            "name": "team-a",
            "key": KEY_A,
            "limits": {"rpm": 10, "input_tpm": 10_000, "output_tpm": 2_000},
        },
        {"name": "team-b", "key": KEY_B, "limits": {"rpm": 100}},
    ],
}


def config_dict(**overrides: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE_CONFIG)
    data.update(copy.deepcopy(overrides))
    return data


def make_config(env: dict[str, str] | None = None, **overrides: Any) -> Config:
    return parse_config(config_dict(**overrides), "test.yaml", env or {"UP_KEY": UPSTREAM_KEY})


class FakeClock:
    def __init__(self, start: int = 1_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(clock: FakeClock):
    """Build an app from a config and return an httpx client that talks to it in-process."""
    clients: list[httpx.AsyncClient] = []

    def build(cfg: Config | None = None, backend=None) -> httpx.AsyncClient:
        from proxy.app import create_app

        cfg = cfg or make_config()
        app = create_app(cfg, backend or MemoryBackend(clock))
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy")
        c.app = app  # type: ignore[attr-defined]
        clients.append(c)
        return c

    yield build


@pytest.fixture
async def client(make_client) -> AsyncIterator[httpx.AsyncClient]:
    c = make_client()
    yield c
    await c.aclose()


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
