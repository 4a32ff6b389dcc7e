"""Results -> a JSON-able summary: totals, percentiles, status counts, per-second series.

Latency is measured from the intended send time (in closed loop that is the actual send
time), over 2xx responses. Per-second series bin requests by the second they were meant to be
sent, except throughput, which bins completions by the second they finished.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from loadtest.classify import DIM_NAMES, DIM_UNKNOWN
from loadtest.results import STATUS_NAMES, Results

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))
_CDF_QUANTILES = tuple(
    sorted(
        {i / 200 for i in range(201)}
        | {0.99 + i / 1000 for i in range(10)}
        | {0.999 + i / 10000 for i in range(10)}
    )
)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in [0, 1])."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    return sorted_values[min(n - 1, max(0, math.ceil(q * n) - 1))]


def latency_stats(values_s: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, p50..p99.9, max in milliseconds (None when there are no values)."""
    vals = sorted(values_s)
    out: dict[str, float | int | None] = {"count": len(vals)}
    if not vals:
        out.update({k: None for k in ("mean", "min", *(n for n, _ in PERCENTILES), "max")})
        return out
    out["mean"] = 1000.0 * sum(vals) / len(vals)
    out["min"] = 1000.0 * vals[0]
    for name, q in PERCENTILES:
        out[name] = 1000.0 * percentile(vals, q)
    out["max"] = 1000.0 * vals[-1]
    return out


def status_label(status: int, dim: int) -> str:
    if status == 429:
        return f"429 {DIM_NAMES.get(dim, 'unknown')}"
    if status < 0:
        return STATUS_NAMES.get(status, f"error {status}")
    return str(status)


def status_class(status: int) -> str:
    """One of ok / 429 / 4xx / 5xx / conn for the stacked charts."""
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "429"
    if status < 0:
        return "conn"
    if status >= 500:
        return "5xx"
    return "4xx"


def _status_sort_key(label: str) -> tuple[int, str]:
    head = label.split(" ", 1)[0]
    return (int(head) if head.isdigit() else 1000, label)


def _distribution(values_s: list[float]) -> dict[str, object]:
    """CDF points (ms, quantile) and a log-spaced histogram, for the report's chart."""
    if not values_s:
        return {"cdf": [], "histogram": {"edges_ms": [], "counts": []}}
    vals = sorted(values_s)
    cdf = [[round(1000.0 * percentile(vals, q), 4), q] for q in _CDF_QUANTILES if q > 0]
    lo = max(vals[0] * 1000.0, 0.001)
    hi = max(vals[-1] * 1000.0, lo * 1.01)
    nb = 40
    ratio = (hi / lo) ** (1.0 / nb)
    edges = [lo * ratio**k for k in range(nb + 1)]
    counts = [0] * nb
    log_lo, log_ratio = math.log(lo), math.log(ratio)
    for v in vals:
        ms = max(v * 1000.0, lo)
        counts[min(nb - 1, int((math.log(ms) - log_lo) / log_ratio))] += 1
    return {"cdf": cdf, "histogram": {"edges_ms": [round(e, 4) for e in edges], "counts": counts}}


def _series(res: Results, seconds: int, is_stream: bool) -> dict[str, list[float | None]]:
    classes = ("ok", "429", "4xx", "5xx", "conn")
    counts = {c: [0] * seconds for c in classes}
    done = [0] * seconds
    done_ok = [0] * seconds
    retries = [0] * seconds
    lat: list[list[float]] = [[] for _ in range(seconds)]
    ttfb: list[list[float]] = [[] for _ in range(seconds)]
    by_dim = {d: [0] * seconds for d in DIM_NAMES}
    cols = res.columns
    last = seconds - 1
    for intended, end, first, status, dim, r in zip(
        cols["intended"],
        cols["end"],
        cols["first"],
        cols["status"],
        cols["dim"],
        cols["retries"],
        strict=True,
    ):
        s = min(last, max(0, int(intended)))
        cls = status_class(status)
        counts[cls][s] += 1
        if cls == "429":
            by_dim[dim if dim in by_dim else DIM_UNKNOWN][s] += 1
        retries[s] += r
        e = min(last, max(0, int(end)))
        done[e] += 1
        if cls == "ok":
            done_ok[e] += 1
            lat[s].append(end - intended)
            if is_stream and first == first:  # not NaN
                ttfb[s].append(first - intended)
    sent = [sum(counts[c][s] for c in classes) for s in range(seconds)]
    out: dict[str, list[float | None]] = {"t": list(range(seconds))}
    out["sent"] = sent
    for c in classes:
        out[c] = counts[c]
    for d, name in DIM_NAMES.items():
        out[f"429_{name}"] = by_dim[d]
    out["retries"] = retries
    out["success_rate"] = [(counts["ok"][s] / sent[s]) if sent[s] else None for s in range(seconds)]
    out["availability"] = [
        ((sent[s] - counts["5xx"][s] - counts["conn"][s]) / sent[s]) if sent[s] else None
        for s in range(seconds)
    ]
    out["completed_rps"] = done
    out["ok_rps"] = done_ok
    for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99), ("max_ms", 1.0)):
        out[name] = [
            1000.0 * percentile(sorted(v), q) if v else None for v in lat
        ]  # sorted per call: seconds are small groups
    if is_stream:
        out["ttfb_p50_ms"] = [1000.0 * percentile(sorted(v), 0.5) if v else None for v in ttfb]
    return out


def summarize(res: Results) -> dict[str, object]:
    cols = res.columns
    cfg = res.config
    n = len(res)
    is_stream = bool(cfg.get("stream"))
    statuses = cols["status"]
    labels = Counter(status_label(s, d) for s, d in zip(statuses, cols["dim"], strict=True))
    ok_idx = [i for i, s in enumerate(statuses) if 200 <= s < 300]
    intended, start, end, first = cols["intended"], cols["start"], cols["end"], cols["first"]
    latency = [end[i] - intended[i] for i in ok_idx]
    service = [end[i] - start[i] for i in ok_idx]
    ttfb = [first[i] - intended[i] for i in ok_idx if first[i] == first[i]]
    elapsed = res.elapsed_s or (max(end) if n else 0.0)
    retries = list(cols["retries"])
    tok_in = [v for v in cols["tok_in"] if v >= 0]
    tok_out = [v for v in cols["tok_out"] if v >= 0]
    urls = list(cfg.get("urls", ()))  # type: ignore[call-overload]
    node_counts = Counter(cols["node"])
    node_ok = Counter(cols["node"][i] for i in ok_idx)
    # One bin per second of the run; a last partial second shorter than half a second (the
    # tail of in-flight requests) joins the one before, so it does not show as a false drop.
    span = max(elapsed, max(end) if n else 0.0)
    seconds = max(1, math.ceil(span) if span - math.floor(span) >= 0.5 else math.floor(span))
    errors = sum(1 for s in statuses if s >= 500 or s < 0)
    totals: dict[str, object] = {
        "requests": n,
        "ok": len(ok_idx),
        "success_rate": len(ok_idx) / n if n else None,
        "rate_limited": sum(1 for s in statuses if s == 429),
        "errors": errors,
        # Share answered without a server error or a lost connection (429s count as answered).
        "availability": (n - errors) / n if n else None,
        "retries": sum(retries),
        "retried_requests": sum(1 for r in retries if r),
        "elapsed_s": elapsed,
        "throughput_rps": n / elapsed if elapsed > 0 else None,
        "ok_rps": len(ok_idx) / elapsed if elapsed > 0 else None,
    }
    if cfg.get("mode") == "open" and n:
        totals["offered_rps"] = cfg.get("rate")
        lag = sorted(start[i] - intended[i] for i in range(n) if start[i] == start[i])
        totals["send_lag_p99_ms"] = 1000.0 * percentile(lag, 0.99)
    ceiling = res.ceiling_rps
    summary: dict[str, object] = {
        "config": cfg,
        "processes": res.processes,
        "ceiling_rps": ceiling,
        "ceiling_source": res.ceiling_source,
        "near_ceiling": bool(
            ceiling and totals["throughput_rps"] and totals["throughput_rps"] > 0.7 * ceiling
        ),  # type: ignore[operator]
        "totals": totals,
        "status": dict(sorted(labels.items(), key=lambda kv: _status_sort_key(kv[0]))),
        "latency_ms": latency_stats(latency),
        "service_ms": latency_stats(service),
        "ttfb_ms": latency_stats(ttfb) if is_stream else None,
        "tokens": {
            "sent": sum(tok_in),
            "received": sum(tok_out),
            "responses_with_usage": len(tok_in),
            "sent_estimated": int(cfg.get("prompt_tokens", 0)) * n,  # type: ignore[call-overload]
        },
        "bytes": {"sent": sum(cols["bytes_out"]), "received": sum(cols["bytes_in"])},
        "nodes": [
            {"url": u, "requests": node_counts.get(k, 0), "ok": node_ok.get(k, 0)}
            for k, u in enumerate(urls)
        ],
        "events": [
            {"t": round(e.t, 4), "kind": e.kind, "detail": e.detail, "pid": e.pid}
            for e in res.events
        ],
        "timeseries": _series(res, seconds, is_stream),
        "distribution": _distribution(latency),
    }
    return summary
