"""The exactness check: N proxy nodes share one Redis and one key; overload them, then grade the
limiter from the mock upstream's own request log (the proxy never grades itself)."""

# ``python -m loadtest.exactness [--nodes 3] [--window-s 60] [--windows 3] ...``; exit status 1 on
# a failure. How the log is read, and why it is sound:
#
# * The mock logs ``t``, when it received each request. A request was admitted at ``a <= t``
#   (admission precedes forwarding) and ``t - a <= D``, where D is the longest time any admitted
#   request took as seen by the load generator (it was sent before it was admitted and answered
#   after the mock received it), plus 1 ms for the limiter's millisecond timestamps.
# * So every request the mock received in ``(x - (W - D), x]`` was admitted in ``(x - W, x]``:
#   the mock's sums over windows of ``W - D`` are lower bounds of real admission windows. Any
#   such sum above a limit proves an over-admission (the check), and the largest such sum is a
#   proven lower bound of how full the limiter let a window get (the reach).
# * Full windows of W over the mock's times are not a valid check: one admitted just after an
#   older entry expired can reach the mock less than W after it, if the older one was slower to
#   arrive. They are printed, not graded.
# * Shrinking by D hides nothing here: the load is open loop at ``--overload`` times the
#   admitted rate, so each window's admissions come in one burst of about W / overload followed
#   by a gap of refusals far longer than D, and a window of W - D still covers a whole burst.

from __future__ import annotations

import argparse
import bisect
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from loadtest.config import LoadConfig
from loadtest.generator import run_load_sync
from loadtest.payload import build_prompt
from loadtest.procs import Child, Redis, start_mock, start_proxy, stop_all, write_yaml

KEY = "sk-exactness-0123456789"
WARM_KEY = "sk-exactness-warm-up-0123"  # no limits: warms every node before the graded run
DIMS = ("requests", "input_tokens", "output_tokens")
REACH = 0.99  # a binding limit must be filled to at least this share
FLOOR_S = 0.001  # the limiter's timestamps are whole milliseconds


@dataclass(frozen=True)
class Settings:
    nodes: int = 3
    rpm: int = 600
    input_tpm: int = 30_000
    output_tpm: int = 10_000
    window_s: float = 60.0
    windows: float = 3.0  # run length in windows
    overload: float = 2.5  # offered rate / the rate the limits allow
    prompt_tokens: int = 32
    max_tokens: int = 16
    answer_tokens: int | None = None  # mock answers this many (< max_tokens: reconcile refunds)
    model: str = "gpt-4o-mini"
    processes: int = 1

    @property
    def limits(self) -> tuple[int, int, int]:
        return (self.rpm, self.input_tpm, self.output_tpm)


@dataclass
class DimResult:
    name: str
    limit: int
    binding: bool
    peak: int  # largest sum over any window of W - D (a lower bound of a real window)
    reach_min: int  # smallest per-period peak: every window period got at least this full
    steady_mean: float  # mean sum over windows of W - D ending after the first window
    full_window_peak: int  # largest sum over full windows of W on the mock's times (not graded)
    over: bool = False
    short: bool = False


@dataclass
class Outcome:
    settings: dict
    skew_ms: float
    offered_rps: float
    allowed_per_window: float
    cost: tuple[float, float, float]
    sent: int
    ok: int
    refused: int
    other: dict[str, int]
    mock_requests: int
    mock_non_200: int
    dims: list[DimResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def request_cost(s: Settings) -> tuple[int, int, int]:
    """What one generator request costs: counted like the proxy counts it."""
    from proxy.tokens import TokenCounter

    messages = [{"role": "user", "content": build_prompt(s.prompt_tokens)}]
    answer = s.answer_tokens if s.answer_tokens is not None else s.max_tokens
    return (1, TokenCounter().count_chat(messages, s.model), answer)


def allowed_per_window(limits: tuple[int, ...], cost: tuple[float, ...]) -> float:
    return min(lim / c for lim, c in zip(limits, cost, strict=True) if c > 0)


def node_config(s: Settings, redis_url: str, mock_url: str) -> dict:
    return {
        "backend": {"type": "redis", "url": redis_url, "timeout_ms": 2000},
        "upstreams": {"mock": {"type": "http", "base_url": mock_url + "/v1", "timeout_s": 30}},
        "default_upstream": "mock",
        "window_s": s.window_s,
        "shutdown_grace_s": 2,
        "logging": {"level": "warning", "access_log": False},
        "keys": [
            {
                "name": "exactness",
                "key": KEY,
                "limits": {"rpm": s.rpm, "input_tpm": s.input_tpm, "output_tpm": s.output_tpm},
            },
            {"name": "warm-up", "key": WARM_KEY},
        ],
    }


# -- the analysis (pure: entries in, verdict out) ------------------------------------------------


def window_sums(times: list[float], values: list[int], width: float) -> list[int]:
    """For each entry j (sorted by time): the sum of entries with time in (t_j - width, t_j]."""
    out, total, lo = [], 0, 0
    for j, t in enumerate(times):
        total += values[j]
        while times[lo] <= t - width:
            total -= values[lo]
            lo += 1
        out.append(total)
    return out


def analyze(
    entries: list[tuple[float, int, int]],
    limits: tuple[int, int, int],
    window_s: float,
    skew_s: float,
) -> list[DimResult]:
    """Grade (t, input, output) mock log entries against the limits (see the module doc)."""
    entries = sorted(entries)
    times = [e[0] for e in entries]
    columns = ([1] * len(entries), [e[1] for e in entries], [e[2] for e in entries])
    n = len(entries)
    width = window_s - skew_s
    mean_cost = [sum(c) / n if n else 0.0 for c in columns]
    allowed = allowed_per_window(limits, mean_cost) if n else 0.0
    start, end = (times[0], times[-1]) if n else (0.0, 0.0)
    periods = int((end - start) // window_s)
    results = []
    for name, limit, col, cost in zip(DIMS, limits, columns, mean_cost, strict=True):
        shrunk = window_sums(times, col, width)
        full = window_sums(times, col, window_s)
        # The best window ending inside each whole window period after the first admission.
        per_period = []
        for p in range(periods):
            lo = bisect.bisect_left(times, start + p * window_s)
            hi = bisect.bisect_left(times, start + (p + 1) * window_s)
            per_period.append(max(shrunk[lo:hi], default=0))
        steady = _steady_mean(times, col, width, start + window_s, end)
        results.append(
            DimResult(
                name=name,
                limit=limit,
                binding=n > 0 and allowed * cost >= REACH * limit,
                peak=max(shrunk, default=0),
                reach_min=min(per_period, default=0),
                steady_mean=steady,
                full_window_peak=max(full, default=0),
            )
        )
    for r in results:
        r.over = r.peak > r.limit
        r.short = r.binding and r.reach_min < REACH * r.limit
    return results


def _steady_mean(times: list[float], col: list[int], width: float, lo: float, hi: float) -> float:
    """Mean sum over windows (x - width, x] for x on a fine grid over [lo, hi]."""
    if hi <= lo:
        return math.nan
    prefix = [0]
    for v in col:
        prefix.append(prefix[-1] + v)
    steps = 2000
    total = 0
    for k in range(steps + 1):
        x = lo + (hi - lo) * k / steps
        right = bisect.bisect_right(times, x)
        left = bisect.bisect_right(times, x - width)
        total += prefix[right] - prefix[left]
    return total / (steps + 1)


# -- the run ---------------------------------------------------------------------------------------


def read_mock_log(path: Path, skip: int = 0) -> tuple[list[tuple[float, int, int]], int]:
    entries, non_200 = [], 0
    for line in path.read_bytes().splitlines()[skip:]:
        e = orjson.loads(line)
        if e.get("endpoint") != "/v1/chat/completions":
            continue
        if e["status"] != 200:
            non_200 += 1  # still admitted by the proxy: it counts
        entries.append((float(e["t"]), int(e["prompt_tokens"]), int(e["completion_tokens"])))
    return entries, non_200


def warm_up(nodes: list[Child], s: Settings, log_path: Path) -> int:
    """A few unlimited requests per node (tokenizer loaded, connections open, on the proxies and
    on the mock), so no admitted request of the graded run waits for a cold start. Returns how
    many lines they left in the mock's log."""
    import httpx

    body = {"model": s.model, "messages": [{"role": "user", "content": "warm up"}], "max_tokens": 1}
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {WARM_KEY}"}) as client:
        for node in nodes:
            for _ in range(3):
                client.post(node.url + "/v1/chat/completions", json=body).raise_for_status()
    return len(log_path.read_bytes().splitlines())


def run(s: Settings, out_dir: str | None = None, progress: bool = False) -> Outcome:
    cost = request_cost(s)
    allowed = allowed_per_window(s.limits, cost)
    rate = s.overload * allowed / s.window_s
    children: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="exactness-") as tmp:
        log_path = Path(tmp) / "mock.jsonl"
        try:
            redis = Redis()
            children.append(redis)
            mock = start_mock(str(log_path))
            children.append(mock)
            cfg = write_yaml(node_config(s, redis.url, mock.url), tmp, "node.yaml")
            for _ in range(s.nodes):
                children.append(start_proxy(cfg))
            nodes = children[2:]
            skip = warm_up(nodes, s, log_path)
            headers = ()
            if s.answer_tokens is not None:
                headers = (("x-mock-fault", f"length={s.answer_tokens}"),)
            load = LoadConfig(
                urls=tuple(n.url for n in nodes),
                keys=(KEY,),
                model=s.model,
                prompt_tokens=s.prompt_tokens,
                max_tokens=s.max_tokens,
                headers=headers,
                rate=rate,
                duration=s.windows * s.window_s,
                processes=s.processes,
                timeout=30.0,
                measure_ceiling=False,
                progress=progress,
                label=f"exactness, {s.nodes} nodes",
            )
            results = run_load_sync(load)
        finally:
            stop_all(children)
        entries, non_200 = read_mock_log(log_path, skip)
    if out_dir:
        from loadtest.report import write_outputs
        from loadtest.stats import summarize

        write_outputs(summarize(results), out_dir)
    status, start, end = results["status"], results["start"], results["end"]
    ok_idx = [i for i, st in enumerate(status) if 200 <= st < 300]
    # Sent before admission, answered after the mock received it: a bound on the skew.
    skew = max((end[i] - start[i] for i in ok_idx), default=0.0) + FLOOR_S
    other: dict[str, int] = {}
    for st in status:
        if not (200 <= st < 300 or st == 429):
            other[str(st)] = other.get(str(st), 0) + 1
    outcome = Outcome(
        settings=asdict(s),
        skew_ms=1000 * skew,
        offered_rps=rate,
        allowed_per_window=allowed,
        cost=cost,
        sent=len(status),
        ok=len(ok_idx),
        refused=sum(1 for st in status if st == 429),
        other=other,
        mock_requests=len(entries),
        mock_non_200=non_200,
    )
    outcome.dims = analyze(entries, s.limits, s.window_s, skew)
    if other:
        outcome.problems.append(f"responses other than 2xx/429: {other}: cannot verify")
    if len(entries) != outcome.ok:
        outcome.problems.append(
            f"the mock logged {len(entries)} requests but the generator got {outcome.ok} 2xx"
        )
    if outcome.refused == 0:
        outcome.problems.append("no 429 at all: the load never reached the limits")
    for d in outcome.dims:
        if d.over:
            outcome.problems.append(f"OVER-ADMISSION of {d.name}: {d.peak} > {d.limit}")
        if d.short:
            outcome.problems.append(
                f"{d.name} reached only {d.reach_min} of {d.limit} in some window period "
                f"(< {100 * REACH:g} %)"
            )
    return outcome


# -- presenting ------------------------------------------------------------------------------


def format_outcome(o: Outcome) -> str:
    s = o.settings
    w = s["window_s"]
    lines = [
        f"exactness: {s['nodes']} nodes sharing one Redis, one key: rpm {s['rpm']:,}, input TPM "
        f"{s['input_tpm']:,}, output TPM {s['output_tpm']:,} per {w:g} s window",
        f"load: open loop {o.offered_rps:,.1f} req/s for {s['windows'] * w:g} s "
        f"({s['overload']:g}x the {o.allowed_per_window / w:,.1f} req/s the limits allow); "
        f"request cost {o.cost[0]} request, {o.cost[1]} input, {o.cost[2]} output tokens",
        f"generator: {o.sent:,} sent, {o.ok:,} 2xx, {o.refused:,} 429"
        + (f", other {o.other}" if o.other else "")
        + f"; mock log: {o.mock_requests:,} requests ({o.mock_non_200} non-200)",
        f"skew bound D = {o.skew_ms:.1f} ms (longest admitted request seen by the generator + "
        f"1 ms); graded windows: {w:g} s - D over the mock's receive times",
        "",
        f"{'dimension':<14}{'limit':>9}{'max in window':>22}{'reach (worst period)':>24}"
        f"{'steady mean':>20}{'full-W peak*':>14}",
    ]
    for d in o.dims:

        def pct(v: float, d: DimResult = d) -> str:
            return f"{v:,.0f} ({100 * v / d.limit:6.2f} %)" if d.limit else "-"

        mark = "binding" if d.binding else "       "
        lines.append(
            f"{d.name:<14}{d.limit:>9,}{pct(d.peak):>22}{pct(d.reach_min):>24}"
            f"{pct(d.steady_mean) if d.steady_mean == d.steady_mean else '-':>20}"
            f"{d.full_window_peak:>14,}  {mark}"
        )
    lines.append(
        "* full windows of W on the mock's times, not graded: they can hold a request "
        "admitted just after an older one expired"
    )
    worst = [d for d in o.dims if d.binding]
    if worst:
        over = max(d.peak - d.limit for d in o.dims)
        reach = min(d.reach_min / d.limit for d in worst)
        lines.append(
            f"over-admission: {max(over, 0)} (max over limit, any dimension); "
            f"reach: {100 * reach:.2f} % of the binding limit(s) in every window period"
        )
    lines.append("PASS" if o.passed else "FAIL: " + "; ".join(o.problems))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest exactness", description=__doc__)
    d = Settings()
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--rpm", type=int, default=d.rpm, help="requests per window")
    p.add_argument("--input-tpm", type=int, default=d.input_tpm, help="input tokens per window")
    p.add_argument("--output-tpm", type=int, default=d.output_tpm, help="output tokens per window")
    p.add_argument("--window-s", type=float, default=d.window_s)
    p.add_argument("--windows", type=float, default=d.windows, help="run length in windows")
    p.add_argument("--overload", type=float, default=d.overload, help="offered / allowed rate")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument(
        "--answer-tokens",
        type=int,
        default=None,
        help="the mock answers this many tokens (below --max-tokens: reconciliation refunds)",
    )
    p.add_argument("--processes", type=int, default=d.processes, help="generator processes")
    p.add_argument("--out", help="also write the load report (results.json, report.html) here")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("--progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.overload <= 1:
        print("error: --overload must be > 1 (the load must exceed the limits)", file=sys.stderr)
        return 2
    s = Settings(
        nodes=a.nodes,
        rpm=a.rpm,
        input_tpm=a.input_tpm,
        output_tpm=a.output_tpm,
        window_s=a.window_s,
        windows=a.windows,
        overload=a.overload,
        prompt_tokens=a.prompt_tokens,
        max_tokens=a.max_tokens,
        answer_tokens=a.answer_tokens,
        processes=a.processes,
    )
    outcome = run(s, a.out, progress=a.progress)
    if a.json:
        print(json.dumps({**asdict(outcome), "passed": outcome.passed}, indent=2))
    else:
        print(format_outcome(outcome))
    return 0 if outcome.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
