"""Streaming through real processes (proxy in front of mock upstreams, official client): what the
client sees, and what the key is charged, on every way a stream can end."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from proxy.tokens import TokenCounter
from tests.procs import free_port, start_mock, start_proxy, write_config

ADMIN_TOKEN = "stream-admin-token-0123456789"
SLOW_TPS = 4  # the slow mock: 250 ms between tokens, so nothing is in flight when a client stops
LIMITS = {"rpm": 1000, "input_tpm": 100_000, "output_tpm": 10_000}
KEY_NAMES = (
    "plain-chat",
    "plain-text",
    "asked",
    "continuous",
    "continuous-only",
    "first-byte",
    "disconnect",
    "cut",
    "no-usage",
    "no-usage-asked",
    "no-stream-usage",
    "malformed",
    "status-503",
    "status-400",
    "dead",
)
COUNTER = TokenCounter("cl100k_base")


def key_of(name: str) -> str:
    return f"sk-stream-{name}-0123456789"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    fast_log, slow_log = tmp / "fast.jsonl", tmp / "slow.jsonl"
    fast = start_mock(log_path=str(fast_log))
    slow = start_mock("--tokens-per-second", str(SLOW_TPS), log_path=str(slow_log))
    keys = [{"name": n, "key": key_of(n), "limits": LIMITS} for n in KEY_NAMES]
    keys.append({"name": "crowd", "key": key_of("crowd"), "limits": {"output_tpm": 1000}})
    cfg = {
        "backend": {"type": "memory"},
        "upstreams": {
            "fast": {"type": "http", "base_url": fast.url + "/v1"},
            "slow": {"type": "http", "base_url": slow.url + "/v1"},
            "bare": {"type": "http", "base_url": fast.url + "/v1", "stream_usage": False},
            "dead": {
                "type": "http",
                "base_url": f"http://127.0.0.1:{free_port()}/v1",
                "connect_timeout_s": 2,
            },
        },
        "default_upstream": "fast",
        "routes": {"slow-*": "slow", "bare-*": "bare", "dead-*": "dead"},
        "window_s": 60,
        "admin": {"token_env": "STREAM_ADMIN_TOKEN"},
        "keys": keys,
    }
    proxy = start_proxy(write_config(cfg, tmp), env={"STREAM_ADMIN_TOKEN": ADMIN_TOKEN})
    yield {"proxy": proxy, "fast": fast, "slow": slow, "fast_log": fast_log, "slow_log": slow_log}
    proxy.stop()
    fast.stop()
    slow.stop()


# --------------------------------------------------------------------------- helpers


def oai(url: str, key: str = "sk-direct-0123456789") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat_body(model: str = "gpt-4o-mini", max_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": f"Tell me about {model}"}]
    return {"model": model, "messages": messages, "max_tokens": max_tokens, **extra}


def text_body(model: str = "gpt-3.5-turbo-instruct", max_tokens: int = 5, **extra: Any) -> dict:
    return {
        "model": model,
        "prompt": f"Once upon a time in {model}",
        "max_tokens": max_tokens,
        **extra,
    }


def api(client: openai.OpenAI, body: dict[str, Any]) -> Any:
    return client.chat.completions if "messages" in body else client.completions


def raw_stream(
    client: openai.OpenAI, body: dict[str, Any], fault: str | None = None
) -> tuple[httpx.Headers, bytes]:
    """The response headers and the exact bytes of the stream, as the official client got them."""
    headers = {"x-mock-fault": fault} if fault else None
    with api(client, body).with_streaming_response.create(
        **body, stream=True, extra_headers=headers
    ) as resp:
        return resp.headers, b"".join(resp.iter_bytes())


def chunks(raw: bytes) -> list[Any]:
    """The stream's events: JSON chunks without the per-request id and created, or "[DONE]"."""
    out: list[Any] = []
    for event in raw.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: ")
        data = event[6:]
        if data == b"[DONE]":
            out.append("[DONE]")
            continue
        obj = json.loads(data)
        obj.pop("id")
        obj.pop("created")
        out.append(obj)
    return out


def admin_usage(stack: dict, name: str) -> tuple[int, int, int]:
    r = httpx.get(
        f"{stack['proxy'].url}/admin/keys/{name}",
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    r.raise_for_status()
    u = r.json()["usage"]
    return u["requests"], u["input_tokens"], u["output_tokens"]


def wait_for(probe, timeout: float = 15.0, what: str = "condition"):
    """Poll ``probe`` until it returns something truthy (bounded; no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def log_entries(path: Path, model: str) -> list[dict[str, Any]]:
    """The mock's log of the requests for ``model`` that came through the proxy (the proxy's
    upstreams have no key here; direct requests carry the client's)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["model"] == model and not e["authorization"]]


def one_entry(path: Path, model: str) -> dict[str, Any]:
    (entry,) = wait_for(lambda: log_entries(path, model), what=f"the mock's log of {model}")
    return entry


def remaining_after(stack: dict, name: str) -> tuple[dict[str, int], int]:
    """Read usage back through the proxy: a tiny request's x-ratelimit-remaining-* headers
    (and its own prompt tokens, which those headers include)."""
    raw = oai(stack["proxy"].url, key_of(name)).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "probe"}], max_tokens=1
    )
    probe = raw.parse()
    assert probe.usage.completion_tokens == 1
    h = raw.headers
    remaining = {
        d: int(h[f"x-ratelimit-remaining-{d}"])
        for d in ("requests", "input-tokens", "output-tokens")
    }
    return remaining, probe.usage.prompt_tokens


def streamed_text(items: list[Any]) -> str:
    """The text of the deltas in parsed chunks (one choice)."""
    out = []
    for c in items:
        if not isinstance(c, dict):
            continue
        for choice in c["choices"]:
            out.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return "".join(out)


# --------------------------------------------------------------------------- what the client sees


@pytest.mark.parametrize(
    ("name", "body"),
    [("plain-chat", chat_body(max_tokens=6)), ("plain-text", text_body(max_tokens=6))],
)
def test_stream_without_include_usage_is_the_upstreams_stream(stack, name, body) -> None:
    # The upstream reports usage that differs from the text, so the charge shows which was used.
    fault = "usage-prompt=31,usage-completion=9"
    _, direct = raw_stream(oai(stack["fast"].url), body, fault)
    headers, proxied = raw_stream(oai(stack["proxy"].url, key_of(name)), body, fault)

    assert headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in headers
    assert int(headers["x-ratelimit-limit-output-tokens"]) == LIMITS["output_tpm"]
    assert int(headers["x-ratelimit-remaining-output-tokens"]) == LIMITS["output_tpm"] - 6
    # Exactly the chunks the client would have had without the proxy: the usage the proxy
    # asked for (the usage chunk, and "usage": null on every chunk) is gone.
    assert chunks(proxied) == chunks(direct)
    assert chunks(proxied)[-1] == "[DONE]" and len(chunks(proxied)) >= 8
    assert b"usage" not in proxied
    # The proxy did ask: the upstream sent usage (the mock logs what it reported).
    entries = log_entries(stack["fast_log"], body["model"])
    assert entries[-1]["usage_sent"] and entries[-1]["completion_tokens"] == 9
    # Settled to the final usage chunk, before the stream ended for the client.
    assert admin_usage(stack, name) == (1, 31, 9)
    remaining, probe_prompt = remaining_after(stack, name)
    assert remaining == {
        "requests": LIMITS["rpm"] - 2,
        "input-tokens": LIMITS["input_tpm"] - 31 - probe_prompt,
        "output-tokens": LIMITS["output_tpm"] - 9 - 1,
    }


def test_stream_with_include_usage_is_untouched(stack) -> None:
    body = chat_body(model="asked-model", max_tokens=5, stream_options={"include_usage": True})
    fault = "usage-completion=8"
    _, direct = raw_stream(oai(stack["fast"].url), body, fault)
    _, proxied = raw_stream(oai(stack["proxy"].url, key_of("asked")), body, fault)
    assert chunks(proxied) == chunks(direct)
    got = chunks(proxied)
    assert all(c["usage"] is None for c in got[:-2])  # OpenAI's "usage": null on every chunk
    assert got[-2]["choices"] == [] and got[-2]["usage"]["completion_tokens"] == 8
    prompt = got[-2]["usage"]["prompt_tokens"]
    assert admin_usage(stack, "asked") == (1, prompt, 8)


def test_continuous_usage_stats_last_one_counts(stack) -> None:
    # vLLM's cumulative usage on every chunk; the final usage chunk (8) differs from the
    # running counts (1..5) here, so charging anything but the last one shows.
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = chat_body(model="continuous-model", max_tokens=5, stream_options=opts)
    fault = "usage-completion=8"
    _, direct = raw_stream(oai(stack["fast"].url), body, fault)
    _, proxied = raw_stream(oai(stack["proxy"].url, key_of("continuous")), body, fault)
    assert chunks(proxied) == chunks(direct)
    running = [c["usage"]["completion_tokens"] for c in chunks(proxied)[:-1]]
    assert running[1:6] == [1, 2, 3, 4, 5] and running[-1] == 8
    assert admin_usage(stack, "continuous")[2] == 8


def test_continuous_usage_stats_without_include_usage(stack) -> None:
    # Without include_usage the upstream sends no usage at all, continuous or not: the proxy
    # asks for the final usage only, so the client still sees none.
    body = chat_body(
        model="continuous-only-model", max_tokens=5, stream_options={"continuous_usage_stats": True}
    )
    _, direct = raw_stream(oai(stack["fast"].url), body, "usage-completion=8")
    _, proxied = raw_stream(
        oai(stack["proxy"].url, key_of("continuous-only")), body, "usage-completion=8"
    )
    assert b"usage" not in direct
    assert chunks(proxied) == chunks(direct)
    assert admin_usage(stack, "continuous-only")[2] == 8


def test_first_byte_before_the_upstream_is_done(stack) -> None:
    # The slow mock needs 2 s for 8 tokens and logs the request when it has sent the last:
    # the client has its first event while the mock is still generating (no buffering).
    body = chat_body(model="slow-first-byte", max_tokens=8)
    client = oai(stack["proxy"].url, key_of("first-byte"))
    with client.chat.completions.with_streaming_response.create(**body, stream=True) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in resp.headers
        assert "x-ratelimit-remaining-requests" in resp.headers
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert first.startswith("data: {")
        assert log_entries(stack["slow_log"], "slow-first-byte") == []
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and len(rest) == 8 + 1 + 1
    assert one_entry(stack["slow_log"], "slow-first-byte")["completion_tokens"] == 8


# --------------------------------------------------------------------------- streams that end early


def test_client_disconnect_closes_upstream_and_charges_what_was_streamed(stack) -> None:
    model = "slow-disconnect"
    body = chat_body(model=model, max_tokens=50)
    stream = oai(stack["proxy"].url, key_of("disconnect")).chat.completions.create(
        **body, stream=True
    )
    received = []
    for chunk in stream:
        received.append(chunk)
        if sum(1 for c in received if c.choices and c.choices[0].delta.content) == 3:
            break
    stream.close()  # the client goes away: its connection to the proxy closes
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    streamed = COUNTER.count_text(text, model)
    assert streamed == 3

    # The proxy closed its upstream request at once: the mock saw the client leave (499)
    # long before the 50 tokens it was generating.
    entry = one_entry(stack["slow_log"], model)
    assert entry["status"] == 499 and entry["true_completion_tokens"] == streamed
    # Charged exactly what was streamed (not the reservation of 50, not zero), and the input.
    usage = wait_for(
        lambda: (u := admin_usage(stack, "disconnect"))[2] != 50 and u, what="settlement"
    )
    assert usage == (1, entry["true_prompt_tokens"], streamed)
    assert "Traceback" not in stack["proxy"].output()


def test_upstream_cut_mid_stream_ends_cleanly_and_charges_what_was_sent(stack) -> None:
    model = "cut-model"
    body = chat_body(model=model, max_tokens=20)
    client = oai(stack["proxy"].url, key_of("cut"))
    stream = client.chat.completions.create(
        **body, stream=True, extra_headers={"x-mock-fault": "cut-after=4"}
    )
    got = list(stream)  # the stream ends without an error for the client
    contents = [c.choices[0].delta.content for c in got if c.choices and c.choices[0].delta.content]
    assert len(contents) == 4 and all(c.choices[0].finish_reason is None for c in got)
    entry = one_entry(stack["fast_log"], model)
    assert not entry["usage_sent"] and entry["true_completion_tokens"] == 4
    streamed = COUNTER.count_text("".join(contents), model)
    assert admin_usage(stack, "cut") == (1, entry["true_prompt_tokens"], streamed)
    assert streamed == 4


@pytest.mark.parametrize(
    ("name", "options"),
    [("no-usage", None), ("no-usage-asked", {"include_usage": True})],
)
def test_upstream_without_usage_is_charged_by_count(stack, name, options) -> None:
    model = f"{name}-model"
    extra = {"stream_options": options} if options else {}
    body = chat_body(model=model, max_tokens=7, **extra)
    _, direct = raw_stream(oai(stack["fast"].url), body, "no-usage")
    _, proxied = raw_stream(oai(stack["proxy"].url, key_of(name)), body, "no-usage")
    assert chunks(proxied) == chunks(direct)
    entries = log_entries(stack["fast_log"], model)
    assert entries[-1]["true_completion_tokens"] == 7 and not entries[-1]["usage_sent"]
    assert COUNTER.count_text(streamed_text(chunks(proxied)), model) == 7
    assert admin_usage(stack, name) == (1, entries[-1]["true_prompt_tokens"], 7)


def test_upstream_with_stream_usage_off_is_charged_by_count(stack) -> None:
    # stream_usage: false (an upstream that rejects stream_options): nothing is asked, the
    # stream passes as it is, and the charge is the proxy's own count.
    model = "bare-model"
    body = text_body(model=model, max_tokens=7)
    _, direct = raw_stream(oai(stack["fast"].url), body)
    _, proxied = raw_stream(oai(stack["proxy"].url, key_of("no-stream-usage")), body)
    assert direct.count(b"data: ") == proxied.count(b"data: ")
    assert chunks(proxied) == chunks(direct)
    entry = log_entries(stack["fast_log"], model)[-1]
    assert not entry["usage_sent"]
    assert admin_usage(stack, "no-stream-usage") == (1, entry["true_prompt_tokens"], 7)


def test_malformed_event_ends_the_stream_cleanly(stack) -> None:
    # The mock sends a broken event after 2 content chunks, then goes on. The proxy forwards
    # what came before it, ends the client's stream cleanly (no [DONE], no error), closes the
    # upstream, and charges what it sent.
    model = "slow-malformed"
    body = chat_body(model=model, max_tokens=20)
    fault = "malformed-after=2"
    client = oai(stack["proxy"].url, key_of("malformed"))
    _, proxied = raw_stream(client, body, fault)
    got = chunks(proxied)
    assert "[DONE]" not in got and len(got) == 3  # the role chunk and two content chunks
    with pytest.raises(json.JSONDecodeError):  # what the client would have met directly
        list(
            oai(stack["fast"].url).chat.completions.create(
                **body, stream=True, extra_headers={"x-mock-fault": fault}
            )
        )
    entry = one_entry(stack["slow_log"], model)
    assert entry["status"] == 499 and entry["true_completion_tokens"] < 20
    streamed = COUNTER.count_text(streamed_text(got), model)
    assert streamed == 2
    usage = wait_for(lambda: (u := admin_usage(stack, "malformed"))[2] != 20 and u)
    assert usage == (1, entry["true_prompt_tokens"], streamed)


# ---------------------------------------------------------------- errors before the first byte


@pytest.mark.parametrize(
    ("name", "status", "error"),
    [("status-503", 503, openai.InternalServerError), ("status-400", 400, openai.BadRequestError)],
)
def test_upstream_error_status_before_first_byte_is_refunded(stack, name, status, error) -> None:
    client = oai(stack["proxy"].url, key_of(name))
    with pytest.raises(error) as exc:
        client.chat.completions.create(
            **chat_body(max_tokens=40),
            stream=True,
            extra_headers={"x-mock-fault": f"status={status}"},
        )
    assert exc.value.status_code == status
    assert "x-ratelimit-remaining-requests" in exc.value.response.headers
    assert admin_usage(stack, name) == (1, 0, 0)  # the request counts, its tokens do not


def test_unreachable_upstream_is_502_and_refunded(stack) -> None:
    client = oai(stack["proxy"].url, key_of("dead"))
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(**chat_body(model="dead-model", max_tokens=40), stream=True)
    assert exc.value.status_code == 502 and exc.value.code == "upstream_unreachable"
    assert admin_usage(stack, "dead") == (1, 0, 0)


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_streams_cannot_exceed_output_tpm(stack) -> None:
    # output_tpm 1000, 20 streams of max_tokens 100 at once: each reserved 100 before it
    # started, so 10 are admitted and 10 refused on output tokens while those are in flight
    # (each waits 2 s for its first byte, so all 20 overlap).
    client = openai.AsyncOpenAI(
        base_url=stack["proxy"].url + "/v1", api_key=key_of("crowd"), max_retries=0, timeout=30
    )
    body = chat_body(model="crowd-model", max_tokens=100)

    async def one() -> Any:
        try:
            stream = await client.chat.completions.create(
                **body, stream=True, extra_headers={"x-mock-fault": "delay-first-ms=2000"}
            )
        except openai.RateLimitError as exc:
            return exc
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    results = await asyncio.gather(*(one() for _ in range(20)))
    await client.close()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if isinstance(r, str)]
    assert len(served) == 10 and len(refused) == 10
    assert all(e.type == "output_tokens" for e in refused)
    assert all(COUNTER.count_text(t, "crowd-model") == 100 for t in served)
    assert admin_usage(stack, "crowd")[2] == 1000
    entries = log_entries(stack["fast_log"], "crowd-model")
    assert len(entries) == 10
    # They were in flight together: every served request started before any of them ended.
    assert max(e["t"] for e in entries) < min(e["t_end"] for e in entries)


# ---------------------------------------------------------------------- in-process: odd upstreams

UP = "http://upstream.test/v1"


def http_config(**over: Any):
    from tests.conftest import make_config

    up = {"type": "http", "base_url": UP, "api_key_env": "UP_KEY", "timeout_s": 5}
    return make_config(upstreams={"up": up}, default_upstream="up", **over)


class Upstream(httpx.AsyncByteStream):
    """An SSE body sent as the given reads, optionally failing after the last one."""

    def __init__(self, reads: list[bytes], error: Exception | None = None) -> None:
        self.reads = reads
        self.error = error
        self.closed = False

    async def __aiter__(self):
        for read in self.reads:
            yield read
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


def sse(obj: Any, sep: bytes = b"\n\n") -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + sep


def delta(text: str, index: int = 0, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}


def mount(upstream: Upstream):
    import respx

    return respx.post(f"{UP}/chat/completions").mock(
        return_value=httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=upstream
        )
    )


async def used(client: httpx.AsyncClient) -> tuple[int, int, int]:
    node = client.app.state.node  # type: ignore[attr-defined]
    policy = next(p for p in node.snapshot.policies.values() if p.name == "team-a")
    (state,) = await node.backend.peek(policy.scopes_for(None))
    return state.used


async def post_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> bytes:
    from tests.conftest import auth

    async with client.stream("POST", "/v1/chat/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200
        assert "content-length" not in r.headers
        return b"".join([c async for c in r.aiter_raw()])


def prompt_tokens(body: dict[str, Any]) -> int:
    return TokenCounter("cl100k_base").count_chat(body["messages"], body["model"])


async def test_usage_the_client_did_not_ask_for_is_removed_in_any_shape(
    respx_mock, make_client
) -> None:
    # Spaced JSON, CRLF framing, extra fields, a comment, usage on a content chunk and in the
    # usage-only chunk, split across reads at awkward places: the client sees no usage-only
    # chunk and no null usage; usage riding on a content chunk (llama.cpp's completions send it
    # whether asked or not) reaches the client as the server sent it.
    stream = b"".join(
        [
            b": keep-alive\n\n",
            b'data: {"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}], '
            b'"usage": null}\r\n\r\n',
            b"id: 7\nevent: chunk\n" + sse({**delta("Hello"), "usage": None}),
            sse({**delta(" world"), "usage": {"prompt_tokens": 3, "completion_tokens": 1}}),
            sse({"id": "c", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}}),
            b"data: [DONE]\n\n",
        ]
    )
    reads = [stream[i : i + 37] for i in range(0, len(stream), 37)]
    route = mount(Upstream(reads))
    c = make_client(http_config())
    opts = {"continuous_usage_stats": True}
    body = {**chat_body(max_tokens=50), "stream": True, "stream_options": opts}
    raw = await post_stream(c, body)
    sent = json.loads(route.calls.last.request.content)
    assert sent["stream_options"] == {"include_usage": True}  # asked for the final usage only
    assert raw.count(b'"usage"') == 1
    assert raw.startswith(b": keep-alive\n\n") and raw.endswith(b"data: [DONE]\n\n")
    assert b"id: 7\nevent: chunk\n" in raw
    datas = [
        e.split(b"data: ", 1)[1]
        for e in raw.replace(b"\r\n", b"\n").split(b"\n\n")
        if b"data: {" in e
    ]
    assert [json.loads(d)["choices"][0]["delta"] for d in datas] == [
        {"role": "assistant"},
        {"content": "Hello"},
        {"content": " world"},
    ]
    assert [json.loads(d).get("usage") for d in datas] == [
        None,
        None,
        {"prompt_tokens": 3, "completion_tokens": 1},
    ]
    assert "usage" not in json.loads(datas[0]) and "usage" not in json.loads(datas[1])
    assert await used(c) == (1, 11, 4)  # the last usage


async def test_cut_stream_counts_each_choice_on_its_own(respx_mock, make_client) -> None:
    # n=2, interleaved, then the connection breaks: no usage, so the charge is the count of
    # what was forwarded, each choice's text counted separately.
    reads = [
        sse(delta("Hello", 0)) + sse(delta("Hel", 1)),
        sse(delta(" world", 0)),
        sse(delta("lo", 1)),
    ]
    upstream = Upstream(reads, httpx.RemoteProtocolError("peer closed connection"))
    mount(upstream)
    c = make_client(http_config())
    body = {**chat_body(max_tokens=50, n=2), "stream": True}
    raw = await post_stream(c, body)
    assert raw == b"".join(reads)  # ended cleanly for the client, without [DONE]
    count = TokenCounter("cl100k_base").count_text
    expected = count("Hello world", None) + count("Hello", None)
    assert expected != count("HelloHel worldlo", None)
    assert await used(c) == (1, prompt_tokens(body), expected)
    assert upstream.closed


async def test_long_stream_without_usage_is_counted_in_full(respx_mock, make_client) -> None:
    from proxy.streaming import RAW_BUDGET
    from tests.conftest import KEY_A

    # Escaped quotes, newlines, backslashes and \\u escapes (json.dumps' ensure_ascii) too.
    pieces = [" sit", ' "quoted"', "\n", " caf\u00e9", " back\\slash"]
    texts = [pieces[i % len(pieces)] for i in range(6000)]
    reads = [sse(delta(t)) for t in texts] + [b"data: [DONE]\n\n"]
    assert sum(map(len, reads)) > 2 * RAW_BUDGET  # raw bodies are reduced to text on the way
    mount(Upstream(reads))
    key = {"name": "team-a", "key": KEY_A, "limits": {"output_tpm": 100_000}}
    c = make_client(http_config(keys=[key]))
    body = {**chat_body(max_tokens=50_000), "stream": True}
    raw = await post_stream(c, body)
    assert raw == b"".join(reads)
    expected = TokenCounter("cl100k_base").count_text("".join(texts), None)
    assert await used(c) == (1, prompt_tokens(body), expected)


async def test_error_event_mid_stream_is_forwarded_and_charged_by_count(
    respx_mock, make_client
) -> None:
    error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
    reads = [sse(delta("Hello")), sse(delta(" world")), sse(error), b"data: [DONE]\n\n"]
    mount(Upstream(reads))
    c = make_client(http_config())
    body = {**chat_body(max_tokens=50), "stream": True}
    raw = await post_stream(c, body)
    assert raw == b"".join(reads)
    count = TokenCounter("cl100k_base").count_text("Hello world", None)
    assert await used(c) == (1, prompt_tokens(body), count)


async def test_invalid_json_in_a_usage_chunk_ends_the_stream_cleanly(
    respx_mock, make_client
) -> None:
    # It looks like a JSON object (braces at both ends) and like usage, but does not parse:
    # the client gets what came before it and a clean end, and the charge is the count.
    broken = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,}}\n\n'
    reads = [sse(delta("Hello")), sse(delta(" world")), broken, b"data: [DONE]\n\n"]
    mount(Upstream(reads))
    c = make_client(http_config())
    body = {**chat_body(max_tokens=50), "stream": True}
    raw = await post_stream(c, body)
    assert raw == b"".join(reads[:2])
    count = TokenCounter("cl100k_base").count_text("Hello world", None)
    assert await used(c) == (1, prompt_tokens(body), count)
