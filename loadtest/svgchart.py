"""Small inline-SVG charts (lines, stacked bars, histogram, percentile curve) with no scripts.

Every chart is a self-contained ``<svg>`` string sized by its viewBox, so the report needs no
external library and reads offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

W, H = 640, 270
ML, MR, MT, MB = 58, 18, 30, 40  # margins: left, right, top (legend), bottom (axis label)
PW, PH = W - ML - MR, H - MT - MB
GRID = "#e6e8ec"
AXIS = "#9aa1ad"
TEXT = "#4a5260"
FONT = "font-family='system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif'"


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    color: str
    values: Sequence[float | None]
    dashed: bool = False


@dataclass(frozen=True, slots=True)
class Marker:
    """A vertical line at ``x`` (e.g. the second a node was killed)."""

    x: float
    label: str
    color: str = "#c0392b"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = [round(first, 10)]
    while ticks[-1] < hi - step * 1e-9:  # the last tick covers hi
        ticks.append(round(first + len(ticks) * step, 10))
    return ticks


def fmt_num(v: float) -> str:
    """Compact tick label: 1.2k, 3M, 0.25, 12."""
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100 or v == int(v):
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.2g}"


def fmt_pct(v: float) -> str:
    pct = 100 * v
    return f"{pct:.0f}%" if abs(pct - round(pct)) < 1e-6 else f"{pct:.1f}%"


class _Canvas:
    """Maps data to pixels and collects SVG elements."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, ylog: bool = False) -> None:
        self.x0, self.x1 = x0, (x1 if x1 > x0 else x0 + 1)
        self.y0, self.y1 = y0, (y1 if y1 > y0 else y0 + 1)
        self.parts: list[str] = []

    def px(self, x: float) -> float:
        return ML + (x - self.x0) / (self.x1 - self.x0) * PW

    def py(self, y: float) -> float:
        return MT + PH - (y - self.y0) / (self.y1 - self.y0) * PH

    def add(self, s: str) -> None:
        self.parts.append(s)


def _frame(
    c: _Canvas,
    xticks: Sequence[tuple[float, str]],
    yticks: Sequence[tuple[float, str]],
    x_label: str,
    y_label: str,
) -> None:
    for y, label in yticks:
        yy = c.py(y)
        c.add(f"<line x1='{ML}' x2='{ML + PW}' y1='{yy:.1f}' y2='{yy:.1f}' stroke='{GRID}'/>")
        c.add(
            f"<text x='{ML - 6}' y='{yy + 4:.1f}' text-anchor='end' font-size='11' "
            f"fill='{TEXT}'>{escape(label)}</text>"
        )
    for x, label in xticks:
        xx = c.px(x)
        c.add(
            f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{MT + PH}' y2='{MT + PH + 4}' stroke='{AXIS}'/>"
        )
        c.add(
            f"<text x='{xx:.1f}' y='{MT + PH + 17}' text-anchor='middle' font-size='11' "
            f"fill='{TEXT}'>{escape(label)}</text>"
        )
    c.add(f"<line x1='{ML}' x2='{ML + PW}' y1='{MT + PH}' y2='{MT + PH}' stroke='{AXIS}'/>")
    c.add(
        f"<text x='{ML + PW / 2:.0f}' y='{H - 6}' text-anchor='middle' font-size='11' "
        f"fill='{TEXT}'>{escape(x_label)}</text>"
    )
    c.add(
        f"<text transform='translate(13 {MT + PH / 2:.0f}) rotate(-90)' text-anchor='middle' "
        f"font-size='11' fill='{TEXT}'>{escape(y_label)}</text>"
    )


def _legend(c: _Canvas, items: Sequence[tuple[str, str, bool]]) -> None:
    x = float(ML)
    for name, color, dashed in items:
        dash = " stroke-dasharray='5 3'" if dashed else ""
        c.add(
            f"<line x1='{x:.0f}' x2='{x + 16:.0f}' y1='14' y2='14' stroke='{color}' "
            f"stroke-width='3'{dash}/>"
        )
        c.add(f"<text x='{x + 21:.0f}' y='18' font-size='11.5' fill='{TEXT}'>{escape(name)}</text>")
        x += 34 + 6.6 * len(name)


def _markers(c: _Canvas, markers: Sequence[Marker]) -> None:
    for m in markers:
        if not c.x0 <= m.x <= c.x1:
            continue
        xx = c.px(m.x)
        c.add(
            f"<line x1='{xx:.1f}' x2='{xx:.1f}' y1='{MT}' y2='{MT + PH}' stroke='{m.color}' "
            f"stroke-width='1.5' stroke-dasharray='4 3'><title>{escape(m.label)}</title></line>"
        )
        anchor = "end" if xx > ML + PW * 0.8 else "start"
        dx = -4 if anchor == "end" else 4
        c.add(
            f"<text x='{xx + dx:.1f}' y='{MT + 12}' text-anchor='{anchor}' font-size='11' "
            f"font-weight='600' fill='{m.color}'>{escape(m.label)}</text>"
        )


def _svg(c: _Canvas, title: str) -> str:
    body = "".join(c.parts)
    return (
        f"<svg viewBox='0 0 {W} {H}' width='100%' role='img' aria-label='{escape(title)}' "
        f"{FONT}><title>{escape(title)}</title>{body}</svg>"
    )


def _empty(title: str, note: str = "no data") -> str:
    c = _Canvas(0, 1, 0, 1)
    c.add(
        f"<text x='{W / 2}' y='{H / 2}' text-anchor='middle' font-size='13' "
        f"fill='{AXIS}'>{escape(note)}</text>"
    )
    return _svg(c, title)


def _time_ticks(seconds: int) -> list[tuple[float, str]]:
    return [(t, f"{t:g}s") for t in nice_ticks(0, max(1, seconds), 8) if t <= seconds]


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    y_label: str,
    x_label: str = "time into the run",
    markers: Sequence[Marker] = (),
    y_min: float = 0.0,
    y_max: float | None = None,
    y_fmt: Callable[[float], str] = fmt_num,
) -> str:
    """Per-second series (value i covers second i..i+1, drawn at its middle); values outside
    [y_min, y_max] are drawn at the edge."""
    seconds = max((len(s.values) for s in series), default=0)
    values = [v for s in series for v in s.values if v is not None]
    if not seconds or not values:
        return _empty(title)
    if y_max is not None:
        top = y_max
        yt = [t for t in nice_ticks(y_min, top) if y_min - 1e-9 <= t <= top * 1.0001]
    else:
        yt = nice_ticks(y_min, max(values) * 1.08 or 1.0)
        top = yt[-1]
    c = _Canvas(0, seconds, y_min, top)
    _frame(c, _time_ticks(seconds), [(t, y_fmt(t)) for t in yt], x_label, y_label)
    _markers(c, markers)
    dots = seconds <= 120
    for s in series:
        path: list[str] = []
        pen_up = True
        for i, v in enumerate(s.values):
            if v is None:
                pen_up = True
                continue
            y = c.py(min(max(v, y_min), top))
            path.append(f"{'M' if pen_up else 'L'}{c.px(i + 0.5):.1f},{y:.1f}")
            pen_up = False
        dash = " stroke-dasharray='6 4'" if s.dashed else ""
        c.add(
            f"<path d='{''.join(path)}' fill='none' stroke='{s.color}' stroke-width='2' "
            f"stroke-linejoin='round'{dash}/>"
        )
        if dots:
            for i, v in enumerate(s.values):
                if v is None:
                    continue
                c.add(
                    f"<circle cx='{c.px(i + 0.5):.1f}' cy='{c.py(min(max(v, y_min), top)):.1f}' "
                    "r='2.6' "
                    f"fill='{s.color}'><title>{escape(s.name)} at {i}s: {y_fmt(v)}</title></circle>"
                )
    _legend(c, [(s.name, s.color, s.dashed) for s in series])
    return _svg(c, title)


def stacked_bars(
    title: str,
    series: Sequence[Series],
    *,
    y_label: str,
    x_label: str = "time into the run",
    markers: Sequence[Marker] = (),
) -> str:
    """Per-second counts stacked in series order (first at the bottom)."""
    seconds = max((len(s.values) for s in series), default=0)
    shown = [s for s in series if any(v for v in s.values)]
    totals = [sum((s.values[i] or 0) for s in shown) for i in range(seconds)]
    if not seconds or not shown or max(totals) <= 0:
        return _empty(title)
    yt = nice_ticks(0, max(totals))
    c = _Canvas(0, seconds, 0, yt[-1])
    _frame(c, _time_ticks(seconds), [(t, fmt_num(t)) for t in yt], x_label, y_label)
    bw = PW / seconds
    gap = min(2.0, bw * 0.15)
    for i in range(seconds):
        acc = 0.0
        for s in shown:
            v = s.values[i] or 0
            if v <= 0:
                continue
            y_top, y_bot = c.py(acc + v), c.py(acc)
            c.add(
                f"<rect x='{c.px(i) + gap / 2:.1f}' y='{y_top:.1f}' "
                f"width='{max(0.5, bw - gap):.1f}' height='{max(0.5, y_bot - y_top):.1f}' "
                f"fill='{s.color}'>"
                f"<title>{escape(s.name)} at {i}s: {v:g}</title></rect>"
            )
            acc += v
    _markers(c, markers)
    _legend(c, [(s.name, s.color, False) for s in shown])
    return _svg(c, title)


def histogram(
    title: str, edges: Sequence[float], counts: Sequence[int], *, x_label: str, color: str
) -> str:
    """Bars over log-spaced bins ``edges`` (len(counts) + 1), x axis logarithmic."""
    if not counts or sum(counts) == 0:
        return _empty(title)
    lo, hi = math.log10(edges[0]), math.log10(edges[-1])
    if hi - lo < 1e-9:
        hi = lo + 0.1
    yt = nice_ticks(0, max(counts))
    c = _Canvas(lo, hi, 0, yt[-1])
    xt = _log_ticks(edges[0], edges[-1])
    _frame(c, xt, [(t, fmt_num(t)) for t in yt], x_label, "requests")
    for k, n in enumerate(counts):
        if n <= 0:
            continue
        x0, x1 = c.px(math.log10(edges[k])), c.px(math.log10(edges[k + 1]))
        y = c.py(n)
        c.add(
            f"<rect x='{x0 + 0.5:.1f}' y='{y:.1f}' width='{max(0.5, x1 - x0 - 1):.1f}' "
            f"height='{MT + PH - y:.1f}' fill='{color}'><title>{edges[k]:.3g}-{edges[k + 1]:.3g}"
            f" ms: {n}</title></rect>"
        )
    return _svg(c, title)


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Ticks at 1, 2, 5 x powers of ten inside [lo, hi] (positions are log10 values)."""
    out = []
    # Over a narrow range 1, 2, 5 leaves too few ticks: use more multiples there.
    decades = math.log10(hi / lo)
    mults = (1, 2, 5) if decades >= 2 else (1, 2, 3, 5) if decades >= 1.2 else range(1, 10)
    for p in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in mults:
            v = m * 10.0**p
            if lo <= v <= hi:
                out.append((math.log10(v), fmt_num(v)))
    if len(out) < 3:  # a narrow range: evenly stepped values read better
        out = [(math.log10(v), fmt_num(v)) for v in nice_ticks(lo, hi) if lo <= v <= hi]
    return out


def percentile_curve(
    title: str, points: Sequence[tuple[float, float]], *, color: str, y_label: str
) -> str:
    """Latency by percentile with a stretched tail: x = log10(1 / (1 - q)), so 90, 99,
    99.9 and 99.99 are equally spaced (the usual way to show tail latency)."""
    pts = [(ms, q) for ms, q in points if q < 1.0]
    if not pts:
        return _empty(title)
    xmax = 4.0  # 99.99th
    top = nice_ticks(0, max(ms for ms, _ in pts) * 1.05)
    c = _Canvas(0, xmax, 0, top[-1])
    xt = [(0.0, "0"), (1.0, "90"), (2.0, "99"), (3.0, "99.9"), (4.0, "99.99")]
    _frame(c, xt, [(t, fmt_num(t)) for t in top], "percentile", y_label)
    path = []
    for k, (ms, q) in enumerate(pts):
        x = min(xmax, math.log10(1.0 / (1.0 - q)))
        path.append(f"{'M' if k == 0 else 'L'}{c.px(x):.1f},{c.py(ms):.1f}")
    c.add(f"<path d='{''.join(path)}' fill='none' stroke='{color}' stroke-width='2.2'/>")
    for label, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
        near = min(pts, key=lambda p, q=q: abs(p[1] - q))
        if abs(near[1] - q) > 1e-6:
            continue
        x, y = c.px(math.log10(1.0 / (1.0 - q))), c.py(near[0])
        c.add(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3.5' fill='{color}'>"
            f"<title>{label}: {near[0]:.3g} ms</title></circle>"
        )
        c.add(
            f"<text x='{x - 5:.1f}' y='{y - 7:.1f}' text-anchor='end' font-size='11' "
            f"fill='{TEXT}'>{label} {near[0]:.3g} ms</text>"
        )
    return _svg(c, title)
