"""Forwarding to an upstream with httpx: header hygiene, the upstream's own key, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl, urlencode

import httpx

from .asgi_transport import StreamingASGITransport
from .config import HttpUpstream, MockUpstream
from .errors import InvalidRequest, UpstreamTimeout, UpstreamUnreachable
from .http11 import LeanTransport

# Never forwarded: hop-by-hop headers (RFC 9110 7.6.1), framing the proxy recomputes, and every
# header that may carry the client's own credentials.
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"authorization",
        b"api-key",
        b"x-api-key",
        b"cookie",
        b"expect",
        b"x-forwarded-for",
        b"forwarded",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-encoding",
        "date",
        "server",
    }
)


REDACTED = b"[redacted]"


def request_headers(
    raw: Iterable[tuple[bytes, bytes]], api_key: str | None, secret: bytes | None = None
) -> list:
    """``secret``: the client's own key; a header carrying it, under any name, is dropped."""
    out = [(k, v) for k, v in raw if k.lower() not in _DROP_REQUEST]
    if secret:
        out = [(k, v) for k, v in out if secret not in v]
    if api_key:
        out.append((b"authorization", b"Bearer " + api_key.encode()))
    return out


def query_without(query: bytes, secret: str) -> bytes:
    """``query`` minus every parameter whose name or value (decoded) carries ``secret``, e.g.
    ``?api_key=<client key>``: what a client sends to the proxy must not reach the upstream."""
    if not query or (secret.encode() not in query and b"%" not in query):
        return query
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if secret not in k and secret not in v]
    return query if len(kept) == len(pairs) else urlencode(kept).encode()


def response_headers(headers: httpx.Headers, status: int = 200) -> dict[str, str]:
    """The upstream's headers for the client, minus framing and the upstream's own rate limits.

    Its retry hint is kept only when the upstream itself refused (429 / 503): then it is the
    one the client must wait for."""
    keep_retry = status in (429, 503)
    out: dict[str, str] = {}
    for k, v in headers.multi_items():
        lk = k.lower()
        if lk in _DROP_RESPONSE or lk.startswith("x-ratelimit-"):
            continue
        if lk in ("retry-after", "retry-after-ms") and not keep_retry:
            continue
        if lk == "x-request-id":
            # The proxy's own request id takes this name; the upstream's keeps its value.
            lk = "x-upstream-request-id"
        out[lk] = v
    return out


class Upstream:
    """One configured upstream: an httpx client and its own key."""

    def __init__(self, name: str, cfg: MockUpstream | HttpUpstream) -> None:
        self.name = name
        self.stream_usage = cfg.stream_usage
        # Non-streaming answers are read whole (usage sits at their end): bound what one costs.
        self.max_response_bytes = cfg.max_response_bytes
        if isinstance(cfg, MockUpstream):
            from .mock import MockSettings, create_mock_app

            app = create_mock_app(
                MockSettings(
                    latency_ms=cfg.latency_ms,
                    tokens_per_second=cfg.tokens_per_second,
                    chunk_tokens=cfg.chunk_tokens,
                )
            )
            self.api_key: str | None = None
            self.base_url = "http://mock.internal/v1"
            transport: httpx.AsyncBaseTransport = StreamingASGITransport(app)
            self.client = httpx.AsyncClient(
                transport=transport, base_url=self.base_url, timeout=None
            )
        else:
            self.api_key = cfg.api_key
            self.base_url = cfg.base_url.rstrip("/")
            limits = httpx.Limits(
                max_connections=cfg.max_connections,
                max_keepalive_connections=cfg.max_connections,
            )
            # httpx's pool with lean HTTP/1.1 connections (proxy/http11.py): the stock ones
            # cost the node more CPU per request than everything else together.
            transport = LeanTransport(limits=limits, trust_env=False)
            self.client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
                transport=transport,
                follow_redirects=False,
                trust_env=False,
            )
        # The hot path builds requests and hands them to the transport itself: the client's
        # merging, auth and redirect machinery and cookie jar are not used by a proxy (a
        # cookie jar would even replay one client's upstream cookies to every other client).
        # The client still owns the transport (aclose) and says whether it is closed.
        self._transport = transport
        self._timeout = self.client.timeout.as_dict()
        self._defaults = [(k.lower(), v) for k, v in self.client.headers.raw]
        self._urls: dict[tuple[str, bytes], httpx.URL] = {}
        self._key = self.api_key.encode() if self.api_key else None

    def build(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        secret: str | None = None,
    ) -> httpx.Request:
        """``secret``: the client's key, removed from every header and query parameter."""
        if secret:
            query = query_without(query, secret)
        url = self._urls.get((path, query))
        if url is None:
            try:
                # No query: no "?" either (``query=b""`` would send a bare "?").
                url = (
                    httpx.URL(self.base_url + path, query=query)
                    if query
                    else httpx.URL(self.base_url + path)
                )
            except (httpx.InvalidURL, UnicodeError):
                raise InvalidRequest("Invalid request path or query string.") from None
            if len(self._urls) < 256:  # the few API paths; not every passthrough URL
                self._urls[(path, query)] = url
        out = request_headers(headers, self.api_key, secret.encode() if secret else None)
        names = {k.lower() for k, _ in out}
        # httpx's default headers where the client sent none (user-agent, accept ...).
        out.extend(kv for kv in self._defaults if kv[0] not in names)
        # Host and Content-Length written here: with ``stream=`` httpx adds no headers of its
        # own and builds its header list once (``content=`` builds it twice).
        out.append((b"host", url.netloc))
        out.append((b"content-length", b"%d" % len(body)))
        return httpx.Request(
            method,
            url,
            headers=out,
            stream=httpx.ByteStream(body),
            extensions={"timeout": self._timeout},
        )

    @asynccontextmanager
    async def errors(self) -> AsyncIterator[None]:
        """Translate transport failures into the proxy's errors, at this one boundary."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"The upstream {self.name!r} did not answer in time.") from exc
        except (httpx.TransportError, OSError) as exc:
            raise UpstreamUnreachable(
                f"The upstream {self.name!r} could not be reached or closed the connection."
            ) from exc

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send and return once headers arrived; the caller reads and closes the body."""
        if self.client.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        async with self.errors():
            response = await self._transport.handle_async_request(request)
        response.request = request
        key = self._key
        if key is not None and any(key in v for _, v in response.headers.raw):
            # An upstream that echoes its request headers must not hand the client its key.
            response.headers = httpx.Headers(
                [(k, v.replace(key, REDACTED)) for k, v in response.headers.raw]
            )
        return response

    def redact(self, data: bytes) -> bytes:
        """``data`` without the upstream's key (for error bodies, which may echo requests)."""
        key = self._key
        return data.replace(key, REDACTED) if key is not None and key in data else data

    async def read(self, response: httpx.Response) -> bytes:
        """The whole body: straight from the transport unless it needs decoding."""
        limit = self.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        async with self.errors():
            if "content-encoding" in response.headers:
                source = response.aiter_bytes()
            else:
                source = response.stream  # type: ignore[assignment]
            async for chunk in source:  # type: ignore[union-attr]
                size += len(chunk)
                if size > limit:
                    raise UpstreamUnreachable(
                        f"The upstream {self.name!r} sent a response larger than {limit} bytes."
                    )
                chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        await self.client.aclose()
