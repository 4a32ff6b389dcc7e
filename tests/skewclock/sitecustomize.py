"""Test-only: shift this process's wall clock by ``$SKEW_CLOCK_S`` seconds (e.g. +3600, -3600).

Put this folder on a child's PYTHONPATH; Python imports ``sitecustomize`` at start-up, before
any other module, so every later ``time.time()`` / ``time.time_ns()`` in that process (uvicorn's
``date`` header, the access log's timestamps) reads the shifted clock. The monotonic clocks are
left alone: they have no epoch to disagree about.
"""

from __future__ import annotations

import os
import time

_skew_s = float(os.environ.get("SKEW_CLOCK_S", "0") or 0)

if _skew_s:
    _real_time, _real_time_ns = time.time, time.time_ns
    _skew_ns = round(_skew_s * 1e9)

    def _time() -> float:
        return _real_time() + _skew_s

    def _time_ns() -> int:
        return _real_time_ns() + _skew_ns

    time.time = _time
    time.time_ns = _time_ns
