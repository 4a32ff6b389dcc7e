"""Security properties as tests: whose key goes where, what logs hold, who may use the admin
API, how keys are looked up, and that a passthrough reaches the configured upstream only."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
import respx

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, auth, make_config
from tests.procs import Proc, start_proxy, write_config
from tests.rawnet import RawUpstream, ResetListener, raw_request

pytestmark = pytest.mark.timeout(120)

CLIENT_KEY = "sk-sec-client-key-0123456789abcdef"
OTHER_KEY = "sk-sec-other-key-0123456789abcdef"
SEC_UPSTREAM_KEY = "sk-sec-UPSTREAM-secret-9876543210"
ADMIN_TOKEN = "adm-sec-token-0123456789abcdef"
WRONG_KEYS = ("sk-sec-client-key-0123456789abcdeX", "sk-sec-wrong-key-zzzzzzzzzzzzzzzz")
LIMITS = {"rpm": 10_000, "input_tpm": 1_000_000, "output_tpm": 100_000}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


@dataclass
class Stack:
    proxy: Proc
    raw: RawUpstream


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("security")
    with RawUpstream() as upstream, ResetListener() as resetter:
        up = {"base_url": upstream.url + "/v1", "api_key_env": "SEC_UP_KEY", "timeout_s": 3}
        cfg = {
            "backend": {"type": "memory"},
            "upstreams": {
                "raw": {"type": "http", **up},
                "rst": {"type": "http", **up, "base_url": resetter.url + "/v1"},
            },
            "default_upstream": "raw",
            "routes": {"broken-*": "rst"},
            "window_s": 600,
            "admin": {"token_env": "SEC_ADMIN"},
            "logging": {"level": "debug", "access_log": True},  # as much output as there is
            "keys": [
                {"name": "client", "key": CLIENT_KEY, "limits": LIMITS},
                {"name": "tiny", "key": OTHER_KEY, "limits": {"rpm": 1}},
            ],
        }
        env = {"SEC_UP_KEY": SEC_UPSTREAM_KEY, "SEC_ADMIN": ADMIN_TOKEN}
        proxy = start_proxy(write_config(cfg, tmp), env=env)
        try:
            yield Stack(proxy, upstream)
        finally:
            proxy.stop()


def send(stack: Stack, method: str, target: str, headers=(), body: bytes = b"") -> httpx.Response:
    return httpx.request(
        method,
        stack.proxy.url + target,
        headers=list(headers),
        content=body,
        timeout=10,
    )


# -- the client's key never reaches the upstream -----------------------------------------------
ENDPOINTS = [
    ("POST", "/v1/chat/completions", orjson.dumps(CHAT)),
    ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True})),
    ("POST", "/v1/completions", orjson.dumps({"model": "m", "prompt": "Hi", "max_tokens": 3})),
    ("POST", "/v1/embeddings", orjson.dumps({"model": "text-embedding-3-small", "input": "Hi"})),
    ("GET", "/v1/models", b""),
    ("GET", "/v1/models/gpt-4o-mini", b""),
    ("POST", "/v1/files", b'{"purpose": "batch"}'),
    ("GET", "/v1/files/file-abc/content", b""),
    ("DELETE", "/v1/files/file-abc", b""),
    ("POST", "/v1/responses", b'{"model": "m", "input": "Hi"}'),
]
# Where else a client might put its key, on top of the Authorization header.
EXTRA_CARRIERS = {
    "authorization only": ([], ""),
    "api-key header": ([("api-key", CLIENT_KEY)], ""),
    "x-api-key header": ([("x-api-key", CLIENT_KEY)], ""),
    "a custom header": ([("x-my-auth", f"Bearer {CLIENT_KEY}")], ""),
    "a cookie": ([("cookie", f"sid={CLIENT_KEY}")], ""),
    "proxy-authorization": ([("proxy-authorization", f"Bearer {CLIENT_KEY}")], ""),
    "query api_key": ([], f"?api_key={CLIENT_KEY}"),
    "query key, encoded": ([], "?key=" + CLIENT_KEY.replace("-", "%2D") + "&limit=5"),
    "query, other name": ([], f"?after=x&token={CLIENT_KEY}"),
}


@pytest.mark.parametrize(
    ("method", "path", "body"), ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS]
)
@pytest.mark.parametrize("carrier", list(EXTRA_CARRIERS))
def test_the_client_key_never_reaches_the_upstream(stack, method, path, body, carrier) -> None:
    extra, query = EXTRA_CARRIERS[carrier]
    before = len(stack.raw.seen)
    headers = [("authorization", f"Bearer {CLIENT_KEY}"), ("content-type", "application/json")]
    r = send(stack, method, path + query, [*headers, *extra], body)
    assert r.status_code < 500, r.text
    seen = stack.raw.seen[before:]
    assert len(seen) == 1
    up = seen[0]
    assert CLIENT_KEY.encode() not in up.raw
    assert CLIENT_KEY.replace("-", "%2D").encode() not in up.raw
    assert up.header("authorization") == f"Bearer {SEC_UPSTREAM_KEY}"
    assert up.target.startswith(path)
    if carrier == "query key, encoded":
        assert up.target.endswith("?limit=5")  # other parameters are kept
    if carrier == "query, other name":
        assert up.target.endswith("?after=x")


@respx.mock
async def test_an_upstream_without_a_key_gets_no_authorization(make_client) -> None:
    route = respx.get("http://nokey.test/v1/models").mock(return_value=httpx.Response(200))
    cfg = make_config(
        upstreams={"up": {"type": "http", "base_url": "http://nokey.test/v1"}},
        default_upstream="up",
    )
    c = make_client(cfg)
    r = await c.get("/v1/models", headers={**auth(), "x-api-key": KEY_A})
    assert r.status_code == 200
    sent = route.calls.last.request
    assert "authorization" not in sent.headers and KEY_A not in str(sent.headers.raw)


# -- the upstream's key never reaches the client -----------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/chat/completions", orjson.dumps(CHAT)),
        ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True})),
        ("GET", "/v1/models", b""),
        ("POST", "/v1/files", b"{}"),
    ],
    ids=["chat", "chat stream", "passthrough GET", "passthrough POST"],
)
def test_an_upstream_echoing_its_key_does_not_hand_it_to_the_client(stack, method, path, body):
    headers = [("authorization", f"Bearer {CLIENT_KEY}"), ("x-raw-fault", "echo")]
    r = send(stack, method, path, headers, body)
    assert r.status_code == 401  # the upstream's own error, passed through
    assert "x-raw-fault: echo" in r.json()["error"]["message"]  # ... with its echo
    assert SEC_UPSTREAM_KEY not in r.text
    assert all(SEC_UPSTREAM_KEY not in v for _, v in r.headers.multi_items())
    assert r.headers["x-echo-authorization"] == "Bearer [redacted]"


@respx.mock
@pytest.mark.parametrize("status", [200, 400, 401, 500])
async def test_upstream_key_redacted_in_process(make_client, status) -> None:
    """respx stands in for an upstream that echoes its request headers, in its body (an error)
    and in a response header (any status)."""

    def echo(request: httpx.Request) -> httpx.Response:
        seen = " ".join(f"{k}={v}" for k, v in request.headers.multi_items())
        body = {"error": {"message": f"echo: {seen}", "type": "x", "param": None, "code": None}}
        if status == 200:
            body = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        return httpx.Response(
            status, json=body, headers={"x-seen-auth": request.headers["authorization"]}
        )

    respx.post("http://upstream.test/v1/chat/completions").mock(side_effect=echo)
    respx.get("http://upstream.test/v1/models").mock(side_effect=echo)
    cfg = make_config(
        upstreams={
            "up": {"type": "http", "base_url": "http://upstream.test/v1", "api_key_env": "UP_KEY"}
        },
        default_upstream="up",
    )
    c = make_client(cfg)
    for r in (
        await c.post("/v1/chat/completions", json=CHAT, headers=auth()),
        await c.get("/v1/models", headers=auth()),
    ):
        assert r.status_code == status
        assert UPSTREAM_KEY not in r.text
        assert UPSTREAM_KEY not in str(r.headers.raw)
        assert r.headers["x-seen-auth"] == "Bearer [redacted]"


# -- no key in the logs ------------------------------------------------------------------------
def test_no_key_or_token_ever_appears_in_the_logs(stack) -> None:
    ok = [("authorization", f"Bearer {CLIENT_KEY}")]
    traffic = [
        ("POST", "/v1/chat/completions", ok, orjson.dumps(CHAT)),
        ("POST", "/v1/chat/completions", ok, orjson.dumps({**CHAT, "stream": True})),
        ("POST", "/v1/chat/completions", [*ok, ("x-raw-fault", "malformed")], orjson.dumps(CHAT)),
        ("POST", "/v1/chat/completions", [*ok, ("x-raw-fault", "echo")], orjson.dumps(CHAT)),
        ("POST", "/v1/chat/completions", ok, orjson.dumps({**CHAT, "model": "broken-x"})),
        ("POST", "/v1/chat/completions", ok, b"{not json"),
        ("GET", f"/v1/models?api_key={CLIENT_KEY}", ok, b""),
        ("GET", "/v1/../admin", ok, b""),
        ("GET", "/admin/keys", [("authorization", f"Bearer {CLIENT_KEY}")], b""),
        ("GET", "/admin/keys", [("authorization", f"Bearer {ADMIN_TOKEN}x")], b""),
        ("GET", "/admin/keys", [("authorization", f"Bearer {ADMIN_TOKEN}")], b""),
        ("POST", "/admin/keys/tiny/reset", [("authorization", f"Bearer {ADMIN_TOKEN}")], b""),
    ]
    for key in (*WRONG_KEYS, ADMIN_TOKEN, SEC_UPSTREAM_KEY):
        traffic.append(("POST", "/v1/chat/completions", [("authorization", f"Bearer {key}")], b""))
        traffic.append(("GET", "/v1/models", [("authorization", key)], b""))
    for _ in range(3):  # the second and third are 429s
        traffic.append(("GET", "/v1/models", [("authorization", f"Bearer {OTHER_KEY}")], b""))
    statuses = set()
    for method, target, headers, body in traffic:
        statuses.add(send(stack, method, target, headers, body).status_code)
    # A request the HTTP parser refuses, carrying a key.
    raw_request(
        stack.proxy.port,
        b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer "
        + CLIENT_KEY.encode()
        + b"\r\nX-A: a\x00b\r\n\r\n",
    )
    assert {200, 400, 401, 429, 502}.issubset(statuses)  # the traffic had failures of each kind
    out = stack.proxy.output()
    assert '"status":401' in out and '"status":429' in out  # the access log did record them
    for secret in (CLIENT_KEY, OTHER_KEY, *WRONG_KEYS, SEC_UPSTREAM_KEY, ADMIN_TOKEN):
        assert secret not in out
        assert secret[:-4] not in out  # nor most of it
        assert hashlib.sha256(secret.encode()).hexdigest() not in out


# -- the admin API ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/keys"),
        ("GET", "/admin/keys/client"),
        ("POST", "/admin/keys/client/reset"),
        ("GET", "/admin/recent-429s"),
    ],
)
def test_admin_refuses_without_the_token(stack, method, path) -> None:
    attempts = {
        "no header": [],
        "wrong token": [("authorization", f"Bearer {ADMIN_TOKEN}x")],
        "token prefix": [("authorization", f"Bearer {ADMIN_TOKEN[:-1]}")],
        "a client key": [("authorization", f"Bearer {CLIENT_KEY}")],
        "no scheme": [("authorization", ADMIN_TOKEN)],
        "token as x-api-key": [("x-api-key", ADMIN_TOKEN)],
    }
    for what, headers in attempts.items():
        r = send(stack, method, path, headers)
        assert r.status_code == 401, what
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = send(stack, method, path + f"?token={ADMIN_TOKEN}")
    assert r.status_code == 401
    r = send(stack, method, path, [("authorization", f"Bearer {ADMIN_TOKEN}")])
    assert r.status_code == 200


def test_the_admin_token_is_not_a_client_key(stack) -> None:
    r = send(stack, "GET", "/v1/models", [("authorization", f"Bearer {ADMIN_TOKEN}")])
    assert r.status_code == 401


async def test_admin_is_absent_without_its_section(client) -> None:
    r = await client.get("/admin/keys", headers=auth())
    assert r.status_code == 404


# -- key lookup ------------------------------------------------------------------------------------
def _comparable(r: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = sorted((k, v) for k, v in r.headers.multi_items() if k not in ("x-request-id",))
    return r.status_code, r.content, headers


async def test_a_near_miss_key_is_refused_exactly_like_a_random_one(client) -> None:
    near = KEY_A[:-1] + ("x" if KEY_A[-1] != "x" else "y")  # shares all but the last char
    longer, shorter = KEY_A + "0", KEY_A[:-1]
    answers = [
        _comparable(await client.get("/v1/models", headers=auth(k)))
        for k in (near, longer, shorter, "sk-" + "q" * 21, "z")
    ]
    assert answers[0][0] == 401
    assert all(a == answers[0] for a in answers)


class _Recording(dict):
    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.looked_up: list[str] = []

    def get(self, key, default=None):
        self.looked_up.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.looked_up.append(key)
        return super().__getitem__(key)


async def test_authentication_looks_keys_up_by_digest_only(client) -> None:
    node = client.app.state.node
    recording = _Recording(node.snapshot.policies)
    node.snapshot = dataclasses.replace(node.snapshot, policies=recording)
    presented = [KEY_A, KEY_B, KEY_A[:-1] + "x", "sk-nope"]
    for key in presented:
        await client.get("/v1/models", headers=auth(key))
    digests = [hashlib.sha256(k.encode()).hexdigest() for k in presented]
    assert recording.looked_up == digests  # one lookup each, by digest, never the key
    # And the table holds digests only, no key in the clear.
    assert all(re.fullmatch(r"[0-9a-f]{64}", d) for d in recording)
    assert not {KEY_A, KEY_B} & set(recording)


# -- the passthrough reaches the configured upstream and nothing else ------------------------------
TRICKY_PATHS = [
    "/v1/http://evil.example/x",
    "/v1/https:/evil.example",
    "/v1//evil.example/x",
    "/v1/%2f%2fevil.example/x",
    "/v1/@evil.example/x",
    "/v1/x@evil.example",
    "/v1/models%23@evil.example",
    "/v1/models%3F@evil.example",
    "/v1/..%2f..%2fevil.example",
    "/v1/%5c%5cevil.example",
    "/v1/evil.example:80/x",
    "/v1/models?next=http://evil.example/",
    "/v1/models?@evil.example",
    "/v1/%00evil.example",
    "/v1/;@evil.example",
]


async def test_passthrough_never_reaches_another_host(make_client) -> None:
    cfg = make_config(
        upstreams={
            "up": {"type": "http", "base_url": "http://upstream.test/v1", "api_key_env": "UP_KEY"}
        },
        default_upstream="up",
    )
    c = make_client(cfg)
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        ours = router.route(host="upstream.test").mock(return_value=httpx.Response(200, json={}))
        elsewhere = router.route().mock(return_value=httpx.Response(599))
        for path in TRICKY_PATHS:
            for method in ("GET", "POST", "DELETE"):
                r = await c.request(method, path, headers=auth(KEY_B), content=b"{}")
                assert r.status_code in (200, 400, 404), (method, path, r.text)
    assert ours.called and not elsewhere.called
    for call in ours.calls:
        url = call.request.url
        assert (url.scheme, url.host, url.port) == ("http", "upstream.test", None)
        assert url.raw_path.startswith(b"/v1/")
