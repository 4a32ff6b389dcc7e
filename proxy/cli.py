"""Command line: serve, mock-upstream, check-config, hash-key."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile

from .config import Config, ConfigError, HttpUpstream, MockUpstream, hash_key, load_config

_CONFIG_ENV = "PROXY_CONFIG_FILE"
_METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _loop() -> str:
    if sys.platform == "win32":
        try:
            import winloop  # noqa: F401
        except ImportError:
            return "asyncio"
        return "winloop:new_event_loop"
    return "auto"  # uvloop when installed


GC_THRESHOLD = (10_000, 10, 10)  # the first generation only is larger than Python's (700, 10, 10)


def tune_gc() -> None:
    """Move everything loaded so far out of the collector's sight, and collect the youngest
    objects less often.

    A request allocates a few hundred tracked objects, so with Python's defaults the collector
    ran several times a second and, each time enough objects had survived, walked the whole
    heap (modules, configuration, tokenizer): a share of every request's CPU, and pauses that
    were most of p99 at 32 concurrent requests (README, Performance).
    Frozen objects are never collected: a reference cycle in the start-up configuration
    outlives a hot reload that replaces it, once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def app_factory():  # called by uvicorn in every worker
    from .accesslog import setup_logging
    from .app import create_app

    if hasattr(signal, "SIGHUP"):
        # Until the app's lifespan takes SIGHUP (reload), an early one must not kill the worker.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    path = os.environ[_CONFIG_ENV]
    cfg = load_config(path)
    setup_logging(cfg.logging)
    app = create_app(cfg, config_path=path)
    tune_gc()
    return app


def _serve_workers(workers: int, options: dict) -> int:
    import uvicorn

    from .reload import forwarding_supervisor

    # Every worker writes its metrics to files in one fresh directory; /metrics merges them.
    base = os.environ.get(_METRICS_ENV)
    metrics_dir = tempfile.mkdtemp(
        prefix="proxy-metrics-", dir=base if base and os.path.isdir(base) else None
    )
    os.environ[_METRICS_ENV] = metrics_dir  # inherited by the workers, set before they start
    try:
        config = uvicorn.Config("proxy.cli:app_factory", workers=workers, **options)
        sock = config.bind_socket()
        forwarding_supervisor(config, [sock]).run()
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1 and cfg.backend.type == "memory":
        print(
            "error: the memory backend lives inside one process; with --workers "
            f"{args.workers} every worker would enforce its own copy of each limit "
            f"({args.workers}x the configured rate). Use --workers 1, or backend type redis.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    os.environ[_CONFIG_ENV] = os.path.abspath(args.config)
    logging.basicConfig(level=cfg.logging.level.upper(), format="%(message)s")
    options = dict(
        factory=True,
        host=args.host,
        port=args.port,
        loop=_loop(),
        http="auto",
        lifespan="on",
        access_log=False,
        log_level=cfg.logging.level,
        timeout_graceful_shutdown=cfg.shutdown_grace_s,
        server_header=False,
    )
    if args.workers > 1:
        return _serve_workers(args.workers, options)
    uvicorn.run("proxy.cli:app_factory", **options)
    return 0


def _mock(args: argparse.Namespace) -> int:
    from .mock import MockSettings, mock_main

    mock_main(
        args.host,
        args.port,
        MockSettings(
            latency_ms=args.latency_ms,
            tokens_per_second=args.tokens_per_second,
            chunk_tokens=args.chunk_tokens,
            log_path=args.log,
        ),
    )
    return 0


def summary(cfg: Config, source: str) -> str:
    def lim(limits) -> str:
        parts = [
            f"{name} {v}" if v is not None else f"{name} unlimited"
            for name, v in (
                ("rpm", limits.rpm),
                ("input_tpm", limits.input_tpm),
                ("output_tpm", limits.output_tpm),
            )
        ]
        return ", ".join(parts)

    lines = [f"{source}: OK", f"backend: {cfg.backend.type}"]
    if cfg.backend.type == "redis":
        b = cfg.backend
        form = "cluster" if b.cluster else "sentinel" if b.sentinels else "single"
        lines[-1] += f" ({form}, outage policy {b.outage_policy}, timeout {b.timeout_ms} ms)"
    lines.append(
        f"window: {cfg.window_s:g} s; output reservation default: "
        f"{cfg.output_reservation_default} tokens"
    )
    lines.append("upstreams:")
    for name, up in cfg.upstreams.items():
        mark = " (default)" if name == cfg.default_upstream else ""
        if isinstance(up, MockUpstream):
            lines.append(f"  {name}: built-in mock{mark}")
        elif isinstance(up, HttpUpstream):
            key = f", key from ${up.api_key_env}" if up.api_key_env else ", no key"
            lines.append(f"  {name}: {up.base_url}{key}{mark}")
    if cfg.routes:
        lines.append("routes:")
        lines.extend(f"  {pattern} -> {name}" for pattern, name in cfg.routes.items())
    lines.append(f"keys ({len(cfg.keys)}):")
    for k in cfg.keys:
        lines.append(f"  {k.name}: {lim(k.limits)}")
        for model, ml in k.models.items():
            lines.append(f"    model {model}: {lim(ml)}")
    return "\n".join(lines)


def _check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(cfg, args.file))
    return 0


def _hash(args: argparse.Namespace) -> int:
    print(hash_key(args.key))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", required=True, help="YAML configuration file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(fn=_serve)

    m = sub.add_parser("mock-upstream", help="run the built-in mock upstream as a server")
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=int, default=9000)
    m.add_argument("--latency-ms", type=float, default=0.0)
    m.add_argument("--tokens-per-second", type=float, default=0.0)
    m.add_argument("--chunk-tokens", type=int, default=1)
    m.add_argument("--log", default=None, help="append one JSON line per finished request")
    m.set_defaults(fn=_mock)

    c = sub.add_parser("check-config", help="validate a configuration and summarise it")
    c.add_argument("file")
    c.set_defaults(fn=_check)

    h = sub.add_parser("hash-key", help="print the SHA-256 form of a client key")
    h.add_argument("key")
    h.set_defaults(fn=_hash)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.fn(args)
