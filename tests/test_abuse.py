"""Malformed and hostile requests, sent as raw bytes to a real proxy process: each gets its 4xx
(OpenAI-shaped, or the HTTP server's own 400 for what is not HTTP at all), never a 5xx, and
leaves no reservation behind unless it legitimately counts as a request."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.procs import Proc, start_mock, start_proxy, write_config
from tests.rawnet import RawResponse, RawUpstream, raw_request

pytestmark = pytest.mark.timeout(120)

KEY = "sk-abuse-client-key-0123456789"
ADMIN_TOKEN = "adm-abuse-token-0123456789"
MAX_BODY = 1024 * 1024
LIMITS = {"rpm": 100_000, "input_tpm": 50_000, "output_tpm": 50_000}
PARSER = "parser"  # refused by the HTTP server before the app: its own plain-text 400
OPENAI = "openai"
_DELETE = object()


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    status: int
    shape: str = OPENAI
    param: str | None = None  # the error's param, when the field is named
    counts: bool = False  # reaches the limiter and the upstream: one request is counted
    target: str | None = None  # for passthroughs: the request target the upstream must see


# -- request builders ----------------------------------------------------------------------------
def raw(
    method: str,
    target: bytes | str,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    *,
    auth: bool = True,
    ctype: bool = True,
    length: bool = True,
) -> bytes:
    t = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + t + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    if auth:
        lines.append(b"Authorization: Bearer " + KEY.encode())
    if ctype and body:
        lines.append(b"Content-Type: application/json")
    if length and body:
        lines.append(b"Content-Length: %d" % len(body))
    lines += [k + b": " + v for k, v in headers or []]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chat_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 5,
    }
    for k, v in fields.items():
        if v is _DELETE:
            body.pop(k, None)
        else:
            body[k] = v
    return orjson.dumps(body)


def message(**fields: Any) -> bytes:
    return chat_body(messages=[{"role": "user", "content": "Hello", **fields}])


def chat(body: bytes, **kw: Any) -> bytes:
    return raw("POST", "/v1/chat/completions", body=body, **kw)


def completion(**fields: Any) -> bytes:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "Hello", "max_tokens": 5, **fields}
    body = {k: v for k, v in body.items() if v is not _DELETE}
    return raw("POST", "/v1/completions", body=orjson.dumps(body))


def embedding(**fields: Any) -> bytes:
    body = {"model": "text-embedding-3-small", "input": "Hello", **fields}
    body = {k: v for k, v in body.items() if v is not _DELETE}
    return raw("POST", "/v1/embeddings", body=orjson.dumps(body))


def get(target: bytes | str, headers: list[tuple[bytes, bytes]] | None = None, **kw) -> bytes:
    return raw("GET", target, headers, **kw)


def deep(n: int) -> str:
    return "[" * n + "]" * n


def with_raw_field(name: str, value: str, **extra: Any) -> bytes:
    """A chat body with one field's JSON text spliced in as is."""
    body = chat_body(**extra)
    return body[:-1] + f',"{name}":{value}}}'.encode()


def chunked(body: bytes, size: int = 65536) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


BIG = b"x" * (MAX_BODY + 1000)
HUGE_PROMPT = "lorem " * 150_000  # ~150 000 tokens > input_tpm: can never fit

# -- the table -----------------------------------------------------------------------------------
CASES: list[Case] = [
    # The body is not a JSON object.
    Case("broken JSON", chat(b"{not json"), 400),
    Case("empty body", chat(b"", length=False), 400),
    Case("JSON array", chat(b"[1, 2]"), 400),
    Case("JSON string", chat(b'"hello"'), 400),
    Case("JSON null", chat(b"null"), 400),
    Case("100 000 nested arrays", chat(deep(100_000).encode()), 400),
    Case("NaN literal", chat(b'{"model": NaN}'), 400),
    Case("invalid UTF-8 in a string", chat(b'{"model": "gpt\xff\xfe", "messages": []}'), 400),
    Case("UTF-8 BOM before the JSON", chat(b"\xef\xbb\xbf" + chat_body()), 400),
    Case("UTF-16 body", chat(chat_body().decode().encode("utf-16")), 400),
    Case("lone surrogate escape", chat(b'{"model": "\\ud800", "messages": []}'), 400),
    Case(
        "gzip body (content-encoding is not decoded)",
        chat(gzip.compress(chat_body()), headers=[(b"Content-Encoding", b"gzip")]),
        400,
    ),
    Case("form body, no content type", chat(b"model=gpt-4o-mini&x=1", ctype=False), 400),
    Case("JSON without a content type is read", chat(chat_body(), ctype=False), 200, counts=True),
    # Nesting the parser accepts but the proxy cannot re-serialise (stream: usage injected).
    Case(
        "300 levels in an unread field",
        chat(with_raw_field("x", deep(300))),
        200,
        counts=True,
    ),
    Case(
        "300 levels in an unread field, stream",
        chat(with_raw_field("x", deep(300), stream=True)),
        400,
    ),
    Case("300 levels in tools", chat(with_raw_field("tools", deep(300))), 400),
    # Size and framing.
    Case("body over max_body_bytes", chat(BIG), 413),
    Case(
        "chunked body over max_body_bytes",
        chat(chunked(BIG), headers=[(b"Transfer-Encoding", b"chunked")], length=False),
        413,
    ),
    Case(
        "declared length over the limit, nothing sent",
        chat(b"", headers=[(b"Content-Length", b"5000000")]),
        413,
    ),
    Case(
        "Content-Length of 30 digits",
        chat(b"", headers=[(b"Content-Length", b"9" * 30)]),
        400,
        PARSER,
    ),
    Case(
        "two different Content-Length",
        chat(chat_body(), headers=[(b"Content-Length", b"3")]),
        400,
        PARSER,
    ),
    Case(
        "Content-Length and chunked",
        chat(chat_body(), headers=[(b"Transfer-Encoding", b"chunked")]),
        400,
        PARSER,
    ),
    Case(
        "unknown transfer coding",
        chat(chat_body(), headers=[(b"Transfer-Encoding", b"gzip")], length=False),
        400,
        PARSER,
    ),
    Case(
        "huge prompt that can never fit",
        chat(chat_body(messages=[{"role": "user", "content": HUGE_PROMPT}])),
        429,
    ),
    Case("50 KB model name", chat(chat_body(model="m" * 50_000)), 200, counts=True),
    # Wrong types in every field the proxy reads.
    Case("model: number", chat(chat_body(model=5)), 400, param="model"),
    Case("model: null", chat(chat_body(model=None)), 400, param="model"),
    Case("model: empty", chat(chat_body(model="")), 400, param="model"),
    Case("model: array", chat(chat_body(model=["gpt-4o"])), 400, param="model"),
    Case("model: missing", chat(chat_body(model=_DELETE)), 400, param="model"),
    Case("messages: missing", chat(chat_body(messages=_DELETE)), 400, param="messages"),
    Case("messages: object", chat(chat_body(messages={"role": "user"})), 400, param="messages"),
    Case("messages: string", chat(chat_body(messages="hi")), 400, param="messages"),
    Case("messages: empty", chat(chat_body(messages=[])), 400, param="messages"),
    Case("messages[0]: null", chat(chat_body(messages=[None])), 400, param="messages[0]"),
    Case("role: number", chat(message(role=1)), 400, param="messages[0].role"),
    Case("content: number", chat(message(content=5)), 400, param="messages[0].content"),
    Case("content: object", chat(message(content={"a": 1})), 400, param="messages[0].content"),
    Case("content part: number", chat(message(content=[1])), 400, param="messages[0].content[0]"),
    Case(
        "text part: text is a number",
        chat(message(content=[{"type": "text", "text": 5}])),
        400,
        param="messages[0].content[0]",
    ),
    Case(
        "text part: no text",
        chat(message(content=[{"type": "text"}])),
        400,
        param="messages[0].content[0]",
    ),
    Case("name: number", chat(message(name=7)), 400, param="messages[0].name"),
    Case("max_tokens: negative", chat(chat_body(max_tokens=-1)), 400, param="max_tokens"),
    Case("max_tokens: zero", chat(chat_body(max_tokens=0)), 400, param="max_tokens"),
    Case("max_tokens: float", chat(chat_body(max_tokens=1.5)), 400, param="max_tokens"),
    Case("max_tokens: string", chat(chat_body(max_tokens="9")), 400, param="max_tokens"),
    Case("max_tokens: boolean", chat(chat_body(max_tokens=True)), 400, param="max_tokens"),
    Case("max_tokens: 1e30", chat(with_raw_field("max_tokens", "1e30")), 400, param="max_tokens"),
    Case(
        "max_tokens: 2**64",
        chat(with_raw_field("max_tokens", str(2**64))),
        400,
        param="max_tokens",
    ),
    Case("max_tokens: 10**7 + 1", chat(chat_body(max_tokens=10**7 + 1)), 400, param="max_tokens"),
    Case("max_tokens above output_tpm", chat(chat_body(max_tokens=60_000)), 429),
    Case(
        "max_completion_tokens: negative",
        chat(chat_body(max_completion_tokens=-5)),
        400,
        param="max_completion_tokens",
    ),
    Case(
        "max_completion_tokens: string",
        chat(chat_body(max_completion_tokens="x")),
        400,
        param="max_completion_tokens",
    ),
    Case("n: 0", chat(chat_body(n=0)), 400, param="n"),
    Case("n: 10**6", chat(chat_body(n=10**6)), 400, param="n"),
    Case("n: string", chat(chat_body(n="2")), 400, param="n"),
    Case("n: float", chat(with_raw_field("n", "1.0", max_tokens=5)), 400, param="n"),
    Case("n: boolean", chat(chat_body(n=True)), 400, param="n"),
    Case("n x max_tokens above output_tpm", chat(chat_body(n=100, max_tokens=1000)), 429),
    Case("stream: string", chat(chat_body(stream="yes")), 400, param="stream"),
    Case("stream: number", chat(chat_body(stream=1)), 400, param="stream"),
    Case(
        "stream_options: string",
        chat(chat_body(stream=True, stream_options="x")),
        400,
        param="stream_options",
    ),
    Case(
        "stream_options.include_usage: string",
        chat(chat_body(stream=True, stream_options={"include_usage": "yes"})),
        400,
        param="stream_options.include_usage",
    ),
    Case("prompt: missing", completion(prompt=_DELETE), 400, param="prompt"),
    Case("prompt: number", completion(prompt=5), 400, param="prompt"),
    Case("prompt: empty array", completion(prompt=[]), 400, param="prompt"),
    Case("prompt: floats", completion(prompt=[1.5]), 400, param="prompt"),
    Case("prompt: empty token array", completion(prompt=[[]]), 400, param="prompt"),
    Case("prompt: booleans", completion(prompt=[True]), 400, param="prompt"),
    Case("prompt: negative token", completion(prompt=[-1]), 400, param="prompt"),
    Case("prompt: mixed array", completion(prompt=["a", 1]), 400, param="prompt"),
    Case("best_of: 0", completion(best_of=0), 400, param="best_of"),
    Case("best_of: string", completion(best_of="3"), 400, param="best_of"),
    Case("best_of: 1000", completion(best_of=1000), 400, param="best_of"),
    Case("input: missing", embedding(input=_DELETE), 400, param="input"),
    Case("input: null", embedding(input=None), 400, param="input"),
    Case("input: number", embedding(input=5), 400, param="input"),
    Case("input: mixed token array", embedding(input=[[1, "a"]]), 400, param="input"),
    # Credentials and headers.
    Case(
        "two Authorization headers",
        get("/v1/models", [(b"Authorization", b"Bearer sk-someone-else")]),
        401,
    ),
    Case(
        "the same Authorization header twice",
        get("/v1/models", [(b"Authorization", b"Bearer " + KEY.encode())]),
        401,
    ),
    Case(
        "Bearer without a key", get("/v1/models", [(b"Authorization", b"Bearer")], auth=False), 401
    ),
    Case(
        "Basic scheme",
        get("/v1/models", [(b"Authorization", b"Basic c2stYWJ1c2U6")], auth=False),
        401,
    ),
    Case(
        "key in x-api-key only", get("/v1/models", [(b"x-api-key", KEY.encode())], auth=False), 401
    ),
    Case("key in the query only", get(f"/v1/models?api_key={KEY}", auth=False), 401),
    Case("obs-fold header line", get("/v1/models", [(b"X-A", b"a\r\n b")]), 400, PARSER),
    Case("NUL in a header value", get("/v1/models", [(b"X-A", b"a\x00b")]), 400, PARSER),
    Case("CR in a header value", get("/v1/models", [(b"X-A", b"a\rX-B: b")]), 400, PARSER),
    Case("DEL in a header value", get("/v1/models", [(b"X-A", b"a\x7fb")]), 400, PARSER),
    Case("space in a header name", get("/v1/models", [(b"X A", b"b")]), 400, PARSER),
    Case("bare LF in a header line", get("/v1/models", [(b"X-A", b"a\nX-B: 1")]), 400, PARSER),
    Case(
        "Host of another site is not where it goes",
        get("/v1/models", [(b"Host", b"evil.example")]),
        200,
        counts=True,
        target="/v1/models",
    ),
    Case(
        "absolute-form target naming another host",
        get("http://evil.example/v1/models"),
        200,
        counts=True,
        target="/v1/models",
    ),
    Case("CONNECT", raw("CONNECT", "evil.example:443"), 400, PARSER),
    Case("TRACE", raw("TRACE", "/v1/models"), 405),
    Case("garbage request line", b"GARBAGE\r\n\r\n", 400, PARSER),
    Case("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, PARSER),
    # Passthrough paths that try to leave /v1 or mean something else upstream.
    Case("/v1/../admin", get("/v1/../admin"), 400),
    Case("%2e%2e", get("/v1/%2e%2e/admin"), 400),
    Case("%2E%2e%2f", get("/v1/%2E%2e%2fadmin"), 400),
    Case("..%2f..%2f", get("/v1/..%2f..%2fadmin"), 400),
    Case("..%5c (backslash)", get("/v1/..%5c..%5cadmin"), 400),
    Case("raw backslashes", get(b"/v1/models\\..\\admin"), 400),
    Case("//host", get("/v1//evil.example/x"), 400),
    Case("%2f%2fhost", get("/v1/%2f%2fevil.example/x"), 400),
    Case("absolute URL in the path", get("/v1/http://evil.example/x"), 400),
    Case("NUL in the path", get("/v1/x%00"), 400),
    Case("DEL in the path", get("/v1/x%7f"), 400),
    Case("tab in the path", get("/v1/x%09y"), 400),
    Case("CR LF in the path", get("/v1/x%0d%0aX-Injected:%201"), 404),
    Case("encoded v1", get("/%76%31/models"), 400),
    Case("raw non-ASCII in the path", get("/v1/\xc3\xa9".encode("latin-1")), 400, PARSER),
    Case("100 KB path", get("/v1/" + "a" * 100_000), 400, PARSER),
    Case("/V1 (case)", get("/V1/models"), 404),
    Case(
        "@host stays a path on the upstream",
        get("/v1/@evil.example/x"),
        404,
        counts=True,
        target="/v1/@evil.example/x",
    ),
    Case(
        "double-encoded dots are forwarded as sent",
        get("/v1/%252e%252e/admin"),
        404,
        counts=True,
        target="/v1/%252e%252e/admin",
    ),
    Case(
        "encoded ? stays in the path",
        get("/v1/models%3Fa=1"),
        404,
        counts=True,
        target="/v1/models%3Fa=1",
    ),
    Case(
        "the client key in the query is not forwarded",
        get(f"/v1/models?api_key={KEY}&limit=2"),
        200,
        counts=True,
        target="/v1/models?limit=2",
    ),
]


# -- the stack -----------------------------------------------------------------------------------
@dataclass
class Stack:
    proxy: Proc
    raw: RawUpstream

    def usage(self) -> tuple[int, int, int]:
        r = httpx.get(
            self.proxy.url + "/admin/keys/abuse",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=5,
        )
        u = r.json()["usage"]
        return (u["requests"], u["input_tokens"], u["output_tokens"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("abuse")
    with RawUpstream() as upstream:
        mock = start_mock()
        cfg = {
            "backend": {"type": "memory"},
            "upstreams": {
                # Passthroughs go to the recording raw upstream, the API endpoints to the mock.
                "raw": {"type": "http", "base_url": upstream.url + "/v1", "timeout_s": 5},
                "mock": {"type": "http", "base_url": mock.url + "/v1", "timeout_s": 5},
            },
            "default_upstream": "raw",
            "routes": {"*": "mock"},
            "max_body_bytes": MAX_BODY,
            "window_s": 600,
            "admin": {"token_env": "ABUSE_ADMIN"},
            "keys": [{"name": "abuse", "key": KEY, "limits": LIMITS}],
        }
        proxy = start_proxy(write_config(cfg, tmp), env={"ABUSE_ADMIN": ADMIN_TOKEN})
        try:
            yield Stack(proxy, upstream)
        finally:
            proxy.stop()
            mock.stop()


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(stack: Stack, case: Case) -> None:
    before_usage, before_seen = stack.usage(), len(stack.raw.seen)
    r: RawResponse = raw_request(stack.proxy.port, case.request)
    assert r.status < 500
    assert r.status == case.status, r.body[:300]
    if case.shape == OPENAI and r.status >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == case.param
        assert KEY not in r.body.decode("latin-1")
    elif case.shape == PARSER:
        assert b"Traceback" not in r.body
    after = stack.usage()
    delta = tuple(a - b for a, b in zip(after, before_usage, strict=True))
    if not case.counts:
        assert delta == (0, 0, 0)  # nothing reserved, nothing left behind
        assert len(stack.raw.seen) == before_seen  # and nothing reached an upstream
        return
    assert delta[0] == 1
    if r.status == 200 and case.target is None:  # a completion: charged its real usage
        u = r.json()["usage"]
        assert delta[1:] == (u["prompt_tokens"], u["completion_tokens"])
    else:
        assert delta[1:] == (0, 0)
    if case.target is not None:
        seen = stack.raw.seen[before_seen:]
        assert [s.target for s in seen] == [case.target]
        up = seen[0]
        assert up.header("host") == f"127.0.0.1:{stack.raw.port}"
        for _, value in up.headers:
            assert "\r" not in value and "\n" not in value and KEY not in value
        assert KEY not in up.raw.decode("latin-1")


def test_the_node_is_fine_after_the_table(stack: Stack) -> None:
    assert httpx.get(stack.proxy.url + "/healthz", timeout=5).status_code == 200
    r = httpx.post(
        stack.proxy.url + "/v1/chat/completions",
        content=chat_body(),
        headers={"authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert r.status_code == 200
    out = stack.proxy.output()
    assert "Traceback" not in out and "unexpected error" not in out
