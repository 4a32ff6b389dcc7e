"""GET /metrics: request outcomes, tokens, latencies, backend errors and state, streams in flight,
and one merged view over several uvicorn workers."""

from __future__ import annotations

import uuid

import httpx
import pytest

from proxy import metrics
from proxy.backends.base import Backend, BackendUnavailable
from proxy.backends.memory import MemoryBackend
from tests.conftest import KEY_A, KEY_B, auth, make_config
from tests.ops_support import Samples, chat, parse_metrics, value, wait_until
from tests.procs import start_proxy, write_config

TINY_KEY = "sk-test-key-tiny-0123456789"
LONG_PROMPT = "word " * 200  # far more than the tiny key's 50 input tokens


def metrics_config(**over):
    keys = [
        {
            "name": "team-a",
            "key": KEY_A,
            "limits": {"rpm": 100, "input_tpm": 100_000, "output_tpm": 20_000},
            "models": {"gpt-4o": {"rpm": 50}},
        },
        {"name": "team-b", "key": KEY_B, "limits": {"rpm": 100}},
        {"name": "tiny", "key": TINY_KEY, "limits": {"rpm": 2, "input_tpm": 50, "output_tpm": 40}},
    ]
    return make_config(**{"keys": keys, "routes": {"gpt-4o-mini*": "mock"}, **over})


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse_metrics(r.text)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_outcomes_by_key_model_and_endpoint(make_client) -> None:
    c = make_client(metrics_config())
    before = await scrape(c)
    assert (await c.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth())).is_success
    assert (await c.post("/v1/chat/completions", json=chat("made-up"), headers=auth())).is_success
    r = await c.post("/v1/chat/completions", json=chat("gpt-4o-mini-2024"), headers=auth())
    assert r.is_success
    r = await c.post("/v1/embeddings", json={"model": "gpt-4o", "input": "hi"}, headers=auth())
    assert r.is_success
    tiny = auth(TINY_KEY)
    big = {"model": "m", "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 1}
    assert (await c.post("/v1/chat/completions", json=big, headers=tiny)).status_code == 429
    r = await c.post("/v1/chat/completions", json=chat("m", max_tokens=41), headers=tiny)
    assert r.status_code == 429
    for _ in range(2):
        assert (await c.post("/v1/chat/completions", json=chat("m", 1), headers=tiny)).is_success
    r = await c.post("/v1/chat/completions", json=chat("m", 1), headers=tiny)
    assert r.status_code == 429
    r = await c.post("/v1/chat/completions", content=b"{not json", headers=auth(KEY_B))
    assert r.status_code == 400
    r = await c.post("/v1/chat/completions", json=chat(), headers=auth("sk-wrong-key-0123456789"))
    assert r.status_code == 401
    faulty = {**auth(KEY_B), "x-mock-fault": "status=503"}
    r = await c.post("/v1/chat/completions", json=chat("made-up"), headers=faulty)
    assert r.status_code == 503
    after = await scrape(c)

    def d(key: str, model: str, endpoint: str, outcome: str) -> float:
        return delta(
            after,
            before,
            "proxy_requests_total",
            key=key,
            model=model,
            endpoint=endpoint,
            outcome=outcome,
        )

    assert d("team-a", "gpt-4o", "chat", "admitted") == 1
    assert d("team-a", "other", "chat", "admitted") == 1  # not configured: bounded label
    assert d("team-a", "gpt-4o-mini*", "chat", "admitted") == 1  # the matching route glob
    assert d("team-a", "gpt-4o", "embeddings", "admitted") == 1
    assert d("tiny", "other", "chat", "limited_input_tokens") == 1
    assert d("tiny", "other", "chat", "limited_output_tokens") == 1
    assert d("tiny", "other", "chat", "limited_requests") == 1
    assert d("tiny", "other", "chat", "admitted") == 2
    assert d("team-b", "-", "chat", "bad_request") == 1  # the body never told the model
    assert d("-", "-", "chat", "auth_failure") == 1
    assert d("team-b", "other", "chat", "upstream_error") == 1
    # Every admitted or limited request made one limiter decision; 401 and 400 did not.
    assert delta(after, before, "proxy_limiter_decision_seconds_count") == 10
    assert delta(after, before, "proxy_upstream_seconds_count", upstream="mock") == 7


async def test_tokens_reserved_charged_refunded(make_client) -> None:
    c = make_client(metrics_config())
    before = await scrape(c)
    headers = {**auth(), "x-mock-fault": "usage-completion=3"}
    r = await c.post("/v1/chat/completions", json=chat("gpt-4o", max_tokens=20), headers=headers)
    assert r.status_code == 200
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    after = await scrape(c)

    def d(name: str, dim: str) -> float:
        return delta(after, before, name, key="team-a", dimension=dim)

    assert d("proxy_tokens_reserved_total", "output_tokens") == 20
    assert d("proxy_tokens_charged_total", "output_tokens") == 3
    assert d("proxy_tokens_refunded_total", "output_tokens") == 17
    assert d("proxy_tokens_reserved_total", "input_tokens") == prompt_tokens
    assert d("proxy_tokens_charged_total", "input_tokens") == prompt_tokens
    assert d("proxy_tokens_refunded_total", "input_tokens") == 0


class _DownBackend(Backend):
    async def reserve(self, scopes, cost, reservation_id):
        raise BackendUnavailable("down")

    async def reconcile(self, reservation, actual):
        raise BackendUnavailable("down")

    async def peek(self, scopes):
        raise BackendUnavailable("down")

    async def reset(self, scopes):
        raise BackendUnavailable("down")

    async def ping(self) -> bool:
        return False


async def test_backend_errors_are_counted(make_client) -> None:
    c = make_client(metrics_config(), backend=_DownBackend())
    before = await scrape(c)
    r = await c.post("/v1/chat/completions", json=chat("gpt-4o"), headers=auth())
    assert r.status_code == 503
    after = await scrape(c)
    assert delta(after, before, "proxy_backend_errors_total", operation="reserve") == 1
    assert (
        delta(
            after,
            before,
            "proxy_requests_total",
            key="team-a",
            model="gpt-4o",
            endpoint="chat",
            outcome="backend_unavailable",
        )
        == 1
    )


async def test_backend_state_hook(make_client) -> None:
    c = make_client(metrics_config(), backend=MemoryBackend())
    assert value(await scrape(c), "proxy_backend_state", state="ok") == 1
    try:
        metrics.set_backend_state("fail_open")
        s = await scrape(c)
        assert value(s, "proxy_backend_state", state="fail_open") == 1
        assert value(s, "proxy_backend_state", state="ok") == 0
    finally:
        metrics.set_backend_state("ok")
    s = await scrape(c)
    assert value(s, "proxy_backend_state", state="ok") == 1
    assert value(s, "proxy_backend_state", state="fail_open") == 0


def test_model_label_cardinality_is_bounded() -> None:
    labels = metrics.ModelLabels(metrics_config(routes={"gpt-4o-mini*": "mock", "exact": "mock"}))
    assert labels("gpt-4o") == "gpt-4o"
    assert labels("exact") == "exact"
    assert labels("gpt-4o-mini-x") == "gpt-4o-mini*"
    assert labels(None) == "-"
    assert {labels(f"random-{i}") for i in range(10_000)} == {"other"}
    assert len(labels._cache) <= labels._CACHE_MAX


def test_streams_in_flight_gauge(tmp_path) -> None:
    cfg = {
        "upstreams": {"mock": {"type": "mock", "tokens_per_second": 20}},
        "default_upstream": "mock",
        "keys": [{"name": "s", "key": KEY_A, "limits": {"rpm": 100}}],
    }
    proxy = start_proxy(write_config(cfg, tmp_path))
    try:

        def gauge() -> float:
            return value(
                parse_metrics(httpx.get(proxy.url + "/metrics").text), "proxy_streams_in_flight"
            )

        assert gauge() == 0
        body = chat(max_tokens=30, stream=True)
        with httpx.stream(
            "POST", proxy.url + "/v1/chat/completions", json=body, headers=auth(), timeout=30
        ) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert gauge() == 1
            rest = list(lines)
        assert "data: [DONE]" in rest
        wait_until(lambda: gauge() == 0, "the stream gauge to drop")
        s = parse_metrics(httpx.get(proxy.url + "/metrics").text)
        assert (
            value(
                s,
                "proxy_requests_total",
                key="s",
                model="other",
                endpoint="chat",
                outcome="admitted",
            )
            == 1
        )
    finally:
        proxy.stop()


@pytest.mark.redis
def test_several_workers_share_one_view(tmp_path, redis_server) -> None:
    cfg = {
        "backend": {"type": "redis", "url": redis_server.url, "key_prefix": f"m{uuid.uuid4().hex}"},
        "upstreams": {"mock": {"type": "mock"}},
        "default_upstream": "mock",
        "keys": [{"name": "w", "key": KEY_A, "limits": {"rpm": 1000}}],
    }
    proxy = start_proxy(write_config(cfg, tmp_path), workers=2)
    try:
        n = 30
        for _ in range(n):  # a new connection each time: the workers share the load
            r = httpx.post(proxy.url + "/v1/chat/completions", json=chat(), headers=auth())
            assert r.status_code == 200
        out = proxy.output()
        pids = {
            line.split("[")[1].split("]")[0]
            for line in out.splitlines()
            if "Started server process" in line
        }
        assert len(pids) == 2
        # Whichever worker answers the scrape, it reports the sum over both.
        for _ in range(6):
            s = parse_metrics(httpx.get(proxy.url + "/metrics").text)
            total = value(
                s,
                "proxy_requests_total",
                key="w",
                model="other",
                endpoint="chat",
                outcome="admitted",
            )
            assert total == n
            assert (
                value(s, "proxy_tokens_charged_total", key="w", dimension="output_tokens") == 5 * n
            )
            assert value(s, "proxy_backend_state", state="ok") == 1
    finally:
        proxy.stop()
    assert proxy.popen.returncode == 0
    assert proxy.output().count("Finished server process") == 2
