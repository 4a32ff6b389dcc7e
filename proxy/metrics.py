"""Prometheus metrics of the proxy, and ``GET /metrics`` (merged over workers when uvicorn runs
several: the CLI then points PROMETHEUS_MULTIPROC_DIR at a fresh directory before they start)."""

from __future__ import annotations

import fnmatch
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from .config import Config
from .exchange import Exchange

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# The metrics live in their own registry; in multiprocess mode their values go to files in
# PROMETHEUS_MULTIPROC_DIR instead (chosen by prometheus_client when it is first imported).
REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "proxy_requests",
    "API requests by key name, model, endpoint and outcome.",
    ["key", "model", "endpoint", "outcome"],
    registry=REGISTRY,
)
TOKENS_RESERVED = Counter(
    "proxy_tokens_reserved",
    "Tokens reserved at admission, by key name and dimension.",
    ["key", "dimension"],
    registry=REGISTRY,
)
TOKENS_CHARGED = Counter(
    "proxy_tokens_charged",
    "Tokens charged after settlement (what was really used), by key name and dimension.",
    ["key", "dimension"],
    registry=REGISTRY,
)
TOKENS_REFUNDED = Counter(
    "proxy_tokens_refunded",
    "Reserved tokens given back at settlement, by key name and dimension.",
    ["key", "dimension"],
    registry=REGISTRY,
)
DECISION_SECONDS = Histogram(
    "proxy_limiter_decision_seconds",
    "Time of one limiter decision (the backend's reserve call).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
UPSTREAM_SECONDS = Histogram(
    "proxy_upstream_seconds",
    "Time from sending a request upstream until the upstream's response headers.",
    ["upstream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
BACKEND_ERRORS = Counter(
    "proxy_backend_errors",
    "Limiter backend calls that failed (unreachable or timed out), by operation.",
    ["operation"],
    registry=REGISTRY,
)
BACKEND_STATE = Gauge(
    "proxy_backend_state",
    "1 for the backend's current state (ok, or the outage policy in force), 0 for the others.",
    ["state"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
STREAMS_IN_FLIGHT = Gauge(
    "proxy_streams_in_flight",
    "Streamed responses being relayed now.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
CONFIG_RELOADS = Counter(
    "proxy_config_reloads",
    "Configuration reloads, by result (applied or rejected).",
    ["result"],
    registry=REGISTRY,
)

if MULTIPROC_ENV not in os.environ:
    # Per-process collectors only make sense for a single process.
    ProcessCollector(registry=REGISTRY)
    PlatformCollector(registry=REGISTRY)
    GCCollector(registry=REGISTRY)

_DIMS = ("input_tokens", "output_tokens")
_state_children: dict[str, Gauge] = {}
_backend_state: list[str] = []
_error_children: dict[str, Counter] = {}


def set_backend_state(state: str) -> None:
    """The hook for the backend's outage handling: ``ok``, or the policy in force
    (``fail_closed``, ``fail_open``, ``local``). Keep the set of states small."""
    if _backend_state and _backend_state[0] == state:
        return
    for name, child in _state_children.items():
        if name != state:
            child.set(0)
    child = _state_children.get(state)
    if child is None:
        child = _state_children[state] = BACKEND_STATE.labels(state)
    child.set(1)
    _backend_state[:] = [state]


def backend_state() -> str | None:
    return _backend_state[0] if _backend_state else None


def record_backend_error(operation: str) -> None:
    """Count one failed backend call (``reserve``, ``reconcile``, ``peek``, ``reset``, ``ping``)."""
    child = _error_children.get(operation)
    if child is None:
        child = _error_children[operation] = BACKEND_ERRORS.labels(operation)
    child.inc()


def stream_gauge(delta: int) -> None:
    STREAMS_IN_FLIGHT.inc(delta)


class ModelLabels:
    """The model label with bounded cardinality: a model named in some key's ``models`` or as a
    literal route, the pattern of the glob route it matches, else ``other``."""

    _CACHE_MAX = 4096

    def __init__(self, cfg: Config) -> None:
        exact: set[str] = set()
        for k in cfg.keys:
            exact.update(k.models)
        self.globs = []
        for pattern in cfg.routes:
            if any(ch in pattern for ch in "*?["):
                self.globs.append(pattern)
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self._cache: dict[str, str] = {}

    def __call__(self, model: str | None) -> str:
        if model is None:
            return "-"
        label = self._cache.get(model)
        if label is None:
            if model in self.exact:
                label = model
            else:
                label = next((g for g in self.globs if fnmatch.fnmatchcase(model, g)), "other")
            if len(self._cache) < self._CACHE_MAX:  # the cache is bounded too
                self._cache[model] = label
        return label


class Recorder:
    """Turns finished exchanges into metric updates, with the label children bound once."""

    def __init__(self, cfg: Config) -> None:
        self.models = ModelLabels(cfg)
        self._requests: dict[tuple[str, str, str, str], Counter] = {}
        self._tokens: dict[str, tuple[Counter, ...]] = {}
        self._upstreams: dict[str, Histogram] = {}

    def configure(self, cfg: Config) -> None:
        self.models = ModelLabels(cfg)

    def _token_children(self, key: str) -> tuple[Counter, ...]:
        children = self._tokens.get(key)
        if children is None:
            children = self._tokens[key] = tuple(
                metric.labels(key, dim)
                for metric in (TOKENS_RESERVED, TOKENS_CHARGED, TOKENS_REFUNDED)
                for dim in _DIMS
            )
        return children

    def finish(self, ex: Exchange) -> None:
        endpoint = ex.endpoint
        if endpoint is None or endpoint == "admin":
            return
        key = ex.key or "-"
        labels = (key, self.models(ex.model), endpoint, ex.outcome)
        child = self._requests.get(labels)
        if child is None:
            child = self._requests[labels] = REQUESTS.labels(*labels)
        child.inc()
        if ex.decision_s is not None:
            DECISION_SECONDS.observe(ex.decision_s)
        if ex.upstream_s is not None and ex.upstream is not None:
            hist = self._upstreams.get(ex.upstream)
            if hist is None:
                hist = self._upstreams[ex.upstream] = UPSTREAM_SECONDS.labels(ex.upstream)
            hist.observe(ex.upstream_s)
        reserved, charged = ex.reserved(), ex.charged()
        if reserved is None and charged is None:
            return
        r_in, r_out, c_in, c_out, f_in, f_out = self._token_children(key)
        if reserved is not None:
            r_in.inc(reserved[1])
            r_out.inc(reserved[2])
        if charged is not None:
            c_in.inc(charged[1])
            c_out.inc(charged[2])
            if reserved is not None:
                f_in.inc(max(0, reserved[1] - charged[1]))
                f_out.inc(max(0, reserved[2] - charged[2]))


def mark_process_dead() -> None:
    """At a worker's exit: drop its live gauges from the merged view."""
    if MULTIPROC_ENV in os.environ:
        multiprocess.mark_process_dead(os.getpid())


def exposition() -> bytes:
    if MULTIPROC_ENV in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


async def metrics_endpoint(request: Request) -> Response:
    return Response(exposition(), headers={"content-type": CONTENT_TYPE_LATEST})
