"""The request path in-process, with respx standing in for upstream behaviours."""

from __future__ import annotations

import httpx
import orjson
import pytest
import respx

from tests.conftest import KEY_A, KEY_B, UPSTREAM_KEY, auth, make_config

UP = "http://upstream.test/v1"


def http_config(**over):
    return make_config(
        upstreams={
            "up": {
                "type": "http",
                "base_url": UP,
                "api_key_env": "UP_KEY",
                "timeout_s": 0.5,
                "connect_timeout_s": 0.5,
            },
        },
        default_upstream="up",
        **over,
    )


def chat(max_tokens: int = 50, **extra) -> dict:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": max_tokens,
        **extra,
    }


def completion_body(prompt_tokens: int = 9, completion_tokens: int = 5) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


async def usage(client: httpx.AsyncClient, key_name: str = "team-a"):
    node = client.app.state.node  # type: ignore[attr-defined]
    policy = next(p for p in node.snapshot.policies.values() if p.name == key_name)
    (state,) = await node.backend.peek(policy.scopes_for(None))
    return state.used


@respx.mock
async def test_forwards_with_upstream_key_and_reconciles(make_client) -> None:
    route = respx.post(f"{UP}/chat/completions").mock(
        return_value=httpx.Response(
            200,
            json=completion_body(9, 5),
            headers={"x-ratelimit-limit-requests": "99999", "openai-processing-ms": "12"},
        )
    )
    c = make_client(http_config())
    r = await c.post("/v1/chat/completions", json=chat(), headers={**auth(), "x-custom": "yes"})
    assert r.status_code == 200, r.text
    sent = route.calls.last.request
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEY_A not in str(sent.headers) and KEY_A.encode() not in sent.content
    assert sent.headers["x-custom"] == "yes"
    # Our headers replace the upstream's own rate-limit headers; others pass through.
    assert r.headers["x-ratelimit-limit-requests"] == "10"
    assert r.headers["openai-processing-ms"] == "12"
    assert r.headers["x-ratelimit-remaining-output-tokens"] == str(2000 - 5)
    assert await usage(c) == (1, 9, 5)


@respx.mock
@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_status_passthrough_refunds_tokens(make_client, status: int) -> None:
    body = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    respx.post(f"{UP}/chat/completions").mock(return_value=httpx.Response(status, json=body))
    c = make_client(http_config())
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
    assert r.status_code == status
    assert r.json() == body
    assert await usage(c) == (1, 0, 0)  # the request counts, its tokens are refunded


@respx.mock
@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (httpx.ConnectError("refused"), 502, "upstream_unreachable"),
        (httpx.ReadTimeout("slow"), 504, "upstream_timeout"),
        (httpx.ConnectTimeout("slow"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("reset"), 502, "upstream_unreachable"),
    ],
)
async def test_transport_failures_map_to_openai_errors(make_client, exc, status, code) -> None:
    respx.post(f"{UP}/chat/completions").mock(side_effect=exc)
    c = make_client(http_config())
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and set(err) == {"message", "type", "param", "code"}
    assert UPSTREAM_KEY not in r.text
    assert await usage(c) == (1, 0, 0)


@respx.mock
async def test_malformed_upstream_json_is_502_and_refunded(make_client) -> None:
    respx.post(f"{UP}/chat/completions").mock(return_value=httpx.Response(200, content=b"{oops"))
    c = make_client(http_config())
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
    assert r.status_code == 502
    assert await usage(c) == (1, 0, 0)


@respx.mock
async def test_passthrough_paths_count_as_requests(make_client) -> None:
    respx.get(f"{UP}/models").mock(return_value=httpx.Response(200, json={"data": []}))
    c = make_client(http_config())
    r = await c.get("/v1/models", headers=auth())
    assert r.status_code == 200 and r.json() == {"data": []}
    assert r.headers["x-ratelimit-remaining-requests"] == "9"
    assert await usage(c) == (1, 0, 0)


async def test_auth_failures(client) -> None:
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await client.post("/v1/chat/completions", json=chat(), headers=auth("sk-wrong-key-000"))
    assert r.status_code == 401
    r = await client.post("/v1/chat/completions", json=chat(), headers={"authorization": KEY_A})
    assert r.status_code == 401
    r = await client.get("/v1/models", headers=auth("nope-nope-nope"))
    assert r.status_code == 401
    assert KEY_A not in r.text


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "m", "messages": "hi"}', 400, "messages"),
        (b'{"model": "m", "messages": []}', 400, "messages"),
        (b'{"model": "m", "messages": [1]}', 400, "messages[0]"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', 400, "messages[0].role"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 5}]}',
            400,
            "messages[0].content",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}',
            400,
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}',
            400,
            "max_tokens",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
            400,
            "stream",
        ),
    ],
)
async def test_bad_input_is_400_with_param(client, body: bytes, status: int, param) -> None:
    r = await client.post(
        "/v1/chat/completions", content=body, headers={**auth(), "content-type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert await usage(client) == (0, 0, 0)


async def test_body_too_large_is_413(make_client) -> None:
    c = make_client(make_config(max_body_bytes=1000))
    r = await c.post("/v1/chat/completions", json=chat(extra="x" * 2000), headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_wrong_method_and_unknown_path(client) -> None:
    r = await client.get("/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = await client.get("/nope")
    assert r.status_code == 404 and "error" in r.json()


async def test_embedded_mock_answers_and_limits(client) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=20), headers=auth())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert await usage(client) == (
        1,
        body["usage"]["prompt_tokens"],
        body["usage"]["completion_tokens"],
    )
    for _ in range(9):
        assert (
            await client.post("/v1/chat/completions", json=chat(20), headers=auth())
        ).status_code == 200
    r = await client.post("/v1/chat/completions", json=chat(20), headers=auth())
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "requests" and err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1 and int(r.headers["retry-after-ms"]) > 0
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    # Other keys are not affected.
    r = await client.post("/v1/chat/completions", json=chat(20), headers=auth(KEY_B))
    assert r.status_code == 200


async def test_output_reservation_times_n_and_default(make_client) -> None:
    c = make_client(make_config(output_reservation_default=300))
    r = await c.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 7},
        headers=auth(),
    )
    # 7 x 300 = 2100 > output_tpm 2000: can never fit
    assert r.status_code == 429 and r.headers.get("x-should-retry") == "false"
    assert r.json()["error"]["type"] == "output_tokens"
    assert await usage(c) == (0, 0, 0)


async def test_stream_passthrough_embedded(client) -> None:
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat(max_tokens=5, stream=True), headers=auth()
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in r.headers
        assert "x-ratelimit-remaining-requests" in r.headers
        raw = b"".join([c async for c in r.aiter_raw()])
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    datas = [orjson.loads(e[6:]) for e in events[:-1]]
    # The client did not ask for usage: it sees no usage chunk and no usage field.
    assert all("usage" not in d for d in datas)
    used = await usage(client)
    assert used[0] == 1 and used[2] == 5


async def test_path_traversal_refused(client) -> None:
    r = await client.get("/v1/..%2f..%2fadmin", headers=auth())
    assert r.status_code in (400, 404)
    assert await usage(client) == (0, 0, 0)


@respx.mock
async def test_upstream_request_id_is_renamed_not_duplicated(make_client) -> None:
    respx.post(f"{UP}/chat/completions").mock(
        return_value=httpx.Response(200, json=completion_body(), headers={"x-request-id": "up-1"})
    )
    c = make_client(http_config())
    r = await c.post(
        "/v1/chat/completions", json=chat(), headers={**auth(), "x-request-id": "mine-7"}
    )
    assert r.headers.get_list("x-request-id") == ["mine-7"]
    assert r.headers["x-upstream-request-id"] == "up-1"


@respx.mock
async def test_non_streaming_answer_over_the_bound_is_502_and_refunded(make_client) -> None:
    big = b'{"pad": "' + b"x" * 5000 + b'"}'
    respx.post(f"{UP}/chat/completions").mock(return_value=httpx.Response(200, content=big))
    cfg = http_config()
    up = cfg.upstreams["up"].model_copy(update={"max_response_bytes": 4096})
    c = make_client(cfg.model_copy(update={"upstreams": {"up": up}}))
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
    assert r.status_code == 502 and "larger than 4096 bytes" in r.json()["error"]["message"]
    assert await usage(c) == (1, 0, 0)


@respx.mock
@pytest.mark.parametrize(("status", "kept"), [(429, True), (503, True), (200, False)])
async def test_upstream_retry_hint_kept_only_on_its_own_refusal(make_client, status, kept) -> None:
    body = completion_body() if status == 200 else {"error": {"message": "slow down"}}
    respx.post(f"{UP}/chat/completions").mock(
        return_value=httpx.Response(status, json=body, headers={"retry-after": "7"})
    )
    c = make_client(http_config())
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth())
    assert r.status_code == status
    assert (r.headers.get("retry-after") == "7") is kept
