"""End to end: a real proxy process in front of a real mock-upstream process, official client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.procs import start_mock, start_proxy, write_config

CLIENT_KEY = "sk-e2e-client-key-0123456789"
SLOW_KEY = "sk-e2e-slow-key-0123456789"
UPSTREAM_KEY = "sk-e2e-upstream-key-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    log_path = tmp / "mock.jsonl"
    mock = start_mock(log_path=str(log_path))
    cfg = {
        "backend": {"type": "memory"},
        "upstreams": {
            "mock": {"type": "http", "base_url": mock.url + "/v1", "api_key_env": "E2E_UP_KEY"}
        },
        "default_upstream": "mock",
        "window_s": 3,
        "keys": [
            {
                "name": "main",
                "key": CLIENT_KEY,
                "limits": {"rpm": 1000, "input_tpm": 100_000, "output_tpm": 50_000},
            },
            {"name": "slow", "key": SLOW_KEY, "limits": {"rpm": 2}},
        ],
    }
    proxy = start_proxy(write_config(cfg, tmp), env={"E2E_UP_KEY": UPSTREAM_KEY})
    yield proxy, mock, log_path
    proxy.stop()
    mock.stop()


def client(proxy, key: str = CLIENT_KEY, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=retries, timeout=20)


def test_chat_completion_and_usage_headers(stack) -> None:
    proxy, _, log_path = stack
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello"}], max_tokens=12
    )
    resp = raw.parse()
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 12
    h = raw.headers
    assert int(h["x-ratelimit-limit-requests"]) == 1000
    assert int(h["x-ratelimit-remaining-requests"]) <= 999
    assert h["x-ratelimit-reset-requests"].endswith("s")
    # The upstream got its own key, never the client's.
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert entries and all(e["authorization"] == f"Bearer {UPSTREAM_KEY}" for e in entries)
    assert CLIENT_KEY not in log_path.read_text()


def test_completions_and_embeddings(stack) -> None:
    proxy, _, _ = stack
    c = client(proxy)
    r = c.completions.create(model="gpt-3.5-turbo-instruct", prompt="Once upon", max_tokens=5)
    assert r.usage.completion_tokens == 5
    e = c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(e.data) == 2 and e.usage.prompt_tokens >= 2
    models = c.models.list()
    assert models.data


def test_429_is_read_by_client_retry_logic(stack) -> None:
    proxy, _, _ = stack
    c = client(proxy, SLOW_KEY, retries=0)
    for _ in range(2):
        c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError) as exc:
        c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    err = exc.value
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    wait_ms = int(err.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 3000
    assert int(err.response.headers["retry-after"]) == -(-wait_ms // 1000)
    # With retries on, the client waits what retry-after-ms says and then gets through.
    r = client(proxy, SLOW_KEY, retries=3).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=1
    )
    assert r.choices


def test_401_and_bad_input(stack) -> None:
    proxy, _, _ = stack
    with pytest.raises(openai.AuthenticationError) as exc:
        client(proxy, "sk-not-a-real-key-00000").chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    assert exc.value.code == "invalid_api_key"
    c = client(proxy)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="m", messages="not a list")  # type: ignore[arg-type]
    assert exc.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}], max_tokens=-3
        )
    assert exc.value.param == "max_tokens"
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        content=b"{broken",
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(
        proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert r.status_code == 405
    assert "Traceback" not in proxy.output()


def test_stream_through_real_processes(stack) -> None:
    proxy, _, _ = stack
    chunks = list(
        client(proxy).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=6,
            stream=True,
        )
    )
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    with_usage = list(
        client(proxy).chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Count"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].usage.completion_tokens == 6 and with_usage[-1].choices == []
