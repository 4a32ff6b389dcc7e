"""A rejected mock request and the OpenAI-shaped error body it is answered with."""

from __future__ import annotations

import orjson


class MockRequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def _error_body(message: str, status: int, param: str | None = None) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_exceeded"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}})
