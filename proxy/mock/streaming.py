"""Streamed answers: OpenAI's SSE chunk shapes, paced, with the stream faults."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from .disconnect import _Disconnect
from .faults import Faults
from .plan import _Plan, _usage
from .text import token_text

if TYPE_CHECKING:
    from .handlers import _MockApp

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_MALFORMED_EVENT = b'data: {"id": "broken", "choices": [{"delta": {"content": "\n\n'
_DONE_EVENT = b"data: [DONE]\n\n"


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
