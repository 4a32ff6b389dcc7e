"""The structured access log: one JSON line per API request on logger ``proxy.access`` (stderr).

Only names and numbers are written: the key's configured name, never the client key, the
upstream key, the prompt or the query string.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from .config import LoggingConfig
from .exchange import Exchange

ACCESS = logging.getLogger("proxy.access")
_MAX_FIELD = 200  # client-chosen strings (model, path) are cut to this length


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


def access_line(ex: Exchange) -> bytes:
    reserved, charged = ex.reserved(), ex.charged()
    record = {
        "time": datetime.fromtimestamp(ex.wall, UTC).isoformat(timespec="milliseconds"),
        "request_id": ex.request_id,
        "method": ex.method,
        "path": ex.path[:_MAX_FIELD],
        "endpoint": ex.endpoint,
        "key": ex.key,
        "model": ex.model[:_MAX_FIELD] if ex.model else ex.model,
        "status": ex.status,
        "outcome": ex.outcome,
        "stream": ex.stream,
        "input_tokens_reserved": reserved[1] if reserved else None,
        "output_tokens_reserved": reserved[2] if reserved else None,
        "input_tokens_charged": charged[1] if charged else None,
        "output_tokens_charged": charged[2] if charged else None,
        "limiter_ms": _ms(ex.decision_s),
        "upstream": ex.upstream,
        "upstream_ms": _ms(ex.upstream_s),
        "total_ms": _ms(ex.total_s),
    }
    if ex.stream_end is not None:
        record["stream_end"] = ex.stream_end
    if ex.failed is not None:
        record["error"] = ex.failed
    return orjson.dumps(record)


def write_access_line(ex: Exchange) -> None:
    """The finisher: API requests and admin actions; probes, scrapes and page polls are not
    logged (``endpoint`` is None for them)."""
    if ex.endpoint is not None and ACCESS.isEnabledFor(logging.INFO):
        # makeRecord + handle is what .info() does, minus the walk up the stack for the
        # caller's file and line (a third of the cost, and meaningless here).
        msg = access_line(ex).decode()
        ACCESS.handle(ACCESS.makeRecord(ACCESS.name, logging.INFO, "", 0, msg, None, None))


def setup_logging(cfg: LoggingConfig) -> None:
    """Handlers for a serving process (each worker calls it): messages of ``proxy.*`` as plain
    lines on stderr at ``logging.level``; the access log on stderr, on or off by ``access_log``.
    Called again on reload with the new settings."""
    proxy = logging.getLogger("proxy")
    if not any(getattr(h, "_proxy", False) for h in proxy.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._proxy = True  # type: ignore[attr-defined]
        proxy.addHandler(handler)
        proxy.propagate = False
    # httpx logs every upstream call at INFO and httpcore the upstream's headers at DEBUG: the
    # access line covers the call, and upstream headers (organisation ids...) stay out of logs.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    apply_levels(cfg)


def apply_levels(cfg: LoggingConfig) -> None:
    logging.getLogger("proxy").setLevel(cfg.level.upper())
    # The access log has its own switch, independent of the level of other messages.
    ACCESS.setLevel(logging.INFO if cfg.access_log else logging.CRITICAL + 1)
