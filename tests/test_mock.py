"""The mock upstream: OpenAI shapes, exact usage, streaming, faults and the request log."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from proxy.mock import (
    WORDS,
    MockSettings,
    completion_text,
    create_mock_app,
    install_log_filter,
    token_text,
)
from proxy.sse import EventSplitter, event_data, is_done
from proxy.tokens import TokenCounter, get_encoding

COUNTER = TokenCounter()
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "name": "ann", "content": "Tell me about sliding windows."},
]
MODELS = ["gpt-4o-mini", "gpt-3.5-turbo", "some-local-model"]


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def wait_for_log(path: Path, count: int, deadline_s: float = 20.0) -> list[dict[str, Any]]:
    # Polls until the server has logged `count` requests (a generous deadline, not a timing test).
    end = time.monotonic() + deadline_s
    while True:
        entries = read_log(path)
        if len(entries) >= count or time.monotonic() > end:
            return entries
        await asyncio.sleep(0.02)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "mock.jsonl"


@pytest.fixture
async def client(log_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_mock_app(MockSettings(log_path=str(log_path)))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://mock") as c:
        yield c


@contextlib.contextmanager
def serve(settings: MockSettings) -> Iterator[str]:
    """Run the mock with uvicorn on a free loopback port in a thread."""
    install_log_filter()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_mock_app(settings),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("mock server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def live(log_path: Path) -> Iterator[str]:
    with serve(MockSettings(log_path=str(log_path))) as url:
        yield url


async def stream_events(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> list[bytes]:
    """POST a streaming request; return the data payloads of all events received."""
    splitter = EventSplitter()
    datas: list[bytes] = []
    async with client.stream("POST", path, json=body, headers=headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for chunk in r.aiter_raw():
            for event in splitter.feed(chunk):
                data = event_data(event)
                if data is not None:
                    datas.append(data)
    assert splitter.flush() == b""
    return datas


# --------------------------------------------------------------------------- text exactness


def test_words_are_single_tokens_in_both_encodings() -> None:
    assert len(set(WORDS)) == len(WORDS)
    for name in ("cl100k_base", "o200k_base"):
        enc = get_encoding(name)
        for w in WORDS:
            assert len(enc.encode_ordinary(w)) == 1, (name, w)
            assert len(enc.encode_ordinary(" " + w)) == 1, (name, w)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_chunks_join_to_the_text_and_count_exactly(chunk: int) -> None:
    for model in ("gpt-4o", "gpt-4"):
        for offset in (0, 5, 63, 200):
            for tokens in (0, 1, 7, 65, 130):
                parts = [
                    token_text(offset, i, min(chunk, tokens - i)) for i in range(0, tokens, chunk)
                ]
                text = completion_text(offset, tokens)
                assert "".join(parts) == text
                assert COUNTER.count_text(text, model) == tokens


# --------------------------------------------------------------------------- non-streaming


@pytest.mark.parametrize("model", MODELS)
async def test_chat_completion_shape_and_usage(client: httpx.AsyncClient, model: str) -> None:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 9}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    obj = r.json()
    assert obj["id"].startswith("chatcmpl-")
    assert obj["object"] == "chat.completion"
    assert isinstance(obj["created"], int)
    assert obj["model"] == model
    [choice] = obj["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    usage = obj["usage"]
    assert usage["prompt_tokens"] == COUNTER.count_chat(MESSAGES, model)
    assert usage["completion_tokens"] == 9
    assert usage["total_tokens"] == usage["prompt_tokens"] + 9
    assert COUNTER.count_text(choice["message"]["content"], model) == 9


async def test_chat_defaults_and_limits(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    obj = r.json()
    assert obj["usage"]["completion_tokens"] == 16
    assert obj["choices"][0]["finish_reason"] == "stop"
    both = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 50, "max_completion_tokens": 4}
    r = await client.post("/v1/chat/completions", json=both)
    assert r.json()["usage"]["completion_tokens"] == 4
    r = await client.post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 0}
    )
    assert r.json()["usage"]["completion_tokens"] == 0
    assert r.json()["choices"][0]["message"]["content"] == ""


async def test_chat_n_and_determinism(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5, "n": 3}
    a = (await client.post("/v1/chat/completions", json=body)).json()
    b = (await client.post("/v1/chat/completions", json=body)).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len(set(texts)) == 3
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] == 15
    assert sum(COUNTER.count_text(t, "gpt-4o") for t in texts) == 15
    other = {**body, "messages": [{"role": "user", "content": "something else"}]}
    c = (await client.post("/v1/chat/completions", json=other)).json()
    assert [x["message"]["content"] for x in c["choices"]] != texts


async def test_large_prompt_counted_off_loop(client: httpx.AsyncClient) -> None:
    big = [{"role": "user", "content": "lorem ipsum dolor " * 5000}]  # 90k chars
    body = {"model": "gpt-4o", "messages": big, "max_tokens": 1}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.json()["usage"]["prompt_tokens"] == COUNTER.count_chat(big, "gpt-4o")
    emb = {"model": "text-embedding-3-small", "input": "word " * 20_000}
    r = await client.post("/v1/embeddings", json=emb)
    assert r.json()["usage"]["prompt_tokens"] == COUNTER.count_text("word " * 20_000, None)


async def test_chat_tools_counted(client: httpx.AsyncClient) -> None:
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    body = {"model": "gpt-4o", "messages": MESSAGES, "tools": tools, "max_tokens": 1}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.json()["usage"]["prompt_tokens"] == COUNTER.count_chat(MESSAGES, "gpt-4o", tools)


@pytest.mark.parametrize(
    ("prompt", "choices"),
    [("Say hi", 1), (["one", "two"], 2), ([1, 2, 3, 4], 1), ([[1, 2], [3]], 2)],
)
async def test_completions(client: httpx.AsyncClient, prompt: Any, choices: int) -> None:
    model = "gpt-3.5-turbo-instruct"
    body = {"model": model, "prompt": prompt, "max_tokens": 6, "n": 2}
    obj = (await client.post("/v1/completions", json=body)).json()
    assert obj["object"] == "text_completion"
    assert obj["id"].startswith("cmpl-")
    assert obj["model"] == model
    assert [c["index"] for c in obj["choices"]] == list(range(2 * choices))
    assert all(c["finish_reason"] == "length" for c in obj["choices"])
    assert obj["usage"]["prompt_tokens"] == COUNTER.count_prompt(prompt, model)
    assert obj["usage"]["completion_tokens"] == 12 * choices
    assert sum(COUNTER.count_text(c["text"], model) for c in obj["choices"]) == 12 * choices


async def test_embeddings(client: httpx.AsyncClient) -> None:
    model = "text-embedding-3-small"
    body = {"model": model, "input": ["hello world", "bye"]}
    obj = (await client.post("/v1/embeddings", json=body)).json()
    assert obj["object"] == "list"
    assert obj["model"] == model
    assert obj["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vectors = [d["embedding"] for d in obj["data"]]
    assert [d["index"] for d in obj["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in obj["data"])
    assert [len(v) for v in vectors] == [8, 8]
    assert vectors[0] != vectors[1]
    assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-5
    again = (await client.post("/v1/embeddings", json=body)).json()
    assert [d["embedding"] for d in again["data"]] == vectors
    b64 = (await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})).json()
    decoded = [list(struct.unpack("<8f", base64.b64decode(d["embedding"]))) for d in b64["data"]]
    assert decoded == vectors
    wide = (await client.post("/v1/embeddings", json={**body, "dimensions": 32})).json()
    assert len(wide["data"][0]["embedding"]) == 32
    single = (await client.post("/v1/embeddings", json={"model": model, "input": "x"})).json()
    assert len(single["data"]) == 1


async def test_models(client: httpx.AsyncClient) -> None:
    obj = (await client.get("/v1/models")).json()
    assert obj["object"] == "list"
    assert all(m["object"] == "model" and m["id"] for m in obj["data"])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": "hi"}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": [1]}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": "9"}),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": MESSAGES, "n": 0}),
        ("/v1/completions", {"model": "m", "prompt": {"a": 1}}),
        ("/v1/completions", {"model": "m"}),
        ("/v1/embeddings", {"model": "m", "input": [None]}),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "hex"}),
    ],
)
async def test_bad_requests_get_openai_errors(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    r = await client.post(path, json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


async def test_invalid_json_and_unknown_path(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{nope")
    assert r.status_code == 400 and "error" in r.json()
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


# --------------------------------------------------------------------------- faults


async def test_fault_status(client: httpx.AsyncClient, log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES}
    r = await client.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "status=503"})
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "server_error"
    r = await client.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "status=429"})
    assert r.status_code == 429
    entries = read_log(log_path)
    assert [e["status"] for e in entries] == [503, 429]
    assert entries[0]["model"] == "gpt-4o" and entries[0]["fault"] == "status=503"


async def test_fault_usage_override_and_no_usage(client: httpx.AsyncClient, log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 5}
    fault = {"x-mock-fault": "usage-prompt=7, usage-completion=9"}
    obj = (await client.post("/v1/chat/completions", json=body, headers=fault)).json()
    assert obj["usage"] == {"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16}
    assert COUNTER.count_text(obj["choices"][0]["message"]["content"], "gpt-4o") == 5
    r = await client.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "no-usage"})
    assert "usage" not in r.json()
    e1, e2 = read_log(log_path)
    true_prompt = COUNTER.count_chat(MESSAGES, "gpt-4o")
    assert (e1["prompt_tokens"], e1["completion_tokens"], e1["usage_sent"]) == (7, 9, True)
    assert (e1["true_prompt_tokens"], e1["true_completion_tokens"]) == (true_prompt, 5)
    assert (e2["prompt_tokens"], e2["completion_tokens"], e2["usage_sent"]) == (
        true_prompt,
        5,
        False,
    )


async def test_fault_length_is_natural_answer_length(client: httpx.AsyncClient) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    short = await client.post(
        "/v1/chat/completions", json=body, headers={"x-mock-fault": "length=3"}
    )
    assert short.json()["usage"]["completion_tokens"] == 3
    assert short.json()["choices"][0]["finish_reason"] == "stop"
    long = await client.post(
        "/v1/chat/completions", json=body, headers={"x-mock-fault": "length=30"}
    )
    assert long.json()["usage"]["completion_tokens"] == 10
    assert long.json()["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("header", ["explode", "status=abc", "status=200", "cut-after", "hang=1"])
async def test_bad_fault_header(client: httpx.AsyncClient, header: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES}
    r = await client.post("/v1/chat/completions", json=body, headers={"x-mock-fault": header})
    assert r.status_code == 400
    assert "x-mock-fault" in r.json()["error"]["message"]


async def test_log_records_authorization(client: httpx.AsyncClient, log_path: Path) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 2}
    await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer up-1"})
    await client.post("/v1/chat/completions", json=body)
    with_auth, without = read_log(log_path)
    assert with_auth["authorization_present"] is True
    assert with_auth["authorization"] == "Bearer up-1"
    assert without["authorization_present"] is False and without["authorization"] is None
    assert with_auth["endpoint"] == "/v1/chat/completions"
    assert with_auth["model"] == "gpt-4o-mini" and with_auth["stream"] is False
    assert with_auth["status"] == 200
    assert with_auth["prompt_tokens"] == COUNTER.count_chat(MESSAGES, "gpt-4o-mini")
    assert with_auth["completion_tokens"] == 2
    assert with_auth["t"] <= with_auth["t_end"]


async def test_latency_lower_bound(log_path: Path) -> None:
    # Lower bounds only: a sleep never ends early, so these cannot flake on a slow machine.
    app = create_mock_app(MockSettings(latency_ms=150, log_path=str(log_path)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://m") as c:
        body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 1}
        t0 = time.monotonic()
        await c.post(
            "/v1/chat/completions", json=body, headers={"x-mock-fault": "delay-first-ms=100"}
        )
        assert time.monotonic() - t0 >= 0.24
    [entry] = read_log(log_path)
    assert entry["t_end"] - entry["t"] >= 0.24


# --------------------------------------------------------------------------- streaming (uvicorn)


def chunks_of(datas: list[bytes]) -> tuple[list[dict[str, Any]], bool]:
    done = bool(datas) and is_done(datas[-1])
    return [orjson.loads(d) for d in (datas[:-1] if done else datas)], done


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
async def test_stream_chat_include_usage(live: str, log_path: Path, model: str) -> None:
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=live) as c:
        chunks, done = chunks_of(await stream_events(c, "/v1/chat/completions", body))
    assert done
    first, *content, finish, usage_chunk = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1
    assert all(ch["model"] == model for ch in chunks)
    assert all("usage" in ch and ch["usage"] is None for ch in chunks[:-1])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == []
    prompt = COUNTER.count_chat(MESSAGES, model)
    assert usage_chunk["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 7,
        "total_tokens": prompt + 7,
    }
    text = "".join(ch["choices"][0]["delta"]["content"] for ch in content)
    assert len(content) == 7  # chunk_tokens = 1
    assert COUNTER.count_text(text, model) == 7
    [entry] = await wait_for_log(log_path, 1)
    assert entry["stream"] is True and entry["completion_tokens"] == 7 and entry["usage_sent"]


async def test_stream_without_include_usage(live: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(base_url=live) as c:
        chunks, done = chunks_of(await stream_events(c, "/v1/chat/completions", body))
    assert done
    assert all("usage" not in ch for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stream_chunk_tokens_and_n(log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 11, "n": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with serve(MockSettings(chunk_tokens=4, log_path=str(log_path))) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            chunks, done = chunks_of(await stream_events(c, "/v1/chat/completions", body))
    assert done
    texts = {0: "", 1: ""}
    counts = {0: 0, 1: 0}
    for ch in chunks:
        for choice in ch["choices"]:
            content = choice["delta"].get("content")
            if content:
                texts[choice["index"]] += content
                counts[choice["index"]] += 1
                assert COUNTER.count_text(content, "gpt-4o") <= 4
    assert counts == {0: 3, 1: 3}  # 4 + 4 + 3 tokens each
    assert [COUNTER.count_text(t, "gpt-4o") for t in texts.values()] == [11, 11]
    assert chunks[-1]["usage"]["completion_tokens"] == 22


async def test_stream_matches_non_stream_text(live: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 6}
    async with httpx.AsyncClient(base_url=live) as c:
        plain = (await c.post("/v1/chat/completions", json=body)).json()
        chunks, _ = chunks_of(
            await stream_events(c, "/v1/chat/completions", {**body, "stream": True})
        )
    streamed = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert streamed == plain["choices"][0]["message"]["content"]


async def test_stream_continuous_usage(live: str) -> None:
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with httpx.AsyncClient(base_url=live) as c:
        chunks, done = chunks_of(await stream_events(c, "/v1/chat/completions", body))
    assert done
    completions = [ch["usage"]["completion_tokens"] for ch in chunks]
    assert completions == [0, 1, 2, 3, 4, 5, 5, 5]  # role, 5 content, finish, usage-only
    prompt = COUNTER.count_chat(MESSAGES, "gpt-4o")
    assert all(ch["usage"]["prompt_tokens"] == prompt for ch in chunks)


async def test_stream_completions(live: str) -> None:
    model = "gpt-3.5-turbo-instruct"
    body = {"model": model, "prompt": "Once upon", "max_tokens": 4, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with httpx.AsyncClient(base_url=live) as c:
        chunks, done = chunks_of(await stream_events(c, "/v1/completions", body))
    assert done
    assert all(ch["object"] == "text_completion" for ch in chunks)
    *content, finish, usage_chunk = chunks
    assert finish["choices"][0] == {
        "text": "",
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
    }
    text = "".join(ch["choices"][0]["text"] for ch in content)
    assert COUNTER.count_text(text, model) == 4
    assert usage_chunk["usage"]["prompt_tokens"] == COUNTER.count_prompt("Once upon", model)
    assert usage_chunk["usage"]["completion_tokens"] == 4


async def test_stream_cut_after(live: str, log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10, "stream": True}
    splitter = EventSplitter()
    datas: list[bytes] = []
    async with httpx.AsyncClient(base_url=live) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            async with c.stream(
                "POST", "/v1/chat/completions", json=body, headers={"x-mock-fault": "cut-after=2"}
            ) as r:
                async for chunk in r.aiter_raw():
                    datas.extend(d for e in splitter.feed(chunk) if (d := event_data(e)))
    assert not any(is_done(d) for d in datas)
    assert len(datas) == 3  # role chunk + 2 content chunks
    [entry] = await wait_for_log(log_path, 1)
    assert entry["completion_tokens"] == 2 and entry["usage_sent"] is False


async def test_non_stream_cut_drops_connection(live: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 10}
    async with httpx.AsyncClient(base_url=live) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            await c.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "cut-after=0"})


async def test_stream_malformed_after(live: str) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    headers = {"x-mock-fault": "malformed-after=2"}
    async with httpx.AsyncClient(base_url=live) as c:
        datas = await stream_events(c, "/v1/chat/completions", body, headers)
    assert is_done(datas[-1])
    bad = []
    for i, d in enumerate(datas[:-1]):
        try:
            orjson.loads(d)
        except orjson.JSONDecodeError:
            bad.append(i)
    assert bad == [3]  # after the role chunk and 2 content chunks


async def test_stream_no_usage_fault(live: str) -> None:
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=live) as c:
        datas = await stream_events(c, "/v1/chat/completions", body, {"x-mock-fault": "no-usage"})
    chunks, done = chunks_of(datas)
    assert done and all("usage" not in ch for ch in chunks)


async def test_hang_until_client_gives_up(live: str, log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES}
    async with httpx.AsyncClient(base_url=live, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "hang"})
    [entry] = await wait_for_log(log_path, 1)
    assert entry["status"] == 499


async def test_client_disconnect_mid_stream(log_path: Path) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    with serve(MockSettings(tokens_per_second=200, log_path=str(log_path))) as url:
        async with (
            httpx.AsyncClient(base_url=url) as c,
            c.stream("POST", "/v1/chat/completions", json=body) as r,
        ):
            async for _ in r.aiter_raw():
                break  # leave after the first bytes
        [entry] = await wait_for_log(log_path, 1)
    assert entry["status"] == 499
    assert entry["completion_tokens"] < 2000


async def test_paced_stream_lower_bound(log_path: Path) -> None:
    # 20 tokens at 100 tokens/s take at least 0.2 s (lower bound only).
    body = {"model": "gpt-4o", "messages": MESSAGES, "max_tokens": 20, "stream": True}
    with serve(MockSettings(tokens_per_second=100, log_path=str(log_path))) as url:
        async with httpx.AsyncClient(base_url=url) as c:
            t0 = time.monotonic()
            _, done = chunks_of(await stream_events(c, "/v1/chat/completions", body))
            assert time.monotonic() - t0 >= 0.19
    assert done
