"""The node: builds the Starlette app from a parsed config; the only place parts are wired."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .backends import build_backend
from .backends.base import Backend, BackendUnavailable
from .config import Config
from .errors import (
    InvalidRequest,
    LimiterUnavailable,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    Unauthorized,
    UpstreamUnreachable,
)
from .limiter import Admission, KeyPolicy, Limiter, build_policies
from .payload import CHAT, COMPLETIONS, EMBEDDINGS, parse_json, parse_request
from .payload import Request as Payload
from .streaming import StreamOutcome, StreamRelay
from .tokens import LARGE_TEXT_CHARS, TokenCounter
from .upstream import Upstream, response_headers

log = logging.getLogger("proxy")

_LIMITED = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS,
}


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One configuration in force; a request reads it once and keeps it to the end."""

    config: Config
    policies: dict[str, KeyPolicy]
    upstreams: dict[str, Upstream]
    counter: TokenCounter

    def upstream_for(self, model: str | None) -> Upstream:
        return self.upstreams[self.config.upstream_for(model)]


def build_snapshot(cfg: Config, previous: Snapshot | None = None) -> Snapshot:
    upstreams = {}
    for name, ucfg in cfg.upstreams.items():
        old = previous.upstreams.get(name) if previous else None
        # Keep an unchanged upstream's client, so a reload does not drop its connections.
        if old is not None and previous is not None and previous.config.upstreams[name] == ucfg:
            upstreams[name] = old
        else:
            upstreams[name] = Upstream(name, ucfg)
    return Snapshot(cfg, build_policies(cfg), upstreams, TokenCounter(cfg.default_encoding))


class Node:
    """Everything one node holds: the current snapshot, the backend and the limiter."""

    def __init__(self, cfg: Config, backend: Backend | None = None) -> None:
        self.snapshot = build_snapshot(cfg)
        self.backend = backend if backend is not None else build_backend(cfg.backend)
        self.limiter = Limiter(self.backend)
        self._retired: list[Upstream] = []

    # -- pieces of the request path ---------------------------------------------------------

    def authenticate(self, snap: Snapshot, request: Request) -> KeyPolicy:
        auth = request.headers.get("authorization")
        if not auth:
            raise Unauthorized(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("The Authorization header must be 'Bearer <your API key>'.")
        # Looked up by digest: the dictionary never sees (or compares) the key itself.
        policy = snap.policies.get(hashlib.sha256(token.encode()).hexdigest())
        if policy is None:
            raise Unauthorized("Incorrect API key provided.")
        return policy

    async def read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest("Invalid Content-Length header.")
            if int(declared) > limit:
                raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
                chunks.append(chunk)
        except ClientDisconnect:
            raise InvalidRequest("The client disconnected before sending the whole body.") from None
        return b"".join(chunks)

    async def count_input(self, snap: Snapshot, p: Payload, body_size: int) -> int:
        counter = snap.counter
        body = p.body
        if p.endpoint == CHAT:
            fn, args = counter.count_chat, (body["messages"], p.model, body.get("tools"))
        elif p.endpoint == COMPLETIONS:
            fn, args = counter.count_prompt, (body["prompt"], p.model)
        else:
            fn, args = counter.count_embedding_input, (body["input"], p.model)
        try:
            if body_size > LARGE_TEXT_CHARS:
                # tiktoken releases the GIL: a big prompt is counted on a worker thread so
                # the event loop keeps serving other requests meanwhile.
                return await anyio.to_thread.run_sync(fn, *args)
            return fn(*args)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"Could not read the prompt: {exc}") from None

    async def admit(
        self, policy: KeyPolicy, model: str | None, input_tokens: int, output_tokens: int
    ) -> Admission:
        try:
            return await self.limiter.admit(policy, model, input_tokens, output_tokens)
        except BackendUnavailable as exc:
            raise LimiterUnavailable(
                "The rate limiter's storage is unavailable; the request was not admitted."
            ) from exc

    async def settle(self, admission: Admission, actual: tuple[int, int, int]) -> None:
        try:
            await self.limiter.settle(admission, actual)
        except BackendUnavailable:
            log.warning("could not reconcile a reservation: backend unavailable")

    # -- endpoints ------------------------------------------------------------------------

    async def limited(self, request: Request) -> Response:
        snap = self.snapshot
        endpoint = _LIMITED[request.url.path]
        policy = self.authenticate(snap, request)
        raw = await self.read_body(request, snap.config.max_body_bytes)
        p = parse_request(endpoint, parse_json(raw), snap.config.output_reservation_default)
        input_tokens = await self.count_input(snap, p, len(raw))
        upstream = snap.upstream_for(p.model)
        strip_usage = p.stream and not p.include_usage and upstream.stream_usage
        if strip_usage:
            opts = dict(p.body.get("stream_options") or {})
            opts["include_usage"] = True
            raw = orjson.dumps({**p.body, "stream_options": opts})
        admission = await self.admit(policy, p.model, input_tokens, p.output_reservation)
        try:
            req = upstream.build(
                "POST", request.url.path[3:], request.url.query.encode(), request.headers.raw, raw
            )
            resp = await upstream.send(req)
        except BaseException:
            await self.settle(admission, (1, 0, 0))
            raise
        if p.stream and resp.status_code == 200 and _is_sse(resp):
            return self._relay(snap, p, admission, input_tokens, resp, strip_usage)
        return await self._complete(snap, p, admission, input_tokens, upstream, resp)

    async def _complete(
        self,
        snap: Snapshot,
        p: Payload,
        admission: Admission,
        input_tokens: int,
        upstream: Upstream,
        resp: httpx.Response,
    ) -> Response:
        actual: tuple[int, int, int] = (1, 0, 0)
        try:
            async with upstream.errors():
                content = await resp.aread()
            if resp.status_code < 400:
                actual = _usage_of_body(content, snap.counter, p, input_tokens)
        finally:
            await resp.aclose()
            await self.settle(admission, actual)
        headers = response_headers(resp.headers)
        headers.update(admission.headers())
        return Response(content, resp.status_code, headers)

    def _relay(
        self,
        snap: Snapshot,
        p: Payload,
        admission: Admission,
        input_tokens: int,
        resp: httpx.Response,
        strip_usage: bool,
    ) -> StreamRelay:
        async def settle(outcome: StreamOutcome) -> None:
            if outcome.usage is not None:
                actual = (1, outcome.usage[0], outcome.usage[1])
            else:
                # No usage came (client gone, upstream cut, or usage unsupported): charge what
                # was actually streamed, counted from the forwarded deltas.
                out = snap.counter.count_text(outcome.output_text, p.model)
                actual = (1, input_tokens, out)
            await self.settle(admission, actual)

        headers = response_headers(resp.headers)
        headers.update(admission.headers())
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return StreamRelay(resp, headers, settle, strip_usage)

    async def passthrough(self, request: Request) -> Response:
        """Other /v1/* paths: authenticated, counted as one request, forwarded as they are."""
        snap = self.snapshot
        _check_path(request)
        policy = self.authenticate(snap, request)
        raw = await self.read_body(request, snap.config.max_body_bytes)
        admission = await self.admit(policy, None, 0, 0)
        upstream = snap.upstreams[snap.config.default_upstream]
        req = upstream.build(
            request.method,
            request.url.path[3:],
            request.url.query.encode(),
            request.headers.raw,
            raw,
        )
        resp = await upstream.send(req)
        headers = response_headers(resp.headers)
        headers.update(admission.headers())

        async def body() -> AsyncIterator[bytes]:
            try:
                async with upstream.errors():
                    async for chunk in resp.aiter_bytes():
                        yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(body(), resp.status_code, headers)

    async def aclose(self) -> None:
        for up in {id(u): u for u in self.snapshot.upstreams.values()}.values():
            await up.aclose()
        await self.backend.aclose()


def _is_sse(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


def _check_path(request: Request) -> None:
    path = unquote(request.scope.get("raw_path", b"").decode("latin-1").split("?")[0])
    if any(seg in (".", "..") for seg in path.split("/")) or "\\" in path or "\x00" in path:
        raise InvalidRequest("Invalid request path.")


def _usage_of_body(
    content: bytes, counter: TokenCounter, p: Payload, input_tokens: int
) -> tuple[int, int, int]:
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        raise UpstreamUnreachable("The upstream sent a response that is not valid JSON.") from None
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
        if isinstance(pt, int) and isinstance(ct, int | None):
            return (1, pt, ct or 0)
    # No usage reported: charge our own count of what came back.
    text = ""
    if isinstance(data, dict) and isinstance(data.get("choices"), list):
        for c in data["choices"]:
            if isinstance(c, dict):
                msg = c.get("message")
                if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                    text += msg["content"]
                elif isinstance(c.get("text"), str):
                    text += c["text"]
    return (1, input_tokens, counter.count_text(text, p.model) if text else 0)


# -- the one place errors become responses -------------------------------------------------


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProxyError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.url.path}.").response()
    if exc.status_code == 405:
        return MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.url.path}.",
            headers=exc.headers,
        ).response()
    return ProxyError(str(exc.detail)).response()


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return ProxyError("The proxy failed to handle this request.").response()


def create_app(cfg: Config, backend: Backend | None = None) -> Starlette:
    node = Node(cfg, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep(node))
        try:
            yield
        finally:
            sweeper.cancel()
            await node.aclose()

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    routes = [Route("/healthz", healthz, methods=["GET"])]
    routes += [Route(path, node.limited, methods=["POST"]) for path in _LIMITED]
    routes += [
        Route(
            "/v1/{rest:path}",
            node.passthrough,
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ProxyError: _proxy_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.node = node
    return app


async def _sweep(node: Node) -> None:
    """Let idle keys' windows go, so memory follows live traffic only."""
    sweep = getattr(node.backend, "sweep", None)
    if sweep is None:
        return
    while True:
        await asyncio.sleep(max(1.0, node.snapshot.config.window_s / 4))
        sweep()
