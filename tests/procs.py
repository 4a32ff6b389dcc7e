"""Real processes for end-to-end tests: the proxy and the mock upstream on free loopback ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import yaml

from loadtest.procs import Child

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc(Child):
    """A child process of a test: like the load tools' ``Child``, but its output stays
    readable after ``stop()`` (tests scan whole logs)."""

    def __init__(self, args: list[str], url: str, env: dict[str, str] | None = None) -> None:
        super().__init__("proc", args, url, env)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def wait_ready(self, path: str = "/healthz", timeout: float = 30.0) -> None:
        self.wait_http(path, timeout)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0, keep_log: bool = True) -> int | None:
        return super().stop(timeout, keep_log)


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
