"""The mock's request handling: faults, pacing and the request log around each endpoint,
and the non-streaming answers."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from proxy.tokens import LARGE_TEXT_CHARS, TokenCounter

from .disconnect import _Disconnect
from .errors import MockRequestError, _error_body
from .faults import FAULT_HEADER, Faults, parse_faults
from .plan import _opt_int, _Plan, _plan, _usage
from .requestlog import _RequestLog
from .settings import MockSettings
from .streaming import _StreamResponse
from .text import completion_text, embedding_vector

MAX_DIMENSIONS = 8192
_MODELS = (
    "mock",
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
)
_INVALID = object()


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


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
