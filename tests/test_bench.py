"""`python -m loadtest bench` end to end, in its shortest form: it runs, and what it writes is
whole. (Its figures are for people to read; nothing here judges them.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.redis


def test_a_short_bench_writes_its_table_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--quick", "--only", "1,2,4", "--no-exactness", "--out", str(out)]
    args += ["--throughput-s", "0.5", "--latency-s", "0.5", "--single-s", "0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "bench", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for expected in (
        "mock upstream alone (reference)",
        "proxy, limits disabled",
        "proxy, Redis backend",
        "throughput 4/2 = ",  # the limiter's cost
        "throughput 4/1 = ",
        "script time",  # from Redis's INFO commandstats
        "limiter decision at c=1",
        "429s: 0",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text[-3000:]}"
    data = orjson.loads((out / "bench.json").read_bytes())
    assert [r["variant"]["tag"] for r in data["rows"]] == ["1", "2", "4"]
    for row in data["rows"]:
        assert set(row["phases"]) == {"throughput", "latency", "single"}
        for phase in row["phases"].values():
            assert phase["totals"]["ok"] == phase["totals"]["requests"] > 0
    redis = data["rows"][2]["redis"]
    assert redis["script_calls"] == redis["admitted"] > 0  # one script call per decision
    index = (out / "index.html").read_text()
    for row in data["rows"]:
        for phase in row["phases"]:
            report = out / f"variant-{row['variant']['tag']}" / phase / "report.html"
            assert report.is_file() and f"variant-{row['variant']['tag']}/{phase}" in index
