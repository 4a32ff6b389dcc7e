"""Running counters and a latency histogram per process, and the progress line drawn from them.

Each generator process owns one row of floats (a shared-memory array when there are several
processes), so the parent can read totals and approximate percentiles without any messages.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from array import array
from collections.abc import MutableSequence, Sequence
from typing import TextIO

DONE, OK, LIMITED, ERRORS, RETRIES = range(5)
HIST_OFFSET = 5
HIST_BASE_MS = 0.01  # lower edge of bucket 0
HIST_GROWTH = 1.04  # each bucket 4 % wider: percentiles within ~2 %
HIST_BUCKETS = 460  # up to ~70 minutes
ROW_SIZE = HIST_OFFSET + HIST_BUCKETS
_LOG_GROWTH = math.log(HIST_GROWTH)

Row = MutableSequence[float]


def new_row() -> Row:
    return array("d", bytes(8 * ROW_SIZE))


def bucket_of(latency_s: float) -> int:
    ms = latency_s * 1000.0
    if ms <= HIST_BASE_MS:
        return 0
    return min(HIST_BUCKETS - 1, int(math.log(ms / HIST_BASE_MS) / _LOG_GROWTH))


def record(row: Row, status: int, retries: int, latency_s: float) -> None:
    row[DONE] += 1
    if 200 <= status < 300:
        row[OK] += 1
        row[HIST_OFFSET + bucket_of(latency_s)] += 1
    elif status == 429:
        row[LIMITED] += 1
    elif status >= 500 or status < 0:
        row[ERRORS] += 1
    if retries:
        row[RETRIES] += retries


def totals(rows: Sequence[Sequence[float]]) -> list[float]:
    out = [0.0] * ROW_SIZE
    for row in rows:
        for i, v in enumerate(row[:ROW_SIZE]):
            out[i] += v
    return out


def hist_percentile(total: Sequence[float], q: float) -> float | None:
    """Approximate percentile (ms) from the summed histogram: the bucket's geometric middle."""
    n = sum(total[HIST_OFFSET:])
    if n <= 0:
        return None
    rank = q * n
    acc = 0.0
    for b in range(HIST_BUCKETS):
        acc += total[HIST_OFFSET + b]
        if acc >= rank:
            return HIST_BASE_MS * HIST_GROWTH ** (b + 0.5)
    return HIST_BASE_MS * HIST_GROWTH**HIST_BUCKETS


def format_line(elapsed: float, total: Sequence[float], rate: float) -> str:
    done = int(total[DONE])
    ok = int(total[OK])
    okp = f"{100.0 * ok / done:5.1f}%" if done else "  -  "
    p50 = hist_percentile(total, 0.50)
    p99 = hist_percentile(total, 0.99)
    lat = f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms" if p50 is not None and p99 is not None else ""
    return (
        f"{elapsed:6.1f}s {done:>9,} req {rate:>9,.0f}/s  ok {okp}  429 {int(total[LIMITED]):,}"
        f"  err {int(total[ERRORS]):,}  retry {int(total[RETRIES]):,}  {lat}"
    )


class Progress:
    """Redraws one status line on a terminal about twice a second until stopped."""

    def __init__(
        self, rows: Sequence[Sequence[float]], t0: float, stream: TextIO | None = None
    ) -> None:
        self.rows = rows
        self.t0 = t0
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadtest-progress", daemon=True)

    def start(self) -> Progress:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._draw(final=True)

    def _loop(self) -> None:
        last_done, last_t = 0.0, time.monotonic()
        self._last_rate = 0.0
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if now < self.t0:
                continue
            total = totals(self.rows)
            dt = now - last_t
            if dt > 0:
                self._last_rate = (total[DONE] - last_done) / dt
            last_done, last_t = total[DONE], now
            self._draw(total)

    def _draw(self, total: Sequence[float] | None = None, final: bool = False) -> None:
        if total is None:
            total = totals(self.rows)
        elapsed = max(0.0, time.monotonic() - self.t0)
        # The final line shows the average rate; the live ones the last half second's.
        rate = total[DONE] / elapsed if final and elapsed > 0 else getattr(self, "_last_rate", 0.0)
        line = format_line(elapsed, total, rate)
        self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        self.stream.flush()
