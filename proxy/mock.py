"""The built-in mock upstream: an OpenAI-compatible ASGI app with deterministic answers, usage
counted by the same TokenCounter as the proxy, pacing, fault injection and a request log.

Request log (one JSON line per finished request): t, t_end, endpoint, model, stream,
prompt_tokens, completion_tokens (what the usage reported, or the truth when no usage was sent),
true_prompt_tokens, true_completion_tokens, usage_sent, status (499: the client went away),
authorization_present, authorization, fault.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.tokens import LARGE_TEXT_CHARS, TokenCounter

FAULT_HEADER = "x-mock-fault"
DEFAULT_MAX_TOKENS = 16
MAX_COMPLETION_TOKENS = 1_000_000
MAX_CHOICES = 128
MAX_DIMENSIONS = 8192

# Each word is one token, bare and with a leading space, in cl100k_base and o200k_base, and
# the pre-tokenizer splits before every space: a text of N words is exactly N tokens.
WORDS: tuple[str, ...] = (
    "sit", "sed", "do", "ut", "et", "ad", "quis", "ex", "ea", "in", "esse", "non", "qui",
    "anim", "id", "est", "the", "of", "and", "to", "a", "is", "that", "for", "it", "as",
    "with", "was", "on", "be", "by", "this", "are", "from", "at", "or", "an", "have", "not",
    "but", "which", "one", "all", "were", "can", "more", "when", "there", "has", "will",
    "their", "if", "about", "so", "time", "up", "out", "some", "them", "into", "other",
    "than", "then", "its",
)  # fmt: skip
_SPACED = tuple(" " + w for w in WORDS)
_MODELS = (
    "mock",
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_MALFORMED_EVENT = b'data: {"id": "broken", "choices": [{"delta": {"content": "\n\n'
_DONE_EVENT = b"data: [DONE]\n\n"
_INVALID = object()


@dataclass(frozen=True)
class MockSettings:
    latency_ms: float = 0
    tokens_per_second: float = 0  # 0 = as fast as possible
    chunk_tokens: int = 1
    log_path: str | None = None
    # Must equal the proxy's default_encoding, or counts differ for unknown model names.
    default_encoding: str = "cl100k_base"


class MockRequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True, slots=True)
class Faults:
    """The parsed `x-mock-fault` header. `length` is the natural answer length (not a fault:
    the answer stops there with finish_reason "stop" when max_tokens allows)."""

    status: int | None = None
    cut_after: int | None = None
    no_usage: bool = False
    malformed_after: int | None = None
    usage_prompt: int | None = None
    usage_completion: int | None = None
    delay_first_ms: float = 0
    hang: bool = False
    length: int | None = None
    raw: str | None = None


_INT_FAULTS = {
    "status": "status",
    "cut-after": "cut_after",
    "malformed-after": "malformed_after",
    "usage-prompt": "usage_prompt",
    "usage-completion": "usage_completion",
    "delay-first-ms": "delay_first_ms",
    "length": "length",
}
_FLAG_FAULTS = {"no-usage": "no_usage", "hang": "hang"}
_NO_FAULTS = Faults()


def parse_faults(header: str | None) -> Faults:
    if not header:
        return _NO_FAULTS
    values: dict[str, Any] = {"raw": header}
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if key in _FLAG_FAULTS and not sep:
            values[_FLAG_FAULTS[key]] = True
        elif key in _INT_FAULTS and sep:
            try:
                number = int(value.strip())
            except ValueError:
                raise MockRequestError(f"{FAULT_HEADER}: {key} needs an integer") from None
            if number < 0 or (key == "status" and not 400 <= number <= 599):
                raise MockRequestError(f"{FAULT_HEADER}: {key}={number} is out of range")
            values[_INT_FAULTS[key]] = number
        else:
            raise MockRequestError(f"{FAULT_HEADER}: unknown directive {item!r}")
    return Faults(**values)


# --------------------------------------------------------------------------- text and shapes


def word_offset(prompt: Any) -> int:
    """Where in the word cycle the answer starts: a function of the prompt only."""
    return zlib.crc32(orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS)) % len(WORDS)


def token_text(offset: int, start: int, count: int) -> str:
    """Tokens start..start+count of the answer beginning at word `offset`."""
    n = len(WORDS)
    parts = [_SPACED[(offset + i) % n] for i in range(start, start + count)]
    if start == 0 and parts:
        parts[0] = WORDS[offset % n]
    return "".join(parts)


def completion_text(offset: int, tokens: int) -> str:
    return token_text(offset, 0, tokens)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _error_body(message: str, status: int, param: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_exceeded"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}})


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _opt_int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MockRequestError(f"{key} must be an integer in [{low}, {high}]", param=key)
    return value


@dataclass(slots=True)
class _Plan:
    """What one generation request produces."""

    kind: str  # "chat" | "text"
    model: str
    prompt_tokens: int
    offsets: list[int]  # one per choice
    tokens: int  # per choice
    finish: str
    include_usage: bool
    continuous: bool


def _plan(body: dict[str, Any], kind: str, counter: TokenCounter, faults: Faults) -> _Plan:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MockRequestError("model is required", param="model")
    n = _opt_int(body, "n", 1, MAX_CHOICES) or 1
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MockRequestError("messages must be a non-empty array", param="messages")
        tools = body.get("tools")
        if tools is None:
            tools = body.get("functions")
        prompt_tokens = counter.count_chat(messages, model, tools)
        limit = _opt_int(body, "max_completion_tokens", 0, MAX_COMPLETION_TOKENS)
        if limit is None:
            limit = _opt_int(body, "max_tokens", 0, MAX_COMPLETION_TOKENS)
        seeds = [messages]
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise MockRequestError("prompt is required", param="prompt")
        prompt_tokens = counter.count_prompt(prompt, model)
        limit = _opt_int(body, "max_tokens", 0, MAX_COMPLETION_TOKENS)
        # Several prompts: n choices for each, like OpenAI.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            seeds = list(prompt)
        else:
            seeds = [prompt]
    natural = faults.length
    if natural is None:
        tokens = DEFAULT_MAX_TOKENS if limit is None else limit
        finish = "stop" if limit is None else "length"
    elif limit is not None and natural >= limit:
        tokens, finish = limit, "length"
    else:
        tokens, finish = natural, "stop"
    offsets = []
    for seed in seeds:
        base = word_offset(seed)
        offsets.extend(base + 17 * j for j in range(n))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    continuous = include_usage and options.get("continuous_usage_stats") is True
    return _Plan(kind, model, prompt_tokens, offsets, tokens, finish, include_usage, continuous)


# --------------------------------------------------------------------------- request log


class _RequestLog:
    """Appends one JSON line per finished request; flushed per line for readers after a run."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._file: IO[bytes] | None = None

    def write(self, entry: dict[str, Any]) -> None:
        if self._path is None:
            return
        if self._file is None:
            self._file = open(self._path, "ab")  # noqa: SIM115 - kept open for the app's life
        self._file.write(orjson.dumps(entry) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- the app


class _Disconnect:
    """Watches `receive` for the client going away, without consuming anything else."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.event = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.event.set()
                return

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True if the client disconnected meanwhile."""
        if seconds > 0 and not self.event.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), seconds)
        return self.event.is_set()

    def close(self) -> None:
        self._task.cancel()


class _MockApp:
    def __init__(self, settings: MockSettings) -> None:
        if settings.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")
        if settings.tokens_per_second < 0 or settings.latency_ms < 0:
            raise ValueError("tokens_per_second and latency_ms must be >= 0")
        self.settings = settings
        self.counter = TokenCounter(settings.default_encoding)
        self.log = _RequestLog(settings.log_path)

    # -- shared plumbing

    def _entry(self, request: Request, t0: float, faults: Faults) -> dict[str, Any]:
        auth = request.headers.get("authorization")
        return {
            "t": t0,
            "t_end": None,
            "endpoint": request.scope["path"],
            "model": None,
            "stream": False,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "true_prompt_tokens": 0,
            "true_completion_tokens": 0,
            "usage_sent": False,
            "status": 200,
            "authorization_present": auth is not None,
            "authorization": auth,
            "fault": faults.raw,
        }

    def _finish(self, entry: dict[str, Any], status: int, **fields: Any) -> None:
        entry.update(fields)
        entry["status"] = status
        entry["t_end"] = time.time()
        self.log.write(entry)

    def _error(self, entry: dict[str, Any], exc: MockRequestError) -> Response:
        self._finish(entry, exc.status)
        return Response(
            _error_body(str(exc), exc.status, exc.param),
            status_code=exc.status,
            media_type="application/json",
        )

    def _first_byte_delay(self, faults: Faults) -> float:
        return (self.settings.latency_ms + faults.delay_first_ms) / 1000.0

    async def _prelude(self, request: Request) -> tuple[dict[str, Any], Faults, Any, bool]:
        """Parse faults and body, apply first-byte delay, hang and status faults."""
        t0 = time.time()
        try:
            faults = parse_faults(request.headers.get(FAULT_HEADER))
        except MockRequestError as exc:
            faults = Faults(raw=request.headers.get(FAULT_HEADER))
            raise _Early(self._entry(request, t0, faults), exc) from None
        entry = self._entry(request, t0, faults)
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = _INVALID
        if isinstance(body, dict):
            entry["model"] = body.get("model")
            entry["stream"] = body.get("stream") is True
        if faults.hang:
            watch = _Disconnect(request.receive)
            try:
                await watch.event.wait()
            finally:
                watch.close()
            self._finish(entry, 499)
            raise _Hung
        delay = self._first_byte_delay(faults)
        if delay > 0:
            await asyncio.sleep(delay)
        if faults.status is not None:
            fault = MockRequestError(f"mock fault: status {faults.status}", faults.status)
            raise _Early(entry, fault)
        if body is _INVALID:
            raise _Early(entry, MockRequestError("request body is not valid JSON"))
        if not isinstance(body, dict):
            raise _Early(entry, MockRequestError("request body must be a JSON object"))
        return entry, faults, body, len(raw) > LARGE_TEXT_CHARS

    async def _guarded(
        self,
        request: Request,
        handler: Callable[[dict[str, Any], Faults, Any, bool], Awaitable[Any]],
    ) -> Any:
        try:
            entry, faults, body, large = await self._prelude(request)
            return await handler(entry, faults, body, large)
        except _Early as early:
            return self._error(early.entry, early.error)
        except _Hung:
            return Response(status_code=499)  # the client is gone; nothing is sent

    # -- endpoints

    async def chat(self, request: Request) -> Any:
        return await self._guarded(request, self._generate_chat)

    async def completions(self, request: Request) -> Any:
        return await self._guarded(request, self._generate_text)

    async def embeddings(self, request: Request) -> Any:
        return await self._guarded(request, self._embed)

    async def models(self, request: Request) -> Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mock"} for m in _MODELS]
        return _json({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def _generate_chat(
        self, entry: dict[str, Any], faults: Faults, body: Any, large: bool
    ) -> Any:
        return await self._generate(entry, faults, body, large, "chat")

    async def _generate_text(
        self, entry: dict[str, Any], faults: Faults, body: Any, large: bool
    ) -> Any:
        return await self._generate(entry, faults, body, large, "text")

    async def _generate(
        self, entry: dict[str, Any], faults: Faults, body: Any, large: bool, kind: str
    ) -> Any:
        try:
            if large:  # counting a big prompt would stall every other request on the loop
                plan = await asyncio.to_thread(_plan, body, kind, self.counter, faults)
            else:
                plan = _plan(body, kind, self.counter, faults)
        except MockRequestError as exc:
            return self._error(entry, exc)
        except (TypeError, ValueError) as exc:  # odd shapes reaching the token counter
            return self._error(entry, MockRequestError(str(exc)))
        if entry["stream"]:
            return _StreamResponse(self, plan, faults, entry)
        return await self._respond(plan, faults, entry)

    async def _respond(self, plan: _Plan, faults: Faults, entry: dict[str, Any]) -> Response:
        tps = self.settings.tokens_per_second
        if tps > 0 and plan.tokens:
            await asyncio.sleep(plan.tokens / tps)
        completion = plan.tokens * len(plan.offsets)
        created = int(entry["t"])
        if plan.kind == "chat":
            choices: list[dict[str, Any]] = [
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": completion_text(off, plan.tokens),
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": plan.finish,
                }
                for i, off in enumerate(plan.offsets)
            ]
            obj: dict[str, Any] = {
                "id": "chatcmpl-" + os.urandom(12).hex(),
                "object": "chat.completion",
                "created": created,
                "model": plan.model,
                "choices": choices,
                "system_fingerprint": "fp_mock",
            }
        else:
            choices = [
                {
                    "text": completion_text(off, plan.tokens),
                    "index": i,
                    "logprobs": None,
                    "finish_reason": plan.finish,
                }
                for i, off in enumerate(plan.offsets)
            ]
            obj = {
                "id": "cmpl-" + os.urandom(12).hex(),
                "object": "text_completion",
                "created": created,
                "model": plan.model,
                "choices": choices,
            }
        reported = self._reported(plan.prompt_tokens, completion, faults)
        if reported is not None:
            obj["usage"] = _usage(*reported)
        content = orjson.dumps(obj)
        self._log_generation(entry, 200, plan.prompt_tokens, completion, reported)
        if faults.cut_after is not None:
            return _CutResponse(content)
        return Response(content, media_type="application/json")

    def _reported(self, prompt: int, completion: int, faults: Faults) -> tuple[int, int] | None:
        if faults.no_usage:
            return None
        p = prompt if faults.usage_prompt is None else faults.usage_prompt
        c = completion if faults.usage_completion is None else faults.usage_completion
        return p, c

    def _log_generation(
        self,
        entry: dict[str, Any],
        status: int,
        prompt: int,
        completion: int,
        reported: tuple[int, int] | None,
    ) -> None:
        billed = reported if reported is not None else (prompt, completion)
        self._finish(
            entry,
            status,
            prompt_tokens=billed[0],
            completion_tokens=billed[1],
            true_prompt_tokens=prompt,
            true_completion_tokens=completion,
            usage_sent=reported is not None,
        )

    async def _embed(self, entry: dict[str, Any], faults: Faults, body: Any, large: bool) -> Any:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._error(entry, MockRequestError("model is required", param="model"))
        items = body.get("input")
        if items is None:
            return self._error(entry, MockRequestError("input is required", param="input"))
        try:
            dims = _opt_int(body, "dimensions", 1, MAX_DIMENSIONS) or 8
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise MockRequestError("encoding_format must be float or base64")
            count = self.counter.count_embedding_input
            if large:
                prompt_tokens = await asyncio.to_thread(count, items, model)
            else:
                prompt_tokens = count(items, model)
        except MockRequestError as exc:
            return self._error(entry, exc)
        except (TypeError, ValueError) as exc:
            return self._error(entry, MockRequestError(str(exc), param="input"))
        if isinstance(items, str) or (items and isinstance(items[0], int)):
            items = [items]
        data = []
        for i, item in enumerate(items):
            vector = embedding_vector(item, dims)
            value: Any = vector
            if fmt == "base64":
                value = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        obj: dict[str, Any] = {"object": "list", "data": data, "model": model}
        reported = self._reported(prompt_tokens, 0, faults)
        if reported is not None:
            obj["usage"] = {"prompt_tokens": reported[0], "total_tokens": reported[0]}
        self._log_generation(entry, 200, prompt_tokens, 0, reported)
        return Response(orjson.dumps(obj), media_type="application/json")


class _Early(Exception):
    """Answer now with an error (or a fault status)."""

    def __init__(self, entry: dict[str, Any], error: MockRequestError) -> None:
        super().__init__()
        self.entry = entry
        self.error = error


class _Hung(Exception):
    """The `hang` fault ended because the client disconnected."""


def embedding_vector(item: Any, dims: int) -> list[float]:
    """A deterministic unit vector for one input item (xorshift seeded by its CRC)."""
    state = zlib.crc32(orjson.dumps(item)) or 1
    out = []
    for _ in range(dims):
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        out.append(state / 2147483648.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in out)) or 1.0
    # Rounded to float32 so the float and base64 forms carry the same numbers.
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in out]


class _CutResponse:
    """Sends headers and half the body, then drops the connection (cut-after, non-streaming)."""

    def __init__(self, content: bytes) -> None:
        self.content = content

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.content)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        half = self.content[: len(self.content) // 2]
        await send({"type": "http.response.body", "body": half, "more_body": True})
        # Returning without the final body message makes the server close the connection.


class _StreamResponse:
    """An SSE response in OpenAI's chunk shapes, paced, with stream faults."""

    def __init__(self, app: _MockApp, plan: _Plan, faults: Faults, entry: dict[str, Any]) -> None:
        self.app = app
        self.plan = plan
        self.faults = faults
        self.entry = entry
        created = int(entry["t"])
        prefix = "chatcmpl-" if plan.kind == "chat" else "cmpl-"
        obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"
        self._head = {"id": prefix + os.urandom(12).hex(), "object": obj, "created": created}
        self._head["model"] = plan.model
        if plan.kind == "chat":
            self._head["system_fingerprint"] = "fp_mock"
        reported = app._reported(plan.prompt_tokens, 0, faults)
        self._usage_prompt = reported[0] if reported is not None else plan.prompt_tokens

    def _chunk(self, choices: list[dict[str, Any]], emitted: int) -> bytes:
        obj = dict(self._head)
        obj["choices"] = choices
        if self.plan.include_usage and not self.faults.no_usage:
            obj["usage"] = _usage(self._usage_prompt, emitted) if self.plan.continuous else None
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    def _choice(self, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if self.plan.kind == "text":
            return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            delta: dict[str, Any] = {}
        elif text is None:
            delta = {"role": "assistant", "content": "", "refusal": None}
        else:
            delta = {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        plan, faults, settings = self.plan, self.faults, self.app.settings
        watch = _Disconnect(receive)
        emitted = 0  # completion tokens sent, all choices
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})

            async def emit(data: bytes) -> None:
                await send({"type": "http.response.body", "body": data, "more_body": True})

            if plan.kind == "chat":
                roles = [self._choice(i, None, None) for i in range(len(plan.offsets))]
                for i in range(len(roles)):
                    await emit(self._chunk([roles[i]], 0))
            step = settings.chunk_tokens
            tps = settings.tokens_per_second
            started = time.monotonic()
            content_chunks = 0
            malformed_sent = False
            for first in range(0, plan.tokens, step):
                count = min(step, plan.tokens - first)
                if tps > 0:
                    due = started + (first + count) / tps
                    if await watch.sleep(due - time.monotonic()):
                        break
                for i, off in enumerate(plan.offsets):
                    if faults.cut_after is not None and content_chunks >= faults.cut_after:
                        self._log(emitted, sent_usage=False)
                        return  # no final message: the server drops the connection
                    if (
                        not malformed_sent
                        and faults.malformed_after is not None
                        and content_chunks >= faults.malformed_after
                    ):
                        await emit(_MALFORMED_EVENT)
                        malformed_sent = True
                    emitted += count
                    text = token_text(off, first, count)
                    await emit(self._chunk([self._choice(i, text, None)], emitted))
                    content_chunks += 1
                if tps <= 0 and content_chunks % 32 == 0:
                    await asyncio.sleep(0)  # unpaced: still let the disconnect watcher run
                if watch.event.is_set():
                    break
            if watch.event.is_set():
                self._log(emitted, sent_usage=False, status=499)
                return
            if faults.cut_after is not None:
                self._log(emitted, sent_usage=False)  # fewer chunks than N: cut before the end
                return
            if not malformed_sent and faults.malformed_after is not None:
                await emit(_MALFORMED_EVENT)
            for i in range(len(plan.offsets)):
                await emit(self._chunk([self._choice(i, "", plan.finish)], emitted))
            reported = self.app._reported(plan.prompt_tokens, emitted, faults)
            if plan.include_usage and reported is not None:
                obj = dict(self._head)
                obj["choices"] = []
                obj["usage"] = _usage(*reported)
                await emit(b"data: " + orjson.dumps(obj) + b"\n\n")
            sent = reported if plan.include_usage else None
            self._log(emitted, sent_usage=sent is not None, reported=sent)
            await send({"type": "http.response.body", "body": _DONE_EVENT, "more_body": False})
        finally:
            watch.close()

    def _log(
        self,
        emitted: int,
        sent_usage: bool,
        reported: tuple[int, int] | None = None,
        status: int = 200,
    ) -> None:
        if self.entry["t_end"] is not None:
            return
        self.app._log_generation(
            self.entry, status, self.plan.prompt_tokens, emitted, reported if sent_usage else None
        )


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return Response(
        _error_body(f"{request.method} {request.url.path} not found", status),
        status_code=status,
        media_type="application/json",
    )


def create_mock_app(settings: MockSettings) -> Starlette:
    mock = _MockApp(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            mock.log.close()

    routes = [
        Route("/v1/chat/completions", mock.chat, methods=["POST"]),
        Route("/v1/completions", mock.completions, methods=["POST"]),
        Route("/v1/embeddings", mock.embeddings, methods=["POST"]),
        Route("/v1/models", mock.models, methods=["GET"]),
        Route("/health", mock.health, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_found},
    )
    app.state.mock = mock
    return app


class _DropCutNoise(logging.Filter):
    # A cut-after fault closes the connection on purpose; uvicorn reports that as an error.
    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropCutNoise) for f in logger.filters):
        logger.addFilter(_DropCutNoise())


def mock_main(host: str, port: int, settings: MockSettings) -> None:
    import uvicorn

    install_log_filter()
    app = create_mock_app(settings)
    app.state.mock.counter.preload()
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="auto",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
