"""The proxy in front of a real llama-server, driven by the official openai client.

Each request is sent once directly and once through the proxy; the client must see the same
chunks (minus per-response fields such as ids and timings) and only the proxy's own headers
added, and the key must be charged what llama-server itself reports. llama's tokenizer is not
tiktoken's, so every prompt here is one where the proxy's estimate is wrong before settlement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import httpx
import openai
import pytest

from proxy.tokens import TokenCounter
from tests.llm.conftest import (
    KEYED_LLAMA_KEY,
    LlmProxy,
    ProxyKey,
    start_llm_proxy,
)

pytestmark = pytest.mark.llm

# Greedy decoding, and (llama.cpp extension) no prompt-cache reuse: each request evaluates its
# prompt from scratch, so the direct and the proxied request compute the very same logits.
SAMPLING: dict[str, Any] = {"temperature": 0, "seed": 7}
DETERMINISTIC = {"cache_prompt": False}
# Fields that differ between any two responses, however identical their content.
VOLATILE = frozenset({"id", "created", "system_fingerprint", "timings"})
# Headers a hop may change: connection management, framing, and each server's own name/date.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"}
)
DIMENSIONS = (("rpm", "requests"), ("input_tpm", "input-tokens"), ("output_tpm", "output-tokens"))
RATELIMIT_HEADERS = frozenset(
    f"x-ratelimit-{kind}-{dim}"
    for kind in ("limit", "remaining", "reset")
    for dim in ("requests", "input-tokens", "output-tokens", "tokens")
)

# Short answers with a natural stop, so output is settled below the reservation; digits and
# punctuation split differently in SmolLM2's tokenizer than in tiktoken's.
ARITHMETIC = [{"role": "user", "content": "What is 2+2? Answer with a number only."}]
CHAT_MAX_TOKENS = 16
COMPLETION_PROMPT = "In 1492, Columbus"
COMPLETION_MAX_TOKENS = 6
EMBEDDING_INPUT = "Tokenizers disagree about hyphenated-words and numbers like 1234567."

COUNTER = TokenCounter()  # the proxy's default encoding (cl100k_base): llama's model is unknown
PROBE_ATTEMPTS = 100  # bounded polls (each ~0.1 s apart) for asynchronous effects
IDLE_POLL_S = 0.1


# -- reading responses and usage -------------------------------------------------------------


def comparable(obj: Any) -> dict[str, Any]:
    """What the client received, minus the fields that legitimately differ per response."""
    return {k: v for k, v in obj.to_dict().items() if k not in VOLATILE}


def end_to_end(headers: httpx.Headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in HOP_HEADERS}


def assert_only_proxy_headers_added(
    direct: httpx.Headers, proxied: httpx.Headers, *, stream: bool
) -> None:
    """Every end-to-end header of llama's response arrives unchanged; the proxy adds only its
    x-ratelimit-* set and x-request-id (and, on streams, cache-control: no-cache)."""
    d, p = end_to_end(direct), end_to_end(proxied)
    assert {k: p.get(k) for k in d} == d
    added = p.keys() - d.keys()
    allowed = RATELIMIT_HEADERS | {"x-request-id"} | ({"cache-control"} if stream else set())
    assert added - allowed == set()
    assert added >= RATELIMIT_HEADERS
    assert p["x-request-id"]
    if stream:
        assert p["cache-control"] == "no-cache"


def used(headers: httpx.Headers, key: ProxyKey) -> tuple[int, int, int]:
    """(requests, input tokens, output tokens) counted in the key's window, from its headers."""
    out = []
    for dim, name in DIMENSIONS:
        limit = key.limits[dim]
        assert int(headers[f"x-ratelimit-limit-{name}"]) == limit
        remaining = int(headers[f"x-ratelimit-remaining-{name}"])
        assert 0 < remaining <= limit  # not clamped at zero: the difference is exact
        out.append(limit - remaining)
    return out[0], out[1], out[2]


def charged(client: openai.OpenAI, key: ProxyKey) -> tuple[int, int, int]:
    """The key's whole usage so far, read through the proxy with a GET /v1/models: a pass-
    through request costs exactly one request and no tokens, so its headers show the rest."""
    return used(client.models.with_raw_response.list().headers, key)


def read_stream(raw: Any) -> tuple[httpx.Headers, list[Any]]:
    return raw.headers, list(raw.parse())


def llama_slots(llama_server: str) -> list[dict[str, Any]]:
    return httpx.get(f"{llama_server}/slots", timeout=10).json()


def wait_until_idle(llama_server: str) -> list[dict[str, Any]]:
    """Poll llama-server's /slots (bounded) until no slot is processing; return the slots."""
    for _ in range(PROBE_ATTEMPTS * 3):
        slots = llama_slots(llama_server)
        if not any(s["is_processing"] for s in slots):
            return slots
        time.sleep(IDLE_POLL_S)
    raise AssertionError(f"llama-server still busy: {slots}")


def text_prefix_counts(deltas: Iterable[str], model: str, at_least: int) -> set[int]:
    """tiktoken counts of every prefix of the streamed text with at least `at_least` deltas."""
    counts = set()
    text = ""
    for i, delta in enumerate(deltas, 1):
        text += delta
        if i >= at_least:
            counts.add(COUNTER.count_text(text, model))
    return counts


@pytest.fixture
def model(llama_model_name: str) -> str:
    return llama_model_name


@pytest.fixture
def direct(llama_server: str) -> Iterable[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{llama_server}/v1", api_key="unused", max_retries=0, timeout=300
    ) as client:
        yield client


@pytest.fixture
def proxied(llm_proxy: LlmProxy, fresh_key: ProxyKey) -> Iterable[openai.OpenAI]:
    # max_retries=0: a 429 must reach the test, not be retried after retry-after-ms.
    with openai.OpenAI(
        base_url=f"{llm_proxy.url}/v1", api_key=fresh_key.secret, max_retries=0, timeout=300
    ) as client:
        yield client


# -- non-streaming ---------------------------------------------------------------------------


def test_chat_non_streaming(
    direct: openai.OpenAI, proxied: openai.OpenAI, fresh_key: ProxyKey, model: str
) -> None:
    req = dict(model=model, messages=ARITHMETIC, max_tokens=CHAT_MAX_TOKENS, **SAMPLING)
    d = direct.chat.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    p = proxied.chat.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    d_body, p_body = d.parse(), p.parse()

    assert comparable(p_body) == comparable(d_body)
    assert d_body.choices[0].finish_reason == "stop"
    assert_only_proxy_headers_added(d.headers, p.headers, stream=False)

    usage = d_body.usage
    estimate = COUNTER.count_chat(ARITHMETIC, model)
    assert estimate != usage.prompt_tokens  # llama's chat template and tokenizer differ
    assert usage.completion_tokens < CHAT_MAX_TOKENS  # output is settled below the reservation
    # A non-streaming response's headers are after settlement; the next request agrees.
    assert used(p.headers, fresh_key) == (1, usage.prompt_tokens, usage.completion_tokens)
    assert charged(proxied, fresh_key) == (2, usage.prompt_tokens, usage.completion_tokens)


def test_embeddings(
    direct: openai.OpenAI, proxied: openai.OpenAI, fresh_key: ProxyKey, model: str
) -> None:
    # The SDK asks for base64 and decodes it: the proxy passes the encoded vectors untouched.
    d = direct.embeddings.with_raw_response.create(model=model, input=EMBEDDING_INPUT)
    p = proxied.embeddings.with_raw_response.create(model=model, input=EMBEDDING_INPUT)
    d_body, p_body = d.parse(), p.parse()

    assert comparable(p_body) == comparable(d_body)
    assert len(p_body.data[0].embedding) > 100
    assert_only_proxy_headers_added(d.headers, p.headers, stream=False)

    prompt_tokens = d_body.usage.prompt_tokens
    assert COUNTER.count_embedding_input(EMBEDDING_INPUT, model) != prompt_tokens
    assert used(p.headers, fresh_key) == (1, prompt_tokens, 0)
    assert charged(proxied, fresh_key) == (2, prompt_tokens, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_upstream_error_passes_through_and_refunds(
    direct: openai.OpenAI,
    proxied: openai.OpenAI,
    fresh_key: ProxyKey,
    model: str,
    stream: bool,
) -> None:
    """A prompt over llama's per-slot context: llama answers 400 (as JSON, streamed or not)
    before generating; the client gets that answer unchanged and the key keeps no tokens."""
    req = dict(model=model, messages=[{"role": "user", "content": "word " * 1500}], max_tokens=4)
    if stream:
        req["stream"] = True
    errors = []
    for client in (direct, proxied):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**req)
        errors.append(info.value)
    d, p = errors
    assert p.body == d.body
    assert d.type == "exceed_context_size_error"
    assert_only_proxy_headers_added(d.response.headers, p.response.headers, stream=False)
    assert charged(proxied, fresh_key) == (2, 0, 0)


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
def test_chat_streaming(
    direct: openai.OpenAI,
    proxied: openai.OpenAI,
    fresh_key: ProxyKey,
    model: str,
    include_usage: bool,
) -> None:
    req: dict[str, Any] = dict(
        model=model, messages=ARITHMETIC, max_tokens=CHAT_MAX_TOKENS, stream=True, **SAMPLING
    )
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    d_headers, d_chunks = read_stream(
        direct.chat.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    )
    p_headers, p_chunks = read_stream(
        proxied.chat.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    )

    # Same chunks in the same order: roles, deltas, finish_reason and (if asked) usage.
    assert [comparable(c) for c in p_chunks] == [comparable(c) for c in d_chunks]
    assert [c for c in d_chunks if c.choices][-1].choices[0].finish_reason == "stop"
    assert_only_proxy_headers_added(d_headers, p_headers, stream=True)

    if include_usage:
        assert d_chunks[-1].choices == []
        usage = d_chunks[-1].usage
    else:
        # llama sends no usage unless asked: the one the proxy asked for on its own behalf
        # must not reach this client (the chunk equality above shows it did not).
        assert all(c.usage is None for c in d_chunks)
        usage = direct.chat.completions.create(
            **{k: v for k, v in req.items() if k != "stream"}, extra_body=DETERMINISTIC
        ).usage
    # The stream's headers are sent at admission: they hold the reservation (tiktoken's
    # estimate, max_tokens); the next request sees the settled charge, llama's own count.
    estimate = COUNTER.count_chat(ARITHMETIC, model)
    assert estimate != usage.prompt_tokens
    assert usage.completion_tokens < CHAT_MAX_TOKENS
    assert used(p_headers, fresh_key) == (1, estimate, CHAT_MAX_TOKENS)
    assert charged(proxied, fresh_key) == (2, usage.prompt_tokens, usage.completion_tokens)


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
def test_completions_streaming(
    direct: openai.OpenAI,
    proxied: openai.OpenAI,
    fresh_key: ProxyKey,
    model: str,
    include_usage: bool,
) -> None:
    req: dict[str, Any] = dict(
        model=model,
        prompt=COMPLETION_PROMPT,
        max_tokens=COMPLETION_MAX_TOKENS,
        stream=True,
        **SAMPLING,
    )
    if include_usage:
        req["stream_options"] = {"include_usage": True}
    d_headers, d_chunks = read_stream(
        direct.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    )
    p_headers, p_chunks = read_stream(
        proxied.completions.with_raw_response.create(**req, extra_body=DETERMINISTIC)
    )

    # llama's /v1/completions stream carries usage on its last chunk, which also has the
    # final choice, asked for or not: no usage-only chunk to strip, and the settlement
    # must come from this chunk.
    last = d_chunks[-1]
    assert last.choices and last.choices[0].finish_reason == "length"
    usage = last.usage
    assert usage is not None
    assert all(c.usage is None for c in d_chunks[:-1])

    d_seen = [comparable(c) for c in d_chunks]
    p_seen = [comparable(c) for c in p_chunks]
    # Asked for or not, the client sees this chunk with its usage, as llama sent it.
    assert p_seen == d_seen
    assert_only_proxy_headers_added(d_headers, p_headers, stream=True)

    estimate = COUNTER.count_prompt(COMPLETION_PROMPT, model)
    assert estimate != usage.prompt_tokens
    assert used(p_headers, fresh_key) == (1, estimate, COMPLETION_MAX_TOKENS)
    assert charged(proxied, fresh_key) == (2, usage.prompt_tokens, usage.completion_tokens)


def test_abandoned_stream(
    direct: openai.OpenAI,
    proxied: openai.OpenAI,
    fresh_key: ProxyKey,
    model: str,
    llama_server: str,
) -> None:
    """The client leaves after a few chunks: llama stops generating, and the key is charged
    the proxy's own count of what it forwarded, since no usage ever came."""
    max_tokens = 48  # long enough that llama is still generating when the client leaves
    messages = [{"role": "user", "content": "Tell me about whales."}]
    req: dict[str, Any] = dict(
        model=model, messages=messages, max_tokens=max_tokens, stream=True, **SAMPLING
    )
    extra = {**DETERMINISTIC, "ignore_eos": True}  # never stops early on its own
    full = list(
        direct.chat.completions.create(
            **req, stream_options={"include_usage": True}, extra_body=extra
        )
    )
    assert full[-1].usage.completion_tokens == max_tokens
    prompt_tokens = full[-1].usage.prompt_tokens
    content = [c.choices[0].delta.content for c in full if c.choices and c.choices[0].delta.content]
    wait_until_idle(llama_server)

    raw = proxied.chat.completions.with_raw_response.create(**req, extra_body=extra)
    stream = raw.parse()
    received = []
    texts = 0
    for chunk in stream:
        received.append(chunk)
        texts += bool(chunk.choices and chunk.choices[0].delta.content)
        if texts == 3:
            break
    stream.close()
    # What arrived before leaving is the start of what llama sends directly.
    assert [comparable(c) for c in received] == [comparable(c) for c in full[: len(received)]]

    # llama-server cancelled the generation: the slot is idle, and the tokens it held when
    # released (/slots reports them as n_prompt_tokens) fall short of a finished generation's
    # prompt + max_tokens - 1 (the last sampled token is never evaluated).
    slots = wait_until_idle(llama_server)
    last = max((s for s in slots if s.get("id_task") is not None), key=lambda s: s["id_task"])
    assert last["n_prompt_tokens"] < prompt_tokens + max_tokens - 1

    assert used(raw.headers, fresh_key)[2] == max_tokens  # reserved at admission
    # Settlement follows the disconnect asynchronously: poll (each probe costs one request).
    for _ in range(PROBE_ATTEMPTS):
        _, input_tokens, output_tokens = charged(proxied, fresh_key)
        if output_tokens != max_tokens:
            break
        time.sleep(IDLE_POLL_S)
    # The proxy's promise without usage: the input it counted itself, and the tiktoken count
    # of the text it forwarded: at least what the client read, never the whole reservation.
    assert input_tokens == COUNTER.count_chat(messages, model)
    assert 0 < output_tokens < max_tokens
    assert output_tokens in text_prefix_counts(content, model, at_least=texts)


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrent_streams_near_limit(
    llm_proxy: LlmProxy, llama_server: str, model: str
) -> None:
    """More concurrent streams than one key's output_tpm can reserve: exactly the ones that
    fit run, the rest get 429 output_tokens, and the charge is llama's reported usage."""
    key = llm_proxy.keys["tight"]
    max_tokens = 8
    admitted_max = key.limits["output_tpm"] // max_tokens
    subjects = ["cats", "the moon", "rivers and lakes", "a red bicycle", "winter in Oslo, 1905"]
    subjects = subjects[: admitted_max + 2]
    prompts = [[{"role": "user", "content": f"Write about {s}."}] for s in subjects]
    extra = {**DETERMINISTIC, "ignore_eos": True}  # exactly max_tokens each: no early refund

    async with openai.AsyncOpenAI(
        base_url=f"{llama_server}/v1", api_key="unused", max_retries=0, timeout=300
    ) as direct:
        # llama's own prompt counts, one by one (prompt_tokens do not depend on sampling).
        llama_prompt = [
            (
                await direct.chat.completions.create(
                    model=model, messages=m, max_tokens=1, extra_body=DETERMINISTIC
                )
            ).usage.prompt_tokens
            for m in prompts
        ]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int] | openai.RateLimitError:
        # Half of them ask for usage; the others rely on the proxy's own (stripped) request.
        include_usage = i % 2 == 0
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=prompts[i],
                max_tokens=max_tokens,
                stream=True,
                extra_body=extra,
                **options,
                **SAMPLING,
            )
        except openai.RateLimitError as exc:
            return exc
        chunks = [c async for c in stream]
        if include_usage:
            assert chunks[-1].usage is not None
            return chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens
        assert all(c.usage is None for c in chunks)
        return llama_prompt[i], max_tokens

    async with openai.AsyncOpenAI(
        base_url=f"{llm_proxy.url}/v1", api_key=key.secret, max_retries=0, timeout=300
    ) as client:
        results = await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
        probe = await client.models.with_raw_response.list()

    ok = {i: r for i, r in enumerate(results) if not isinstance(r, openai.RateLimitError)}
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(ok) == admitted_max
    assert len(refused) == len(prompts) - admitted_max
    for exc in refused:
        assert exc.status_code == 429
        assert exc.type == "output_tokens"
        assert exc.code == "rate_limit_exceeded"
        assert int(exc.response.headers["retry-after-ms"]) > 0
    for i, (prompt_tokens, completion_tokens) in ok.items():
        assert (prompt_tokens, completion_tokens) == (llama_prompt[i], max_tokens)
    # Refusals reserve nothing; each admitted stream is charged llama's count.
    assert used(probe.headers, key) == (
        admitted_max + 1,
        sum(llama_prompt[i] for i in ok),
        admitted_max * max_tokens,
    )
    assert sum(llama_prompt[i] for i in ok) != sum(
        COUNTER.count_chat(prompts[i], model) for i in ok
    )


# -- the upstream's key ----------------------------------------------------------------------


def test_upstream_key_replaces_client_key(
    keyed_llama_server: str, model: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """llama-server started with --api-key accepts the proxy's configured key only: the
    client's own key is replaced, never forwarded."""
    key = ProxyKey("keyed", "sk-llm-keyed-client-0123456789", {"rpm": 10})
    req = dict(model=model, messages=ARITHMETIC, max_tokens=2, **SAMPLING)
    with (
        openai.OpenAI(
            base_url=f"{keyed_llama_server}/v1", api_key=key.secret, max_retries=0, timeout=300
        ) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(**req)

    proc = start_llm_proxy(
        f"{keyed_llama_server}/v1", [key], tmp_path_factory.mktemp("keyed-proxy"), KEYED_LLAMA_KEY
    )
    try:
        with openai.OpenAI(
            base_url=f"{proc.url}/v1", api_key=key.secret, max_retries=0, timeout=300
        ) as client:
            resp = client.chat.completions.create(**req)
    finally:
        proc.stop()
    assert resp.usage.completion_tokens == 2
