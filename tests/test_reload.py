"""Hot reload: file changes and SIGHUP, atomic swap, rejection of invalid files, usage kept,
replaced upstream clients closed only when unused, and SIGHUP with several workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import yaml

from proxy.app import create_app
from proxy.backends.memory import MemoryBackend
from proxy.config import load_config
from proxy.exchange import Exchange
from tests.conftest import KEY_A, KEY_B, auth, config_dict
from tests.ops_support import async_wait_until, chat, wait_until
from tests.procs import start_proxy, write_config

NEW_KEY = "sk-test-key-new-0123456789"


def write(path: Path, data: dict) -> None:
    # Replace the file in one step, as editors and config managers do.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data))
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def running(path: Path, backend=None) -> AsyncIterator[tuple]:
    app = create_app(load_config(path), backend or MemoryBackend(), config_path=str(path))
    app.state.reloader.poll_s = 0.05
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as c:
            yield app, c


async def reloads(app, n: int) -> None:
    async def done() -> bool:
        return app.state.reloader.reloads >= n

    await async_wait_until(done, f"{n} reload(s)")


async def test_file_change_applies_and_usage_survives(tmp_path) -> None:
    path = tmp_path / "proxy.yaml"
    data = config_dict()
    write(path, data)
    async with running(path) as (app, c):
        node = app.state.node
        first, backend = node.snapshot, node.backend
        for _ in range(3):
            r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
            assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-requests"] == "7"
        data["keys"][0]["limits"]["rpm"] = 4
        write(path, data)
        await reloads(app, 1)
        assert node.snapshot is not first and node.backend is backend
        # The 3 requests made under the old limits still count under the new ones.
        r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
        assert r.status_code == 200
        assert r.headers["x-ratelimit-limit-requests"] == "4"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
        assert r.status_code == 429


async def test_new_key_and_removed_key(tmp_path) -> None:
    path = tmp_path / "proxy.yaml"
    data = config_dict()
    write(path, data)
    async with running(path) as (app, c):
        assert (
            await c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=auth(NEW_KEY))
        ).status_code == 401
        data["keys"] = [data["keys"][0], {"name": "new", "key": NEW_KEY}]
        write(path, data)
        await reloads(app, 1)
        r = await c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=auth(NEW_KEY))
        assert r.status_code == 200
        r = await c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=auth(KEY_B))
        assert r.status_code == 401


async def test_invalid_file_is_rejected_with_one_line(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    path = tmp_path / "proxy.yaml"
    data = config_dict()
    write(path, data)
    async with running(path) as (app, c):
        before = app.state.node.snapshot
        bad = config_dict()
        bad["keys"][0]["limits"]["rpm"] = -5
        bad["window_s"] = 0
        write(path, bad)

        async def rejected() -> list:
            return [r for r in caplog.records if r.levelno >= logging.ERROR]

        await async_wait_until(rejected, "the rejection")
        # A few more polls of the same (still invalid) file: no repetition.
        await asyncio.sleep(0.3)
        errors = await rejected()
        assert len(errors) == 1
        msg = errors[0].getMessage()
        assert "\n" not in msg and "rejected" in msg
        assert "keys[0].limits.rpm: must be a positive integer" in msg
        assert "window_s" in msg
        assert app.state.node.snapshot is before
        assert (
            await c.post("/v1/chat/completions", json=chat(), headers=auth())
        ).status_code == 200
        # Fixed again: applied.
        data["keys"][0]["limits"]["rpm"] = 3
        write(path, data)
        await reloads(app, 1)
        r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
        assert r.headers["x-ratelimit-limit-requests"] == "3"


async def test_backend_change_needs_a_restart(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    path = tmp_path / "proxy.yaml"
    data = config_dict()
    write(path, data)
    async with running(path) as (app, c):
        node = app.state.node
        backend = node.backend
        data["backend"] = {"type": "redis", "url": "redis://127.0.0.1:1/0"}
        data["keys"][0]["limits"]["rpm"] = 2
        write(path, data)
        await reloads(app, 1)
        assert node.backend is backend
        assert node.snapshot.config.backend.type == "memory"
        assert any("needs a restart" in r.getMessage() for r in caplog.records)
        # The rest of the file was applied.
        r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
        assert r.headers["x-ratelimit-limit-requests"] == "2"


async def test_sighup_reloads_even_without_a_change(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy")
    path = tmp_path / "proxy.yaml"
    write(path, config_dict())
    async with running(path) as (app, _):
        reloader = app.state.reloader
        if not reloader._sighup:
            pytest.skip("no SIGHUP handler on this platform")
        reloader.poll_s = 3600  # only the signal can wake it now
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGHUP)

        async def seen() -> bool:
            return any("(SIGHUP)" in r.getMessage() for r in caplog.records)

        await async_wait_until(seen, "the SIGHUP reload")


async def test_replaced_upstream_is_closed_only_when_unused(tmp_path) -> None:
    path = tmp_path / "proxy.yaml"
    data = config_dict(
        upstreams={
            "mock": {"type": "mock"},
            "far": {"type": "http", "base_url": "http://127.0.0.1:9/v1", "timeout_s": 5},
        }
    )
    write(path, data)
    async with running(path) as (app, _):
        node = app.state.node
        old_far, old_mock = node.snapshot.upstreams["far"], node.snapshot.upstreams["mock"]
        # A request that started before the swap and is still running (e.g. a long stream).
        busy = Exchange("busy", "POST", "/v1/chat/completions")
        app.state.inflight.requests.add(busy)
        data["upstreams"]["far"]["timeout_s"] = 6
        write(path, data)
        await reloads(app, 1)
        assert node.snapshot.upstreams["mock"] is old_mock  # unchanged: same client
        assert node.snapshot.upstreams["far"] is not old_far
        await asyncio.sleep(0.3)
        assert not old_far.client.is_closed  # still possibly in use
        app.state.inflight.requests.discard(busy)

        async def closed() -> bool:
            return old_far.client.is_closed

        await async_wait_until(closed, "the replaced client to close")
        assert not node.snapshot.upstreams["far"].client.is_closed


# -- real processes ----------------------------------------------------------------------------


def test_stream_in_flight_survives_a_reload(tmp_path) -> None:
    data = config_dict(upstreams={"mock": {"type": "mock", "tokens_per_second": 25}})
    path = write_config(data, tmp_path)
    proxy = start_proxy(path)
    try:
        body = chat(max_tokens=40, stream=True)
        url = proxy.url + "/v1/chat/completions"
        with httpx.stream("POST", url, json=body, headers=auth(), timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            # Change the upstream (its client is replaced) and the limits while streaming.
            data["upstreams"]["mock"]["tokens_per_second"] = 30
            data["keys"][0]["limits"]["rpm"] = 5
            write(path, data)
            wait_until(lambda: "config reloaded" in proxy.output(), "the reload")
            rest = list(lines)
        assert [x for x in rest if x][-1] == "data: [DONE]"
        assert sum(x.startswith("data: {") for x in rest) >= 39  # all 40 tokens came
        r = httpx.post(url, json=chat(), headers=auth())
        assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "5"
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.output()


def test_sighup_single_worker(tmp_path) -> None:
    data = config_dict()
    path = write_config(data, tmp_path)
    proxy = start_proxy(path)
    try:
        proxy.signal(signal.SIGHUP)
        wait_until(lambda: "config reload (SIGHUP)" in proxy.output(), "the SIGHUP reload")
        data["keys"].append({"name": "new", "key": NEW_KEY})
        write(path, data)
        proxy.signal(signal.SIGHUP)  # the file watch may be first; either applies the file
        wait_until(lambda: "config reloaded" in proxy.output(), "the reload")
        r = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth(NEW_KEY))
        assert r.status_code == 200
        assert proxy.popen.poll() is None
    finally:
        proxy.stop()


def _worker_pids(output: str) -> list[str]:
    return re.findall(r"Started server process \[(\d+)\]", output)


@pytest.mark.redis
def test_sighup_reloads_every_worker_in_place(tmp_path, redis_server) -> None:
    data = config_dict(
        backend={"type": "redis", "url": redis_server.url, "key_prefix": f"r{uuid.uuid4().hex}"}
    )
    path = write_config(data, tmp_path)
    proxy = start_proxy(path, workers=2)
    try:
        wait_until(lambda: len(_worker_pids(proxy.output())) == 2, "two workers")
        pids = set(_worker_pids(proxy.output()))
        proxy.signal(signal.SIGHUP)

        def hup_pids() -> set[str]:
            found = re.findall(r"config reload \(SIGHUP\).*\[pid (\d+)\]", proxy.output())
            return set(found)

        wait_until(lambda: hup_pids() == pids, "both workers to reload")
        # In place: no worker was replaced.
        time.sleep(0.5)
        assert set(_worker_pids(proxy.output())) == pids

        data["keys"].append({"name": "new", "key": NEW_KEY, "limits": {"rpm": 1000}})
        write(path, data)

        def applied() -> set[str]:
            return set(re.findall(r"config reloaded \(.*?\) \[pid (\d+)\]", proxy.output()))

        wait_until(lambda: applied() == pids, "both workers to apply the file")
        for _ in range(20):  # new connections: both workers answer some
            r = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth(NEW_KEY))
            assert r.status_code == 200
        r = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth(KEY_A))
        assert r.status_code == 200
    finally:
        proxy.stop()
    assert proxy.popen.returncode == 0
