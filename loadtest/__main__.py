"""Command line: ``python -m loadtest run|ceiling|report|trivial-server``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loadtest.config import ENDPOINTS, PICKS, ConfigError, LoadConfig


def _header(value: str) -> tuple[str, str]:
    name, sep, val = value.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"header {value!r} is not 'Name: value'")
    return name.strip(), val.strip()


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="drive load at one or more nodes and report")
    t = p.add_argument_group("target")
    t.add_argument(
        "--url",
        action="append",
        dest="urls",
        metavar="URL",
        help="node base URL, e.g. http://127.0.0.1:8000 (repeatable)",
    )
    t.add_argument("--pick", choices=PICKS, default="round-robin", help="node choice per request")
    t.add_argument(
        "--key",
        action="append",
        dest="keys",
        metavar="KEY",
        help="client API key, used round-robin (repeatable)",
    )
    t.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow non-loopback targets (off: loopback only)",
    )
    r = p.add_argument_group("request")
    r.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat")
    r.add_argument("--stream", action="store_true", help="ask for server-sent events")
    r.add_argument("--prompt-tokens", type=int, default=32, help="approximate prompt size")
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--model", default="mock-model")
    r.add_argument(
        "--header",
        action="append",
        type=_header,
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header (repeatable)",
    )
    r.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    m = p.add_argument_group("load")
    m.add_argument("--concurrency", type=int, default=8, help="closed loop workers")
    m.add_argument("--rate", type=float, help="open loop: requests per second on a fixed schedule")
    m.add_argument("--max-inflight", type=int, default=10_000, help="open loop cap")
    m.add_argument("--duration", type=float, help="seconds (default 10 unless --requests)")
    m.add_argument("--requests", type=int, help="total request count")
    m.add_argument("--processes", type=int, default=1, help="generator processes")
    m.add_argument(
        "--retries", type=int, default=2, help="retries of a connection failure on another node"
    )
    m.add_argument(
        "--eject-s",
        type=float,
        default=1.0,
        help="avoid a node this long after it refused a connection",
    )
    m.add_argument("--seed", type=int, default=1)
    f = p.add_argument_group("failure switch")
    f.add_argument("--kill-at", type=float, metavar="S", help="second of the run to kill at")
    f.add_argument("--kill-pid", type=int, metavar="PID")
    f.add_argument("--kill-signal", default="TERM", choices=("TERM", "KILL", "INT"))
    f.add_argument("--restart-at", type=float, metavar="S")
    f.add_argument("--restart-cmd", metavar="CMD", help="command line that brings it back")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="write results.json and report.html here")
    o.add_argument("--progress", action="store_true", help="live line on stderr even if no TTY")
    o.add_argument("--label", default="", help="title for the report")
    o.add_argument("--json", action="store_true", help="print the summary JSON, not the table")
    c = o.add_mutually_exclusive_group()
    c.add_argument("--ceiling-rps", type=float, help="known generator ceiling, skip measuring")
    c.add_argument("--no-ceiling", action="store_true", help="do not measure the ceiling")
    o.add_argument("--ceiling-duration", type=float, default=2.0)
    p.set_defaults(func=_cmd_run)


def _cmd_run(a: argparse.Namespace) -> int:
    from loadtest.generator import run_load_sync
    from loadtest.report import format_table, write_outputs
    from loadtest.stats import summarize

    try:
        cfg = LoadConfig(
            urls=tuple(a.urls or ("http://127.0.0.1:8000",)),
            keys=tuple(a.keys or ("sk-test",)),
            pick=a.pick,
            endpoint=a.endpoint,
            stream=a.stream,
            prompt_tokens=a.prompt_tokens,
            max_tokens=a.max_tokens,
            model=a.model,
            headers=tuple(a.header),
            concurrency=a.concurrency,
            rate=a.rate,
            max_inflight=a.max_inflight,
            duration=a.duration,
            requests=a.requests,
            processes=a.processes,
            timeout=a.timeout,
            retries=a.retries,
            eject_s=a.eject_s,
            seed=a.seed,
            kill_at=a.kill_at,
            kill_pid=a.kill_pid,
            kill_signal=a.kill_signal,
            restart_at=a.restart_at,
            restart_cmd=a.restart_cmd,
            ceiling_rps=a.ceiling_rps,
            measure_ceiling=not a.no_ceiling,
            ceiling_duration=a.ceiling_duration,
            progress=a.progress or sys.stderr.isatty(),
            allow_remote=a.allow_remote,
            label=a.label,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_load_sync(cfg)
    summary = summarize(results)
    if a.out:
        json_path, html_path = write_outputs(summary, a.out)
    if a.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_table(summary))
        if a.out:
            print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_ceiling(a: argparse.Namespace) -> int:
    from loadtest.ceiling import measure

    rps = measure(processes=a.processes, duration=a.duration, concurrency=a.concurrency)
    if a.json:
        print(json.dumps({"ceiling_rps": rps, "processes": a.processes, "duration": a.duration}))
    else:
        print(f"generator ceiling: {rps:,.0f} req/s ({a.processes} process(es), {a.duration:g} s)")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from loadtest.report import format_table, write_outputs

    summary = json.loads((Path(a.dir) / "results.json").read_text())
    write_outputs(summary, a.dir)
    print(format_table(summary))
    return 0


def _cmd_trivial(a: argparse.Namespace) -> int:
    from loadtest.ceiling import serve_trivial
    from loadtest.generator import run_coroutine

    run_coroutine(serve_trivial(a.port, a.max_seconds))
    return 0


# Commands with their own argument parsers, in their own modules.
_DELEGATED = {"bench": "bench", "exactness": "exactness", "redis-server": "redis_server"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _DELEGATED:
        import importlib

        module = importlib.import_module(f"loadtest.{_DELEGATED[argv[0]]}")
        return int(module.main(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__,
        epilog="also: bench, exactness, redis-server (each with its own --help)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    c = sub.add_parser("ceiling", help="measure the generator's own requests/s ceiling")
    c.add_argument("--duration", type=float, default=3.0)
    c.add_argument("--processes", type=int, default=1)
    c.add_argument("--concurrency", type=int)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_cmd_ceiling)
    r = sub.add_parser("report", help="re-render report.html from DIR/results.json")
    r.add_argument("dir")
    r.set_defaults(func=_cmd_report)
    s = sub.add_parser("trivial-server", help="the fixed-answer server the ceiling runs against")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--max-seconds", type=float, default=120.0)
    s.set_defaults(func=_cmd_trivial)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
