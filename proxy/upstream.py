"""Forwarding to an upstream with httpx: header hygiene, the upstream's own key, error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx

from .asgi_transport import StreamingASGITransport
from .config import HttpUpstream, MockUpstream
from .errors import UpstreamTimeout, UpstreamUnreachable

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


def request_headers(raw: Iterable[tuple[bytes, bytes]], api_key: str | None) -> list:
    out = [(k, v) for k, v in raw if k.lower() not in _DROP_REQUEST]
    if api_key:
        out.append((b"authorization", b"Bearer " + api_key.encode()))
    return out


def response_headers(headers: httpx.Headers) -> dict[str, str]:
    """The upstream's headers for the client, minus framing and the upstream's own rate limits."""
    out: dict[str, str] = {}
    for k, v in headers.multi_items():
        lk = k.lower()
        if lk in _DROP_RESPONSE or lk.startswith("x-ratelimit-") or lk == "retry-after":
            continue
        out[lk] = v
    return out


class Upstream:
    """One configured upstream: an httpx client and its own key."""

    def __init__(self, name: str, cfg: MockUpstream | HttpUpstream) -> None:
        self.name = name
        self.stream_usage = cfg.stream_usage
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
            self.client = httpx.AsyncClient(
                transport=StreamingASGITransport(app), base_url=self.base_url, timeout=None
            )
        else:
            self.api_key = cfg.api_key
            self.base_url = cfg.base_url.rstrip("/")
            self.client = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=cfg.max_connections,
                    max_keepalive_connections=cfg.max_connections,
                ),
                follow_redirects=False,
                trust_env=False,
            )

    def build(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
    ) -> httpx.Request:
        url = httpx.URL(self.base_url + path, query=query)
        return self.client.build_request(
            method, url, headers=request_headers(headers, self.api_key), content=body
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
        async with self.errors():
            return await self.client.send(request, stream=True)

    async def aclose(self) -> None:
        await self.client.aclose()
