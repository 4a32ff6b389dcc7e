"""Every error the proxy itself returns, and their one mapping to OpenAI's error JSON.

ProxyError
├── InvalidRequest        400 invalid_request_error (param names the field)
├── Unauthorized          401 invalid_api_key
├── NotFound              404
├── MethodNotAllowed      405
├── PayloadTooLarge       413
├── RateLimited           429 rate_limit_exceeded (Retry-After, x-ratelimit-*)
├── UpstreamUnreachable   502
├── LimiterUnavailable    503
└── UpstreamTimeout       504
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = dict(self.headers)
        if extra_headers:
            headers.update(extra_headers)
        return Response(self.body(), self.status, headers, media_type="application/json")


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, dimension: str, **kw) -> None:
        super().__init__(message, **kw)
        # OpenAI's rate-limit errors carry the limited dimension as their type.
        self.type = dimension


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class LimiterUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "rate_limiter_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
