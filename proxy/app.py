"""The node: builds the Starlette app from a parsed config; the only place parts are wired."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import anyio
import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from . import admin, health, metrics
from .accesslog import apply_levels, write_access_line
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
from .exchange import SCOPE_KEY, ExchangeMiddleware, InFlight, current
from .limiter import Admission, KeyPolicy, Limiter, build_policies
from .payload import CHAT, COMPLETIONS, EMBEDDINGS, parse_json, parse_request
from .payload import Request as Payload
from .reload import Reloader
from .streaming import StreamOutcome, StreamRelay
from .tokens import LARGE_TEXT_CHARS, TokenCounter
from .upstream import Upstream, response_headers

log = logging.getLogger("proxy")

SETTLE_TIMEOUT_S = 5.0  # at shutdown, for cancelled requests to finish their settlement

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
        self.backend = (
            backend
            if backend is not None
            else build_backend(cfg.backend, metrics.set_backend_state, metrics.record_backend_error)
        )
        self.limiter = Limiter(self.backend)
        self._retired: list[Upstream] = []

    # -- pieces of the request path ---------------------------------------------------------

    def authenticate(self, snap: Snapshot, request: Request) -> KeyPolicy:
        token = _client_key(request)
        # Looked up by digest: the dictionary never sees (or compares) the key itself.
        policy = snap.policies.get(hashlib.sha256(token.encode()).hexdigest())
        if policy is None:
            raise Unauthorized("Incorrect API key provided.")
        current().key = policy.name
        return policy

    async def read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequest("Invalid Content-Length header.")
            # Length first: int() of thousands of digits is slow, and refused past 4300.
            if len(declared) > 18 or int(declared) > limit:
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
        ex = current()
        ex.model = model
        t0 = time.perf_counter()
        try:
            ex.admission = await self.limiter.admit(policy, model, input_tokens, output_tokens)
            return ex.admission
        except BackendUnavailable as exc:
            metrics.record_backend_error("reserve")
            raise LimiterUnavailable(
                "The rate limiter's storage is unavailable; the request was not admitted."
            ) from exc
        finally:
            ex.decision_s = time.perf_counter() - t0

    async def settle(self, admission: Admission, actual: tuple[int, int, int]) -> None:
        try:
            await self.limiter.settle(admission, actual)
        except BackendUnavailable:
            metrics.record_backend_error("reconcile")
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
            # vLLM's per-chunk usage needs include_usage: without it the client would have
            # seen no usage at all, so only the final usage chunk is asked for (and removed).
            opts.pop("continuous_usage_stats", None)
            try:
                raw = orjson.dumps({**p.body, "stream_options": opts})
            except orjson.JSONEncodeError:  # parsed (1024 levels), not writable (255)
                raise InvalidRequest("The request body is nested too deeply.") from None
        admission = await self.admit(policy, p.model, input_tokens, p.output_reservation)
        try:
            req = upstream.build(
                "POST",
                request.url.path[3:],
                request.url.query.encode(),
                request.headers.raw,
                raw,
                secret=_client_key(request),
            )
            resp = await _timed_send(upstream, req)
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
            content = await upstream.read(resp)
            if resp.status_code < 400:
                actual = _usage_of_body(content, snap.counter, p, input_tokens)
            else:
                content = upstream.redact(content)  # error bodies may echo the upstream's key
        finally:
            await resp.aclose()
            await self.settle(admission, actual)
        headers = response_headers(resp.headers, resp.status_code)
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
        ex = current()
        ex.stream = True

        async def settle(outcome: StreamOutcome) -> None:
            ex.stream_end = _stream_end(outcome)
            if outcome.usage is not None:
                actual = (1, outcome.usage[0], outcome.usage[1])
            else:
                # No usage came (client gone, upstream cut, or usage unsupported): charge what
                # was actually streamed, counted from the forwarded deltas.
                out = outcome.output_tokens
                actual = (1, input_tokens, p.output_reservation if out is None else out)
            await self.settle(admission, actual)

        headers = response_headers(resp.headers, resp.status_code)
        headers.update(admission.headers())
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return StreamRelay(
            resp, headers, settle, strip_usage, lambda text: snap.counter.count_text(text, p.model)
        )

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
            _raw_path(request)[3:],  # as the client encoded it (checked above), not re-encoded
            request.url.query.encode(),
            request.headers.raw,
            raw,
            secret=_client_key(request),
        )
        resp = await _timed_send(upstream, req)
        headers = response_headers(resp.headers, resp.status_code)
        headers.update(admission.headers())
        if resp.status_code >= 400:
            # Error bodies are small and may echo request headers: read whole, redacted.
            try:
                content = upstream.redact(await upstream.read(resp))
            finally:
                await resp.aclose()
            return Response(content, resp.status_code, headers)

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


async def _timed_send(upstream: Upstream, req: httpx.Request) -> httpx.Response:
    """``upstream.send`` with its time to response headers noted for the access log/metrics."""
    ex = current()
    ex.upstream = upstream.name
    t0 = time.perf_counter()
    try:
        return await upstream.send(req)
    finally:
        ex.upstream_s = time.perf_counter() - t0


def _is_sse(resp: httpx.Response) -> bool:
    return resp.headers.get("content-type", "").startswith("text/event-stream")


def _stream_end(outcome: StreamOutcome) -> str:
    if outcome.error is not None:
        return "upstream_error"
    if outcome.completed:  # first: the server reports a disconnect after a finished response
        return "completed"
    return "client_gone" if outcome.client_gone else "incomplete"


def _client_key(request: Request) -> str:
    """The Bearer token of the request's one Authorization header, else Unauthorized."""
    values = request.headers.getlist("authorization")
    if len(values) > 1:
        # Two credentials: which one counts would depend on who reads the headers.
        raise Unauthorized("Send one Authorization header, not several.")
    if not values or not values[0]:
        raise Unauthorized(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("The Authorization header must be 'Bearer <your API key>'.")
    return token


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    return raw.decode("latin-1").split("?")[0] if raw else request.url.path


# Backslashes and control characters: meaningless in an API path, and some servers or httpx
# itself treat them specially (httpx drops tabs and newlines, refuses DEL).
_BAD_PATH_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def _check_path(request: Request) -> None:
    """A passthrough path must mean the same to the upstream as to us: no dot segments, no
    empty segments ("//"), no backslashes or control characters, plain ASCII as sent."""
    target = _raw_path(request)
    path = unquote(target)
    segments = path.split("/")
    if (
        not target.startswith("/v1/")
        or not target.isascii()
        or any(seg in (".", "..") for seg in segments)
        or "" in segments[2:-1]
        or _BAD_PATH_CHARS.search(path)
    ):
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
    current().error = exc
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
    # This handler runs outside the request-id middleware: add the header here.
    rid = request.scope.get(SCOPE_KEY)
    return ProxyError("The proxy failed to handle this request.").response(
        {"x-request-id": rid} if rid else None
    )


def create_app(
    cfg: Config, backend: Backend | None = None, config_path: str | None = None
) -> Starlette:
    """``config_path``: the file to watch and re-read on SIGHUP (hot reload); None: no reload."""
    node = Node(cfg, backend)
    inflight = InFlight()
    recorder = metrics.Recorder(cfg)
    refusals = admin.Refusals()
    reloader = None
    if config_path is not None:
        reloader = Reloader(
            node,
            config_path,
            build_snapshot,
            inflight,
            on_apply=(recorder.configure, lambda c: apply_levels(c.logging)),
            on_result=lambda result: metrics.CONFIG_RELOADS.labels(result).inc(),
        )
    if metrics.backend_state() is None:
        metrics.set_backend_state("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Build the encoders before the first request rather than during it (~0.3 s).
        await anyio.to_thread.run_sync(node.snapshot.counter.preload)
        sweeper = asyncio.create_task(_sweep(node))
        if reloader is not None:
            reloader.start()
        try:
            yield
        finally:
            sweeper.cancel()
            # uvicorn has let requests finish, or cancelled them after shutdown_grace_s; the
            # cancelled ones settle in shielded finally blocks: let those reach the backend.
            if not await inflight.drained(SETTLE_TIMEOUT_S):
                log.warning("%d requests still unsettled at shutdown", len(inflight))
            if reloader is not None:
                await reloader.stop()
            await node.aclose()
            metrics.mark_process_dead()

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    # The API routes first: the router tries routes in order, one regex each, per request.
    routes = [Route(path, node.limited, methods=["POST"]) for path in _LIMITED]
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", metrics.metrics_endpoint, methods=["GET"]),
        *admin.routes(),
    ]
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
        middleware=[
            Middleware(
                ExchangeMiddleware,
                finishers=(recorder.finish, refusals.finish, write_access_line),
                on_stream=metrics.stream_gauge,
                inflight=inflight,
            )
        ],
    )
    app.state.node = node
    app.state.inflight = inflight
    app.state.refusals = refusals
    app.state.reloader = reloader
    app.state.recorder = recorder
    return app


async def _sweep(node: Node) -> None:
    """Let idle keys' windows go, so memory follows live traffic only."""
    sweep = getattr(node.backend, "sweep", None)
    if sweep is None:
        return
    while True:
        await asyncio.sleep(max(1.0, node.snapshot.config.window_s / 4))
        sweep()
