"""The admin API: token check, keys with limits and live usage, reset, recent 429s, the page;
and usage shared by two nodes on one Redis."""

from __future__ import annotations

import uuid

import httpx
import pytest

from proxy.app import create_app
from proxy.backends.redis import RedisBackend, RedisSettings
from tests.conftest import KEY_A, KEY_B, auth, make_config
from tests.ops_support import chat

ADMIN_TOKEN = "adm-test-token-0123456789"


def admin_config(**over):
    keys = [
        {
            "name": "team-a",
            "key": KEY_A,
            "limits": {"rpm": 3, "input_tpm": 10_000, "output_tpm": 2_000},
            "models": {"gpt-4o": {"rpm": 2}},
        },
        {"name": "team-b", "key": KEY_B},  # unlimited: no scopes at all
    ]
    return make_config(
        env={"ADMIN_TOKEN": ADMIN_TOKEN},
        **{"admin": {"token_env": "ADMIN_TOKEN"}, "keys": keys, **over},
    )


ADMIN = {"authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_no_admin_section_no_admin_routes(make_client) -> None:
    c = make_client(make_config())
    for method, url in [
        ("GET", "/admin/"),
        ("GET", "/admin/keys"),
        ("GET", "/admin/keys/team-a"),
        ("POST", "/admin/keys/team-a/reset"),
        ("GET", "/admin/recent-429s"),
    ]:
        r = await c.request(method, url, headers=ADMIN)
        assert r.status_code == 404, url
        assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer wrong-token",
        f"Basic {ADMIN_TOKEN}",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {KEY_A}",  # a client key is not an admin token
        "Bearer ",
    ],
)
async def test_admin_needs_the_token(make_client, header) -> None:
    c = make_client(admin_config())
    headers = {"authorization": header} if header else {}
    for method, url in [
        ("GET", "/admin/keys"),
        ("GET", "/admin/keys/team-a"),
        ("POST", "/admin/keys/team-a/reset"),
        ("GET", "/admin/recent-429s"),
    ]:
        r = await c.request(method, url, headers=headers)
        assert r.status_code == 401, (url, header)
        assert ADMIN_TOKEN not in r.text


async def test_keys_limits_and_usage(make_client) -> None:
    c = make_client(admin_config())
    r = await c.get("/admin/keys", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body["window_s"] == 60
    a, b = body["keys"]
    assert a["name"] == "team-a" and b["name"] == "team-b"
    assert a["limits"] == {"requests": 3, "input_tokens": 10_000, "output_tokens": 2_000}
    assert a["usage"] == {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    assert b["limits"] == {"requests": None, "input_tokens": None, "output_tokens": None}
    assert b["usage"] is None and b["models"] == []
    r = await c.post("/v1/chat/completions", json=chat("gpt-4o", max_tokens=7), headers=auth())
    used_in = r.json()["usage"]["prompt_tokens"]
    await c.post("/v1/chat/completions", json=chat("other", max_tokens=4), headers=auth())
    r = await c.get("/admin/keys/team-a", headers=ADMIN)
    assert r.status_code == 200
    a = r.json()
    assert a["usage"] == {"requests": 2, "input_tokens": 2 * used_in, "output_tokens": 11}
    assert 0 < a["reset_ms"] <= 60_000
    (m,) = a["models"]
    assert m["model"] == "gpt-4o"
    assert m["limits"] == {"requests": 2, "input_tokens": None, "output_tokens": None}
    assert m["usage"] == {"requests": 1, "input_tokens": used_in, "output_tokens": 7}
    r = await c.get("/admin/keys/nobody", headers=ADMIN)
    assert r.status_code == 404


async def test_reset_clears_usage(make_client) -> None:
    c = make_client(admin_config())
    for _ in range(3):
        assert (await c.post("/v1/chat/completions", json=chat(), headers=auth())).is_success
    assert (await c.post("/v1/chat/completions", json=chat(), headers=auth())).status_code == 429
    r = await c.post("/admin/keys/team-a/reset", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"reset": "team-a"}
    a = (await c.get("/admin/keys/team-a", headers=ADMIN)).json()
    assert a["usage"] == {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    assert (await c.post("/v1/chat/completions", json=chat(), headers=auth())).is_success
    assert (await c.post("/admin/keys/nobody/reset", headers=ADMIN)).status_code == 404


async def test_recent_429s(make_client) -> None:
    c = make_client(admin_config())
    assert (await c.get("/admin/recent-429s", headers=ADMIN)).json() == {"refusals": []}
    for _ in range(2):
        assert (
            await c.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth())
        ).is_success
    r = await c.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth())
    assert r.status_code == 429
    r = await c.post("/v1/chat/completions", json=chat("x", max_tokens=5000), headers=auth())
    assert r.status_code == 429  # can never fit: no retry time
    items = (await c.get("/admin/recent-429s", headers=ADMIN)).json()["refusals"]
    assert len(items) == 2
    newest, older = items
    assert newest["key"] == "team-a" and newest["model"] == "x"
    assert newest["dimension"] == "output_tokens" and newest["retry_after_ms"] is None
    assert older["model"] == "gpt-4o" and older["dimension"] == "requests"
    assert 0 < older["retry_after_ms"] <= 60_000
    assert older["time"].endswith("+00:00")


async def test_ring_buffer_is_bounded(make_client) -> None:
    c = make_client(admin_config())
    c.app.state.refusals.items = type(c.app.state.refusals.items)(maxlen=5)
    for _ in range(12):
        await c.post("/v1/chat/completions", json=chat("x", max_tokens=5000), headers=auth())
    items = (await c.get("/admin/recent-429s", headers=ADMIN)).json()["refusals"]
    assert len(items) == 5


async def test_page_is_static_and_public(make_client) -> None:
    c = make_client(admin_config())
    r = await c.get("/admin/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "'sha256-" in csp
    assert "sessionStorage" in r.text and "/admin/keys" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
    assert ADMIN_TOKEN not in r.text
    r = await c.get("/admin", follow_redirects=True)
    assert r.status_code == 200 and r.url.path == "/admin/"


@pytest.mark.redis
async def test_usage_is_shared_by_nodes_on_one_redis(redis_server) -> None:
    prefix = f"a{uuid.uuid4().hex}"
    cfg = admin_config(backend={"type": "redis", "url": redis_server.url, "key_prefix": prefix})

    def node():
        backend = RedisBackend.from_settings(RedisSettings(url=redis_server.url, key_prefix=prefix))
        app = create_app(cfg, backend)
        return app, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://n")

    (app1, c1), (app2, c2) = node(), node()
    try:
        for _ in range(2):
            r = await c1.post("/v1/chat/completions", json=chat(max_tokens=3), headers=auth())
            assert r.status_code == 200
        a = (await c2.get("/admin/keys/team-a", headers=ADMIN)).json()
        assert a["usage"]["requests"] == 2 and a["usage"]["output_tokens"] == 6
        assert (await c2.post("/admin/keys/team-a/reset", headers=ADMIN)).status_code == 200
        a = (await c1.get("/admin/keys/team-a", headers=ADMIN)).json()
        assert a["usage"]["requests"] == 0
    finally:
        for app, c in ((app1, c1), (app2, c2)):
            await c.aclose()
            await app.state.node.backend.aclose()
