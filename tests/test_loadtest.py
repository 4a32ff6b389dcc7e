"""The load generator against a tiny fake OpenAI server (this file, run as a script, is it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.ceiling import stop_process
from loadtest.classify import (
    DIM_INPUT,
    DIM_OUTPUT,
    DIM_REQUESTS,
    DIM_UNKNOWN,
    SseCounter,
    rate_limit_dimension,
)
from loadtest.config import ConfigError, LoadConfig, is_loopback, parse_target
from loadtest.generator import run_load, run_load_sync
from loadtest.payload import build_prompt
from loadtest.report import format_table, render_html
from loadtest.results import (
    STATUS_BROKEN,
    STATUS_CONNECT,
    STATUS_TIMEOUT,
    STATUS_UNSENT,
    Results,
    RunEvent,
)
from loadtest.stats import percentile, summarize
from loadtest.svgchart import nice_ticks

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

# -- the fake server ---------------------------------------------------------------------------
# Behaviour by API key: sk-ok -> 200; sk-limit-<dim> -> 429 with that error type; sk-limit-hdr ->
# 429 naming output tokens only in a header; sk-500 -> 500. Request headers: x-fake-delay-ms,
# x-fake-no-usage (streams without a usage chunk), x-fake-cut (drop the connection mid-body).


async def _fake_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))))
            if delay := int(headers.get("x-fake-delay-ms", "0")):
                await asyncio.sleep(delay / 1000)
            key = headers.get("authorization", "").removeprefix("Bearer ")
            await _fake_answer(writer, path, key, headers, body)
    finally:
        writer.close()


def _send(writer: asyncio.StreamWriter, status: int, obj: dict, extra: str = "") -> None:
    data = json.dumps(obj).encode()
    writer.write(
        f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{extra}"
        f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )


async def _fake_answer(
    writer: asyncio.StreamWriter, path: str, key: str, headers: dict, body: dict
) -> None:
    if key.startswith("sk-limit-"):
        dim = key.removeprefix("sk-limit-")
        if dim == "hdr":
            err = {"message": "slow down", "type": "rate_limit_error", "code": None}
            extra = (
                "x-ratelimit-remaining-requests: 5\r\nx-ratelimit-remaining-output-tokens: 0\r\n"
            )
            _send(writer, 429, {"error": err}, extra)
        else:
            err = {"message": "slow down", "type": dim, "code": "rate_limit_exceeded"}
            _send(writer, 429, {"error": err}, "retry-after: 1\r\n")
        return
    if key == "sk-500":
        _send(writer, 500, {"error": {"message": "boom", "type": "server_error"}})
        return
    text = body.get("prompt") or body.get("input") or body["messages"][0]["content"]
    prompt_tokens = len(text.split())
    n = int(body.get("max_tokens", 16))
    if path.endswith("/embeddings"):
        _send(writer, 200, {"data": [], "usage": {"prompt_tokens": prompt_tokens}})
        return
    if not body.get("stream"):
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
        _send(writer, 200, {"choices": [{"text": "w " * n}], "usage": usage})
        return
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    events = [
        json.dumps({"choices": [{"delta": {"content": "w"}}], "usage": None}) for _ in range(n)
    ]
    if body.get("stream_options", {}).get("include_usage") and "x-fake-no-usage" not in headers:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
        events.append(json.dumps({"choices": [], "usage": usage}))
    events.append("[DONE]")
    for k, ev in enumerate(events):
        data = f"data: {ev}\r\n\r\n".encode()
        # Split every event over two HTTP chunks so the parser must join pieces.
        for piece in (data[:7], data[7:]):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        await writer.drain()
        if "x-fake-cut" in headers and k == 1:
            writer.transport.abort()
            return
    writer.write(b"0\r\n\r\n")


async def _fake_main(port: int, max_seconds: float) -> None:
    server = await asyncio.start_server(_fake_handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)


def start_fake(port: int = 0) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE), "serve", str(port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fake():
    proc, port = start_fake()
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


def cfg_for(url: str, **kw) -> LoadConfig:
    kw.setdefault("measure_ceiling", False)
    kw.setdefault("timeout", 20.0)
    return LoadConfig(urls=(url,), **kw)


def by_intended(res: Results) -> list[int]:
    return sorted(range(len(res)), key=lambda i: res["intended"][i])


# -- parsing units -----------------------------------------------------------------------------


def test_sse_counter_joins_pieces_at_any_split() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\r\n\r\n'
        b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
        b": comment\n\n"
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    for cut in range(1, len(stream)):
        c = SseCounter()
        c.feed(stream[:cut])
        c.feed(stream[cut:])
        assert (c.events, c.usage, c.done) == (3, (7, 2), True), cut
    c = SseCounter()
    for i in range(len(stream)):
        c.feed(stream[i : i + 1])
    assert (c.events, c.usage, c.done) == (3, (7, 2), True)


def test_rate_limit_dimension_sources() -> None:
    def body(t: str) -> bytes:
        return json.dumps({"error": {"type": t, "code": "rate_limit_exceeded"}}).encode()

    assert rate_limit_dimension(body("requests"), {}) == DIM_REQUESTS
    assert rate_limit_dimension(body("input_tokens"), {}) == DIM_INPUT
    assert rate_limit_dimension(body("output_tokens"), {}) == DIM_OUTPUT
    hdr = {b"x-ratelimit-remaining-requests": b"3", b"x-ratelimit-remaining-input-tokens": b"0"}
    assert rate_limit_dimension(body("rate_limit_error"), hdr) == DIM_INPUT
    assert rate_limit_dimension(b"not json", {b"x-ratelimit-limited": b"requests"}) == DIM_REQUESTS
    assert rate_limit_dimension(b"", {}) == DIM_UNKNOWN


def test_prompt_targets_and_config_checks() -> None:
    assert len(build_prompt(100).split()) == 100
    assert build_prompt(0) == ""
    assert parse_target("http://127.0.0.1:9000").base_path == "/v1"
    assert parse_target("http://127.0.0.1:9000/v1/").base_path == "/v1"
    assert parse_target("http://localhost:9000/proxy").base_path == "/proxy/v1"
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("10.0.0.1")
    with pytest.raises(ConfigError, match="loopback"):
        LoadConfig(urls=("http://192.168.1.1:80",))
    with pytest.raises(ConfigError, match="http"):
        LoadConfig(urls=("https://127.0.0.1:80",))
    with pytest.raises(ConfigError):
        LoadConfig(endpoint="embeddings", stream=True)
    with pytest.raises(ConfigError):
        LoadConfig(kill_at=1.0)


def test_percentile_and_ticks() -> None:
    vals = [float(i) for i in range(1, 101)]
    assert percentile(vals, 0.5) == 50.0
    assert percentile(vals, 0.99) == 99.0
    assert percentile(vals, 1.0) == 100.0
    assert math.isnan(percentile([], 0.5))
    ticks = nice_ticks(0, 87)
    assert ticks[0] == 0 and ticks[-1] >= 87 and len(ticks) <= 8


# -- against the fake server -------------------------------------------------------------------


async def test_closed_loop_counts_and_status_classes(fake: str) -> None:
    keys = ("sk-ok", "sk-limit-requests", "sk-limit-input_tokens", "sk-limit-hdr", "sk-500")
    cfg = cfg_for(fake, keys=keys, requests=50, concurrency=4, prompt_tokens=20, max_tokens=5)
    res = await run_load(cfg)
    assert len(res) == 50
    s = summarize(res)
    assert s["status"] == {
        "200": 10,
        "429 input_tokens": 10,
        "429 output_tokens": 10,
        "429 requests": 10,
        "500": 10,
    }
    assert s["tokens"]["sent"] == 10 * 20
    assert s["tokens"]["received"] == 10 * 5
    assert s["totals"]["success_rate"] == pytest.approx(0.2)
    assert s["totals"]["errors"] == 10
    assert sum(s["timeseries"]["429"]) == 30
    assert sum(s["timeseries"]["5xx"]) == 10
    assert all(b > 0 for b in res["bytes_out"]) and all(b > 0 for b in res["bytes_in"])
    table = format_table(s)
    assert "429 input_tokens: 10" in table and "p99.9" in table


async def test_stream_events_usage_and_ttfb(fake: str) -> None:
    res = await run_load(cfg_for(fake, stream=True, requests=6, concurrency=2, max_tokens=7))
    assert list(res["status"]) == [200] * 6
    assert list(res["tok_out"]) == [7] * 6
    assert list(res["tok_in"]) == [32] * 6
    for i in range(6):
        assert res["start"][i] <= res["first"][i] <= res["end"][i]
    s = summarize(res)
    assert s["ttfb_ms"]["count"] == 6
    assert "ttfb_p50_ms" in s["timeseries"]

    # Without a usage chunk the data events are the count.
    cfg = cfg_for(fake, stream=True, requests=3, max_tokens=4, headers=(("x-fake-no-usage", "1"),))
    res = await run_load(cfg)
    assert list(res["tok_out"]) == [4] * 3
    assert list(res["tok_in"]) == [-1] * 3


async def test_other_endpoints(fake: str) -> None:
    res = await run_load(cfg_for(fake, endpoint="embeddings", requests=3, prompt_tokens=9))
    assert list(res["status"]) == [200] * 3 and list(res["tok_in"]) == [9] * 3
    res = await run_load(cfg_for(fake, endpoint="completions", requests=3, max_tokens=2))
    assert list(res["tok_out"]) == [2] * 3


async def test_open_loop_follows_the_schedule(fake: str) -> None:
    res = await run_load(cfg_for(fake, rate=200.0, requests=20))
    order = by_intended(res)
    assert [res["intended"][i] for i in order] == [k / 200.0 for k in range(20)]
    assert list(res["status"]) == [200] * 20
    for i in range(20):
        assert res["start"][i] >= res["intended"][i] - 0.002  # never sent early


async def test_open_loop_latency_counts_from_intended_time(fake: str) -> None:
    """Server takes >= 50 ms, one request in flight, 100/s scheduled: request k cannot finish
    before 50 ms * (k + 1), so its latency from the schedule is >= 50 + 40 k ms."""
    cfg = cfg_for(
        fake, rate=100.0, requests=10, max_inflight=1, headers=(("x-fake-delay-ms", "50"),)
    )
    res = await run_load(cfg)
    order = by_intended(res)
    lat = [res["end"][i] - res["intended"][i] for i in order]
    lag = [res["start"][i] - res["intended"][i] for i in order]
    for k in range(10):
        assert lat[k] >= 0.049 * (k + 1) - 0.01 * k, (k, lat)
        assert lag[k] >= 0.049 * k - 0.01 * k - 0.001, (k, lag)
    assert lat == sorted(lat)  # latency grows with queueing: not hidden
    s = summarize(res)
    assert s["latency_ms"]["max"] >= 490 - 90  # the last one, k = 9
    assert s["service_ms"]["max"] < s["latency_ms"]["max"]


async def test_open_loop_counts_requests_the_cap_held_back(fake: str) -> None:
    """30 requests scheduled in 0.3 s, one in flight, each >= 50 ms: at most 7 can be sent
    before the end; the rest are recorded as not sent instead of disappearing."""
    cfg = cfg_for(
        fake, rate=100.0, duration=0.3, max_inflight=1, headers=(("x-fake-delay-ms", "50"),)
    )
    res = await run_load(cfg)
    statuses = list(res["status"])
    assert len(statuses) == 30
    ok, unsent = statuses.count(200), statuses.count(STATUS_UNSENT)
    assert ok + unsent == 30 and 1 <= ok <= 7
    s = summarize(res)
    assert s["status"]["not sent (in-flight cap)"] == unsent
    assert s["totals"]["errors"] == unsent


async def test_closed_loop_duration_bound(fake: str) -> None:
    res = await run_load(cfg_for(fake, duration=0.4, concurrency=2))
    assert len(res) > 0
    assert max(res["intended"]) < 0.4


def test_multiprocess_splits_one_global_schedule(fake: str) -> None:
    res = run_load_sync(cfg_for(fake, rate=400.0, requests=40, processes=2))
    assert sorted(res["intended"]) == [k / 400.0 for k in range(40)]
    assert list(res["status"]) == [200] * 40 and res.processes == 2
    res = run_load_sync(cfg_for(fake, requests=21, concurrency=3, processes=2))
    assert len(res) == 21 and set(res["status"]) == {200} and res.processes == 2
    # One worker cannot be split: it runs in one process and still sends everything.
    res = run_load_sync(cfg_for(fake, requests=5, concurrency=1, processes=2))
    assert len(res) == 5 and res.processes == 1


async def test_multiprocess_from_inside_an_event_loop(fake: str) -> None:
    cfg = cfg_for(fake, rate=300.0, requests=12, processes=2)
    res = await asyncio.to_thread(run_load_sync, cfg)
    assert sorted(res["intended"]) == [k / 300.0 for k in range(12)]


async def test_no_response_classes(fake: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    res = await run_load(cfg_for(dead, requests=3, concurrency=1, retries=1))
    assert list(res["status"]) == [STATUS_CONNECT] * 3
    assert list(res["retries"]) == [1] * 3
    res = await run_load(
        cfg_for(fake, requests=2, timeout=0.2, headers=(("x-fake-delay-ms", "3000"),))
    )
    assert list(res["status"]) == [STATUS_TIMEOUT] * 2
    res = await run_load(cfg_for(fake, stream=True, requests=2, headers=(("x-fake-cut", "1"),)))
    assert list(res["status"]) == [STATUS_BROKEN] * 2
    assert list(res["retries"]) == [0, 0]  # a response had started: never retried
    s = summarize(res)
    assert s["status"] == {"broken response": 2}


async def test_progress_line(fake: str, capsys: pytest.CaptureFixture[str]) -> None:
    await run_load(cfg_for(fake, duration=1.2, concurrency=1, progress=True))
    err = capsys.readouterr().err
    assert "\r" in err and " req " in err and "/s" in err and "p99" in err


def test_cli_run_writes_self_contained_report(fake: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loadtest", "run", "--url", fake, "--requests", "30",
           "--concurrency", "3", "--stream", "--key", "sk-ok", "--key", "sk-limit-requests",
           "--ceiling-rps", "12345", "--out", str(out), "--label", "unit"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "p99" in done.stdout and "12,345 req/s" in done.stdout
    assert "\r" not in done.stderr  # no progress line without a terminal
    data = json.loads((out / "results.json").read_text())
    assert data["totals"]["requests"] == 30
    assert data["status"] == {"200": 15, "429 requests": 15}
    assert len(data["timeseries"]["t"]) >= 1
    page = (out / "report.html").read_text()
    assert page.count("<svg") >= 6
    assert not re.search(r"<script|<link|@import|url\(|src=", page, re.IGNORECASE)
    assert "12,345" in page
    again = subprocess.run(
        [sys.executable, "-m", "loadtest", "report", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert again.returncode == 0 and "429 requests: 15" in again.stdout


def test_cli_rejects_bad_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "run", "--url", "http://10.9.8.7:1", "--no-ceiling"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 2 and "loopback" in done.stderr


def test_report_renders_kill_markers_and_empty_runs() -> None:
    empty = Results(config=LoadConfig(measure_ceiling=False, requests=1).describe())
    page = render_html(summarize(empty))
    assert "<svg" in page and "no data" in page
    rows = [
        (0.1 * k, 0.1 * k, 0.1 * k + 0.01, math.nan, 200, 0, 0, 0, 10, 10, 1, 1) for k in range(30)
    ]
    res = Results.from_rows(rows, config=LoadConfig(measure_ceiling=False, requests=30).describe())
    res.elapsed_s = 3.0
    res.events = [RunEvent(1.0, "kill", "KILL to pid 1", 1), RunEvent(2.0, "restart", "x", 2)]
    page = render_html(summarize(res))
    assert "kill 1.0s" in page and "restart 2.0s" in page


def test_failure_switch_fails_over_and_recovers(tmp_path: Path) -> None:
    port_a = free_port()
    proc_a, _ = start_fake(port_a)
    proc_b, port_b = start_fake()
    restarted_pid = None
    try:
        cfg = LoadConfig(
            urls=(f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"),
            concurrency=4,
            duration=4.0,
            kill_at=0.8,
            kill_pid=proc_a.pid,
            kill_signal="KILL",
            restart_at=1.4,
            restart_cmd=f"{sys.executable} {HERE} serve {port_a}",
            eject_s=0.5,
            measure_ceiling=False,
            timeout=10.0,
        )
        res = run_load_sync(cfg)
        kinds = [e.kind for e in res.events]
        assert kinds == ["kill", "restart"], res.events
        restarted_pid = res.events[1].pid
        s = summarize(res)
        assert s["totals"]["retries"] > 0
        assert s["totals"]["success_rate"] >= 0.99, s["status"]
        statuses, nodes, retries = res["status"], res["node"], res["retries"]
        starts = res["start"]
        # Failed-over requests were answered by the node still up.
        assert all(nodes[i] == 1 for i in range(len(res)) if retries[i] and statuses[i] == 200)
        # The node came back and took traffic again.
        assert any(
            nodes[i] == 0 and starts[i] > 1.4 and statuses[i] == 200 for i in range(len(res))
        )
        html = render_html(s)
        assert "kill 0.8s" in html
    finally:
        proc_a.wait(10)
        stop_process(proc_b)
        if restarted_pid:
            os.kill(restarted_pid, signal.SIGTERM)


def test_ceiling_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "ceiling", "--duration", "0.5", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ceiling_rps"] > 0


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    asyncio.run(_fake_main(int(sys.argv[2]) if len(sys.argv) > 2 else 0, 120.0))
