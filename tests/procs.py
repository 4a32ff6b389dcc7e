"""Real processes for end-to-end tests: the proxy and the mock upstream on free loopback ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process we started, with its output in a file and a stop() by PID."""

    def __init__(self, args: list[str], url: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.url = url
        self.log = tempfile.NamedTemporaryFile(prefix="proc-", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as the process
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=full_env
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def wait_ready(self, path: str = "/healthz", timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args} exited early:\n{self.output()}")
            try:
                r = httpx.get(self.url + path, timeout=1.0)
                if r.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.args} not ready after {timeout}s:\n{self.output()}")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        return self.popen.returncode


def start_mock(*extra: str, log_path: str | None = None, port: int | None = None) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "proxy", "mock-upstream", "--host", "127.0.0.1"]
    args += ["--port", str(port), *extra]
    if log_path:
        args += ["--log", log_path]
    p = Proc(args, f"http://127.0.0.1:{port}")
    p.wait_ready("/v1/models")
    return p


def write_config(data: dict, directory: str | Path) -> Path:
    path = Path(directory) / f"config-{free_port()}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start_proxy(
    config: str | Path,
    *,
    port: int | None = None,
    workers: int = 1,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> Proc:
    port = port or free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), *(extra or [])]
    p = Proc(args, f"http://127.0.0.1:{port}", env)
    p.wait_ready()
    return p
