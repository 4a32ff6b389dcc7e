"""The access log (one JSON line per request, no secrets, no prompts), request ids, and mixed
traffic against real processes whose complete output and /metrics hold no key material."""

from __future__ import annotations

import json
import logging

import httpx
import orjson
import pytest

from proxy.accesslog import ACCESS, apply_levels
from proxy.app import create_app
from proxy.backends.memory import MemoryBackend
from proxy.config import LoggingConfig
from proxy.exchange import MAX_REQUEST_ID
from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, auth, make_config
from tests.ops_support import chat, wait_until
from tests.procs import start_mock, start_proxy, write_config

PROMPT_MARK = "zebra-papaya-prompt-marker"


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="proxy.access")

    def lines() -> list[dict]:
        return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "proxy.access"]

    return lines


def prompt_body(**extra) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Tell me about {PROMPT_MARK}"}],
        "max_tokens": 6,
        **extra,
    }


async def test_one_line_per_request(make_client, access, caplog) -> None:
    c = make_client()
    headers = {**auth(), "x-request-id": "req-abc.123"}
    r = await c.post("/v1/chat/completions", json=prompt_body(), headers=headers)
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-abc.123"
    (line,) = access()
    assert line["request_id"] == "req-abc.123"
    assert line["key"] == "team-a" and line["model"] == "gpt-4o-mini"
    assert line["endpoint"] == "chat" and line["path"] == "/v1/chat/completions"
    assert line["status"] == 200 and line["outcome"] == "admitted" and line["stream"] is False
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert line["input_tokens_reserved"] == line["input_tokens_charged"] == prompt_tokens
    assert line["output_tokens_reserved"] == line["output_tokens_charged"] == 6
    assert line["upstream"] == "mock" and line["upstream_ms"] >= 0
    assert line["total_ms"] >= line["upstream_ms"] and line["limiter_ms"] >= 0
    assert line["time"].endswith("+00:00")
    text = caplog.text
    assert PROMPT_MARK not in text and KEY_A not in text


async def test_probes_and_scrapes_are_not_logged(make_client, access) -> None:
    c = make_client()
    for url in ("/healthz", "/readyz", "/metrics"):
        r = await c.get(url)
        assert r.status_code == 200 and r.headers["x-request-id"]
    assert access() == []


async def test_request_ids(make_client, access) -> None:
    c = make_client()
    body = {"model": "m", "input": "x"}
    r1 = await c.post("/v1/embeddings", json=body, headers=auth())
    r2 = await c.post("/v1/embeddings", json=body, headers=auth())
    generated = {r1.headers["x-request-id"], r2.headers["x-request-id"]}
    assert len(generated) == 2 and all(len(g) == 16 for g in generated)
    long_id = "a" * 500
    r = await c.post("/v1/embeddings", json=body, headers={**auth(), "x-request-id": long_id})
    assert r.headers["x-request-id"] == "a" * MAX_REQUEST_ID
    weird = "caf\xe9\x7f".encode("latin-1")
    r = await c.post(
        "/v1/embeddings", json=body, headers=[*auth().items(), ("x-request-id", weird)]
    )
    assert (
        r.headers["x-request-id"] not in ("caf\xe9\x7f", "")
        and len(r.headers["x-request-id"]) == 16
    )
    ids = [line["request_id"] for line in access()]
    assert ids == [
        *sorted(generated, key=ids.index),
        "a" * MAX_REQUEST_ID,
        r.headers["x-request-id"],
    ]


class _Broken(MemoryBackend):
    async def reserve(self, scopes, cost, reservation_id):
        raise RuntimeError("a bug")


async def test_request_id_on_every_error(make_client, access) -> None:
    c = make_client(make_config(keys=[{"name": "t", "key": KEY_A, "limits": {"rpm": 1}}]))
    rid = {"x-request-id": "rid-1"}
    cases = [
        (await c.post("/v1/chat/completions", json=chat(), headers=rid), 401),
        (await c.post("/v1/chat/completions", content=b"{", headers={**auth(), **rid}), 400),
        (await c.get("/nowhere", headers=rid), 404),
        (await c.post("/v1/chat/completions", json=chat(), headers={**auth(), **rid}), 200),
        (await c.post("/v1/chat/completions", json=chat(), headers={**auth(), **rid}), 429),
    ]
    for r, status in cases:
        assert r.status_code == status and r.headers["x-request-id"] == "rid-1"
    # An unexpected failure is answered by the outermost handler: the id is there too.
    app = create_app(make_config(), _Broken())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://p") as c2:
        r = await c2.post("/v1/chat/completions", json=chat(), headers={**auth(), **rid})
    assert r.status_code == 500 and r.headers["x-request-id"] == "rid-1"
    outcomes = [(line["status"], line["outcome"]) for line in access()]
    assert outcomes == [
        (401, "auth_failure"),
        (400, "bad_request"),
        (200, "admitted"),
        (429, "limited_requests"),
        (500, "error"),
    ]
    assert access()[-1]["error"] == "RuntimeError"


async def test_stream_line_carries_the_settlement(make_client, access) -> None:
    c = make_client()
    r = await c.post("/v1/chat/completions", json=prompt_body(stream=True), headers=auth())
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert "data: [DONE]" in r.text
    (line,) = access()
    assert line["stream"] is True and line["stream_end"] == "completed"
    assert line["output_tokens_reserved"] == 6 and line["output_tokens_charged"] == 6
    assert line["request_id"] == r.headers["x-request-id"]


async def test_access_log_switch(make_client, access) -> None:
    c = make_client()
    apply_levels(LoggingConfig(level="warning", access_log=False))
    await c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=auth())
    assert access() == []
    # Its own switch: a quiet general level does not silence it.
    apply_levels(LoggingConfig(level="warning", access_log=True))
    await c.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=auth())
    assert len(access()) == 1
    assert ACCESS.isEnabledFor(logging.INFO)


# -- mixed traffic against real processes ---------------------------------------------------

ADMIN_TOKEN = "adm-mixed-token-0123456789"
BAD_KEYS = ["sk-not-a-real-key-0123456789", f"{KEY_A}x", KEY_A[:-1]]


def test_mixed_traffic_leaks_no_secret(tmp_path) -> None:
    mock = start_mock()
    cfg = {
        "upstreams": {
            "up": {"type": "http", "base_url": mock.url + "/v1", "api_key_env": "MIX_UP_KEY"}
        },
        "default_upstream": "up",
        "admin": {"token_env": "MIX_ADMIN"},
        "logging": {"level": "debug", "access_log": True},
        "keys": [
            {"name": "team-a", "key": KEY_A, "limits": {"rpm": 6, "output_tpm": 1000}},
            {"name": "team-b", "key": KEY_B, "limits": {"rpm": 100}},
        ],
    }
    env = {"MIX_UP_KEY": UPSTREAM_KEY, "MIX_ADMIN": ADMIN_TOKEN}
    proxy = start_proxy(write_config(cfg, tmp_path), env=env)
    url = proxy.url + "/v1/chat/completions"
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    seen: list[str] = []
    try:
        with httpx.Client(timeout=20) as c:
            for key in BAD_KEYS:
                assert c.post(url, json=prompt_body(), headers=auth(key)).status_code == 401
            assert c.post(url, json=prompt_body(), headers={"api-key": KEY_A}).status_code == 401
            statuses = [
                c.post(url, json=prompt_body(), headers=auth()).status_code for _ in range(7)
            ]
            assert statuses.count(200) == 6 and statuses[-1] == 429
            too_big = prompt_body(max_tokens=5000)
            assert c.post(url, json=too_big, headers=auth(KEY_B)).status_code == 200
            with c.stream("POST", url, json=prompt_body(stream=True), headers=auth(KEY_B)) as r:
                stream_id = r.headers["x-request-id"]
                assert "[DONE]" in r.read().decode()
            with c.stream("POST", url, json=prompt_body(stream=True), headers=auth(KEY_B)) as r:
                next(r.iter_lines())  # and leave early
            r = c.post(
                url, json=prompt_body(), headers={**auth(KEY_B), "x-mock-fault": "status=503"}
            )
            assert r.status_code == 503
            assert c.get(proxy.url + "/v1/models", headers=auth(KEY_B)).status_code == 200
            assert c.get(proxy.url + "/admin/keys").status_code == 401
            assert c.get(proxy.url + "/admin/keys", headers=auth(KEY_A)).status_code == 401
            for path in ("/admin/keys", "/admin/keys/team-a", "/admin/recent-429s"):
                r = c.get(proxy.url + path, headers=admin)
                assert r.status_code == 200
                seen.append(r.text)
            assert c.post(proxy.url + "/admin/keys/team-a/reset", headers=admin).status_code == 200
            assert c.get(proxy.url + "/admin/").status_code == 200
            assert c.get(proxy.url + "/readyz").status_code == 200
            wait_until(lambda: stream_id in proxy.output(), "the stream's access line")
            seen.append(c.get(proxy.url + "/metrics").text)
    finally:
        proxy.stop()
        mock.stop()
    out = proxy.output()
    everything = out + "\n".join(seen)
    for secret in [KEY_A, KEY_B, UPSTREAM_KEY, ADMIN_TOKEN, *BAD_KEYS, PROMPT_MARK]:
        assert secret not in everything, f"{secret[:6]}... leaked"
    # Not even a recognisable half of one.
    for secret in [KEY_A, KEY_B, UPSTREAM_KEY, ADMIN_TOKEN]:
        assert secret[len(secret) // 2 :] not in everything
    lines = [json.loads(x) for x in out.splitlines() if x.startswith('{"time"')]
    by_outcome = {line["outcome"] for line in lines}
    assert {"auth_failure", "admitted", "limited_requests", "upstream_error"} <= by_outcome
    assert any(line["endpoint"] == "admin" and line["key"] == "team-a" for line in lines)
    (stream_line,) = [line for line in lines if line["request_id"] == stream_id]
    assert stream_line["stream"] is True and stream_line["stream_end"] == "completed"
    assert len([line for line in lines if line["endpoint"] != "admin"]) == 4 + 7 + 1 + 2 + 1 + 1
