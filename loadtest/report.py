"""Presenting a run summary: the terminal table, results.json and a self-contained report.html."""

from __future__ import annotations

import html
import time
from pathlib import Path

import orjson

from loadtest import svgchart as sc

C_OK = "#2e9d5b"
C_429 = ("#f2b134", "#e8743b", "#b5562a", "#c9a66b")  # requests, input, output, unknown
C_4XX = "#8e6cc9"
C_5XX = "#d64545"
C_CONN = "#5b6270"
C_P50 = "#2f6fd6"
C_P99 = "#d6452f"
C_MAX = "#9aa1ad"


def _ms(v: object) -> str:
    return "-" if v is None else f"{float(v):,.2f}"  # type: ignore[arg-type]


def _ms_card(v: object) -> str:
    """Milliseconds with as many decimals as fit a card: 0.412, 4.12, 41.2, 412."""
    if v is None:
        return "-"
    x = float(v)  # type: ignore[arg-type]
    return (
        f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"
    )


def _int(v: object) -> str:
    return f"{int(v):,}"  # type: ignore[call-overload]


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def describe_run(s: dict) -> str:
    cfg = s["config"]
    if cfg["mode"] == "open":
        loop = f"open loop {cfg['rate']:g} req/s (max in flight {cfg['max_inflight']:,})"
    else:
        loop = f"closed loop, concurrency {cfg['concurrency']}"
    bounds = []
    if cfg.get("duration"):
        bounds.append(f"{cfg['duration']:g} s")
    if cfg.get("requests"):
        bounds.append(f"{cfg['requests']:,} requests")
    nodes = len(cfg["urls"])
    return (
        f"{loop}; {' / '.join(bounds)}; {cfg['endpoint']}"
        f"{' (stream)' if cfg['stream'] else ''}, ~{cfg['prompt_tokens']} prompt tokens, "
        f"max_tokens {cfg['max_tokens']}; {nodes} node{'s' if nodes != 1 else ''} "
        f"({cfg['pick']}), {cfg['key_count']} key{'s' if cfg['key_count'] != 1 else ''}, "
        f"{s['processes']} process{'es' if s['processes'] != 1 else ''}"
    )


def ceiling_text(s: dict) -> str:
    c = s.get("ceiling_rps")
    if not c:
        return "not measured"
    return f"{c:,.0f} req/s ({s.get('ceiling_source', 'measured')})"


def format_table(s: dict) -> str:
    """The end-of-run table for stdout."""
    t = s["totals"]
    lat = s["latency_ms"]
    rows: list[tuple[str, str]] = [
        ("run", describe_run(s)),
        ("generator ceiling", ceiling_text(s)),
        ("requests", f"{_int(t['requests'])}  (retried {_int(t['retried_requests'])}, "
                     f"retries {_int(t['retries'])})"),
        ("success (2xx)", "-" if t["success_rate"] is None else f"{100 * t['success_rate']:.2f} %"
                          + ("" if t["availability"] is None else
                             f"  (answered without 5xx / lost: {100 * t['availability']:.2f} %)")),
        ("throughput", f"{(t['throughput_rps'] or 0):,.1f} req/s  (2xx {(t['ok_rps'] or 0):,.1f}/s)"
                       f" over {t['elapsed_s']:.2f} s"),
    ]  # fmt: skip
    if "offered_rps" in t:
        rows.append(
            ("offered", f"{t['offered_rps']:g} req/s, send lag p99 {_ms(t['send_lag_p99_ms'])} ms")
        )
    rows.append(("latency ms (2xx)", _pcts(lat)))
    if s["config"]["mode"] == "open":
        rows.append(("service ms (2xx)", _pcts(s["service_ms"]) + "  (from actual send)"))
    if s.get("ttfb_ms"):
        rows.append(("ttfb ms (stream)", _pcts(s["ttfb_ms"])))
    status = "  ".join(f"{k}: {_int(v)}" for k, v in s["status"].items()) or "-"
    rows.append(("status", status))
    tok = s["tokens"]
    rows.append(
        (
            "tokens",
            f"sent {_int(tok['sent'])}  received {_int(tok['received'])}  "
            f"(usage on {_int(tok['responses_with_usage'])} responses; "
            f"~{_int(tok['sent_estimated'])} sent by prompt size)",
        )
    )
    rows.append(
        ("bytes", f"sent {_bytes(s['bytes']['sent'])}  received {_bytes(s['bytes']['received'])}")
    )
    if len(s["nodes"]) > 1:
        per_node = (f"{n['url']}: {_int(n['ok'])}/{_int(n['requests'])}" for n in s["nodes"])
        rows.append(("per node (2xx/all)", "  ".join(per_node)))
    for e in s["events"]:
        rows.append((f"at {e['t']:.2f} s", f"{e['kind']}: {e['detail']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if s.get("near_ceiling"):
        lines.append(
            "WARNING: throughput is above 70 % of the generator ceiling; the generator may be "
            "the bottleneck (add --processes or use a bigger machine)."
        )
    return "\n".join(lines)


def _pcts(lat: dict) -> str:
    if not lat or not lat.get("count"):
        return "-"
    return "  ".join(f"{k} {_ms(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))


def write_outputs(summary: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """results.json and report.html into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    json_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    html_path = out / "report.html"
    html_path.write_text(render_html(summary), encoding="utf-8")
    return json_path, html_path


# -- HTML ------------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2430;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif}
header{background:#1f2a3c;color:#fff;padding:22px 32px 18px}
header h1{margin:0 0 4px;font-size:21px;font-weight:600}
header p{margin:0;color:#c5cedd;font-size:13px}
main{max-width:1360px;margin:0 auto;padding:20px 24px 40px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(124px,1fr));gap:10px;margin-bottom:18px}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px rgba(0,0,0,.07)}
.card .k{font-size:11.5px;text-transform:uppercase;letter-spacing:.04em;color:#6b7280}
.card .v{font-size:20px;font-weight:600;margin-top:2px}
.card .s{font-size:12px;color:#6b7280}
.good .v{color:#2e9d5b}.warn .v{color:#c9761b}.bad .v{color:#d64545}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:14px}
.panel{background:#fff;border-radius:8px;padding:12px 14px 8px;box-shadow:0 1px 2px rgba(0,0,0,.07)}
.panel h2{font-size:14px;margin:0 0 2px;font-weight:600}
.panel p.note{margin:0 0 6px;font-size:12px;color:#6b7280}
table{border-collapse:collapse;width:100%;font-size:13px}
td,th{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:left;vertical-align:top}
th{color:#6b7280;font-weight:500;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff4e0;border:1px solid #f0c27a;color:#7a4a06;border-radius:8px;
 padding:10px 14px;margin-bottom:14px}
footer{color:#8a919c;font-size:12px;margin-top:22px}
"""


def _card(key: str, value: str, sub: str = "", cls: str = "") -> str:
    return (
        f"<div class='card {cls}'><div class='k'>{html.escape(key)}</div>"
        f"<div class='v'>{html.escape(value)}</div><div class='s'>{html.escape(sub)}</div></div>"
    )


def _panel(title: str, svg: str, note: str = "") -> str:
    n = f"<p class='note'>{html.escape(note)}</p>" if note else ""
    return f"<section class='panel'><h2>{html.escape(title)}</h2>{n}{svg}</section>"


def _table(rows: list[tuple[str, str]], numeric: bool = False) -> str:
    cls = " class='n'" if numeric else ""
    body = "".join(
        f"<tr><th>{html.escape(k)}</th><td{cls}>{html.escape(v)}</td></tr>" for k, v in rows
    )
    return f"<table>{body}</table>"


def _markers(s: dict) -> list[sc.Marker]:
    colors = {"kill": "#c0392b", "restart": "#1e8449"}
    return [
        sc.Marker(e["t"], f"{e['kind']} {e['t']:.1f}s", colors.get(e["kind"], "#7d3c98"))
        for e in s["events"]
    ]


def _grade(share: float | None) -> str:
    if share is None:
        return ""
    return "good" if share >= 0.99 else "warn" if share >= 0.9 else "bad"


def _share_floor(*series: list) -> float:
    """Lower edge of the success chart: zoomed in when every second is high, so a dip of a
    few percent through a failure is visible."""
    lows = [v for ser in series for v in ser if v is not None]
    low = min(lows, default=0.0)
    for floor in (0.98, 0.95, 0.9, 0.8, 0.5):
        if low >= floor + (1 - floor) * 0.1:
            return floor
    return 0.0


def render_html(s: dict) -> str:
    t = s["totals"]
    lat = s["latency_ms"]
    ts = s["timeseries"]
    cfg = s["config"]
    marks = _markers(s)
    sr = t["success_rate"]
    sr_cls = _grade(sr)
    av = t["availability"]
    cards = [
        _card("requests", _int(t["requests"]), f"{_int(t['retries'])} retries"),
        _card("success (2xx)", "-" if sr is None else f"{100 * sr:.2f}%",
              f"{_int(t['rate_limited'])} rate limited, {_int(t['errors'])} errors", sr_cls),
        _card("availability", "-" if av is None else f"{100 * av:.2f}%",
              "answered, not 5xx / lost", _grade(av)),
        _card("throughput", f"{(t['throughput_rps'] or 0):,.0f}/s",
              f"2xx {(t['ok_rps'] or 0):,.0f}/s over {t['elapsed_s']:.1f} s"),
        _card("latency p50", f"{_ms_card(lat['p50'])} ms", f"p90 {_ms(lat['p90'])} ms"),
        _card("latency p99", f"{_ms_card(lat['p99'])} ms", f"p99.9 {_ms(lat['p99.9'])} ms"),
        _card("latency max", f"{_ms_card(lat['max'])} ms", f"mean {_ms(lat['mean'])} ms"),
    ]  # fmt: skip
    if s.get("ttfb_ms") and s["ttfb_ms"].get("count"):
        tt = s["ttfb_ms"]
        cards.append(_card("TTFB p50", f"{_ms_card(tt['p50'])} ms", f"p99 {_ms(tt['p99'])} ms"))
    cards.append(
        _card(
            "generator ceiling",
            f"{s['ceiling_rps']:,.0f}/s" if s.get("ceiling_rps") else "-",
            s.get("ceiling_source", "") if s.get("ceiling_rps") else "not measured",
            "warn" if s.get("near_ceiling") else "",
        )
    )
    banner = ""
    if s.get("near_ceiling"):
        banner = (
            "<div class='banner'>Throughput is above 70&nbsp;% of the generator ceiling: the "
            "load generator itself may be what limits these numbers.</div>"
        )

    throughput = sc.line_chart(
        "Throughput",
        [
            sc.Series("completed/s", "#4a5a75", ts["completed_rps"]),
            sc.Series("2xx/s", C_OK, ts["ok_rps"]),
            sc.Series("sent/s", "#9aa1ad", ts["sent"], dashed=True),
        ],
        y_label="requests / s",
        markers=marks,
    )
    latency = sc.line_chart(
        "Latency over time",
        [
            sc.Series("p50", C_P50, ts["p50_ms"]),
            sc.Series("p99", C_P99, ts["p99_ms"]),
            sc.Series("max", C_MAX, ts["max_ms"], dashed=True),
        ],
        y_label="ms",
        markers=marks,
    )
    success = sc.line_chart(
        "Success rate",
        [
            sc.Series("2xx", C_OK, ts["success_rate"]),
            sc.Series("answered (not 5xx / lost)", "#4a5a75", ts["availability"], dashed=True),
        ],
        y_label="share of requests sent",
        y_min=_share_floor(ts["success_rate"], ts["availability"]),
        y_max=1.0,
        y_fmt=sc.fmt_pct,
        markers=marks,
    )
    status_series = [sc.Series("2xx", C_OK, ts["ok"])]
    for color, dim in zip(
        C_429, ("requests", "input_tokens", "output_tokens", "unknown"), strict=True
    ):
        # Older results.json files have only the 429 total.
        values = ts.get(f"429_{dim}", ts["429"] if dim == "unknown" else [])
        status_series.append(sc.Series(f"429 {dim}".replace("_", " "), color, values))
    status_series += [
        sc.Series("other 4xx", C_4XX, ts["4xx"]),
        sc.Series("5xx", C_5XX, ts["5xx"]),
        sc.Series("no response", C_CONN, ts["conn"]),
    ]
    status = sc.stacked_bars("Status", status_series, y_label="requests", markers=marks)
    dist = s["distribution"]
    hist = sc.histogram(
        "Latency histogram",
        dist["histogram"]["edges_ms"],
        dist["histogram"]["counts"],
        x_label="latency ms (log scale)",
        color=C_P50,
    )
    curve = sc.percentile_curve(
        "Latency by percentile",
        [(p[0], p[1]) for p in dist["cdf"]],
        color=C_P99,
        y_label="ms",
    )
    lat_note = (
        "from the intended send time (open loop: queueing in front of the server counts)"
        if cfg["mode"] == "open"
        else "from the send time"
    )
    panels = [
        _panel("Throughput over time", throughput, "completions per second they finished"),
        _panel("Latency p50 / p99 over time", latency, f"2xx responses by send second, {lat_note}"),
        _panel("Status codes over time", status, "by the second each request was sent"),
        _panel("Success rate per second", success, "of the requests sent in that second"),
        _panel("Latency distribution", hist, "2xx responses, log-spaced bins"),
        _panel("Latency by percentile", curve, "tail stretched: 90, 99, 99.9, 99.99"),
    ]
    if "ttfb_p50_ms" in ts:
        ttfb = sc.line_chart(
            "TTFB",
            [sc.Series("TTFB p50", "#7d3c98", ts["ttfb_p50_ms"])],
            y_label="ms",
            markers=marks,
        )
        panels.append(_panel("Time to first byte (streams)", ttfb, "p50 by send second"))

    status_rows = [(k, _int(v)) for k, v in s["status"].items()]
    pct_sources = [lat, s["ttfb_ms"]] if s.get("ttfb_ms") else [lat]
    pct_rows = [
        (name, " / ".join(_ms(m.get(k)) for m in pct_sources))
        for name, k in (
            ("p50", "p50"),
            ("p90", "p90"),
            ("p99", "p99"),
            ("p99.9", "p99.9"),
            ("max", "max"),
            ("mean", "mean"),
        )
    ]
    tok = s["tokens"]
    misc_rows = [
        ("tokens sent (usage)", _int(tok["sent"])),
        ("tokens received", _int(tok["received"])),
        ("tokens sent (by prompt size)", f"~{_int(tok['sent_estimated'])}"),
        ("bytes sent", _bytes(s["bytes"]["sent"])),
        ("bytes received", _bytes(s["bytes"]["received"])),
    ]
    misc_rows += [
        (f"node {n['url']}", f"{_int(n['ok'])} 2xx of {_int(n['requests'])}") for n in s["nodes"]
    ]
    misc_rows += [(f"{e['kind']} at {e['t']:.2f} s", e["detail"]) for e in s["events"]]
    tables = (
        "<div class='grid' style='margin-top:14px'>"
        + _panel("Status counts", _table(status_rows, numeric=True))
        + _panel("Latency ms (2xx / TTFB)" if s.get("ttfb_ms") else "Latency ms (2xx)",
                 _table(pct_rows, True))
        + _panel("Traffic", _table(misc_rows))
        + "</div>"
    )  # fmt: skip
    title = "Load test report" + (f": {cfg['label']}" if cfg.get("label") else "")
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>{html.escape(describe_run(s))}</p></header>"
        f"<main>{banner}<div class='cards'>{''.join(cards)}</div>"
        f"<div class='grid'>{''.join(panels)}</div>{tables}"
        f"<footer>Generated {html.escape(when)}. Latency: {html.escape(lat_note)}. "
        f"Generator ceiling: {html.escape(ceiling_text(s))}.</footer></main></body></html>"
    )
