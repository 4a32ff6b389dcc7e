"""The local cluster of the Procfile, started through honcho: three nodes share one limit."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HONCHO = Path(sys.executable).parent / "honcho"
NODES = (8003, 8004, 8005)
KEY = "sk-team-b-example"  # rpm 5 in config/cluster.yaml

pytestmark = pytest.mark.redis


def _procfile_ports() -> list[int]:
    return [int(p) for p in re.findall(r"--port (\d+)", (ROOT / "Procfile").read_text())]


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _started_pids(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"started \(pid=(\d+)\)", output)]


def _is_ours(pid: int) -> bool:
    """Still one of the Procfile's commands (the PID was not reused by something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    marks = (b"cluster.yaml", b"mock-upstream", b"loadtest.redis_server", b"-server 127.0.0.1:")
    return any(m in cmdline for m in marks)


@pytest.fixture
def cluster():
    if not HONCHO.exists():
        pytest.skip("honcho is not installed (dev extra)")
    busy = [p for p in _procfile_ports() if _port_busy(p)]
    if busy:
        pytest.skip(f"ports of the Procfile in use (a cluster already running?): {busy}")
    log = tempfile.TemporaryFile()  # noqa: SIM115 - read after honcho has stopped
    env = {**os.environ, "PATH": f"{HONCHO.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [str(HONCHO), "start", "-f", "Procfile"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.monotonic() + 30
        pending = set(NODES)
        while pending and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"honcho exited early:\n{output()}")
            for port in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        pending.discard(port)
            time.sleep(0.1)
        if pending:
            pytest.fail(f"nodes {sorted(pending)} not healthy after 30 s:\n{output()}")
        yield proc, output
    finally:
        # honcho stops its processes (each in its own process group) on SIGTERM, as on Ctrl-C.
        clean = True
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                clean = False
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if not clean:
            for pid in _started_pids(output()):  # what honcho started and could not stop
                if _is_ours(pid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
        log.close()


def test_config_matches_the_procfile() -> None:
    cfg = yaml.safe_load((ROOT / "config" / "cluster.yaml").read_text())
    ports = _procfile_ports()
    redis_port = int(cfg["backend"]["url"].rsplit(":", 1)[1].split("/")[0])
    mock_port = int(cfg["upstreams"]["mock"]["base_url"].split(":")[2].split("/")[0])
    assert cfg["backend"]["type"] == "redis"
    assert sorted(ports) == sorted([redis_port, mock_port, *NODES])
    limited = next(k for k in cfg["keys"] if k.get("key") == KEY)
    assert limited["limits"]["rpm"] == 5


def test_limit_is_shared_by_the_three_nodes(cluster) -> None:
    proc, output = cluster
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
    }
    statuses: dict[int, list[int]] = {port: [] for port in NODES}
    with httpx.Client(timeout=10, headers={"authorization": f"Bearer {KEY}"}) as client:
        for _ in range(3):  # 9 requests round-robin over the nodes, 5 fit in the shared window
            for port in NODES:
                r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                statuses[port].append(r.status_code)
                if r.status_code == 429:
                    assert r.json()["error"]["type"] == "requests"
    flat = [s for port in NODES for s in statuses[port]]
    assert flat.count(200) == 5, statuses
    assert flat.count(429) == 4, statuses
    # Every node answered (the cluster really is three nodes), and all processes are up.
    assert all(statuses[port] for port in NODES)
    assert proc.poll() is None, output()
    assert len(_started_pids(output())) == 5
