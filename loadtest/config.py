"""LoadConfig: everything one load run needs, validated once, picklable for worker processes."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ENDPOINTS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
PICKS = ("round-robin", "random")


class ConfigError(ValueError):
    """A LoadConfig that cannot be run; the message says which field."""


@dataclass(frozen=True, slots=True)
class Target:
    """One node: where to connect and the path prefix every endpoint path goes under."""

    host: str
    port: int
    base_path: str  # always ends in "/v1"

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


def parse_target(url: str, *, allow_remote: bool = False) -> Target:
    """``http://host:port[/prefix]`` -> Target; "/v1" is appended unless the path ends in it."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ConfigError(f"url {url!r}: only plain http:// is supported")
    if not parts.hostname:
        raise ConfigError(f"url {url!r}: no host")
    host = parts.hostname
    if not allow_remote and not is_loopback(host):
        raise ConfigError(f"url {url!r}: not a loopback address (pass allow_remote to override)")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    return Target(host, parts.port or 80, path)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and names that resolve only to those."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """One load run. Closed loop when ``rate`` is None (``concurrency`` workers back to back),
    open loop otherwise (``rate`` requests/s on a fixed schedule, at most ``max_inflight``)."""

    urls: tuple[str, ...] = ("http://127.0.0.1:8000",)
    keys: tuple[str, ...] = ("sk-test",)
    pick: str = "round-robin"
    endpoint: str = "chat"
    stream: bool = False
    prompt_tokens: int = 32
    max_tokens: int = 16
    model: str = "mock-model"
    headers: tuple[tuple[str, str], ...] = ()
    concurrency: int = 8
    rate: float | None = None
    max_inflight: int = 10_000
    duration: float | None = None  # seconds; None with requests=None means the default 10 s
    requests: int | None = None
    processes: int = 1
    timeout: float = 60.0  # per request, all retries included
    retries: int = 2  # failovers to another node after a connection failure
    eject_s: float = 1.0  # a node that refused a connection is avoided this long
    seed: int = 1
    # Failure switch (seconds from run start).
    kill_at: float | None = None
    kill_pid: int | None = None
    kill_signal: str = "TERM"
    restart_at: float | None = None
    restart_cmd: str | None = None
    # Generator ceiling: a known value, or measure it before the run.
    ceiling_rps: float | None = None
    measure_ceiling: bool = True
    ceiling_duration: float = 2.0
    progress: bool = False
    allow_remote: bool = False
    label: str = ""
    # Set by the multi-process wrapper: this process's share of the global schedule.
    shard: int = 0
    shards: int = 1
    extra: dict[str, str] = field(default_factory=dict)  # free-form notes carried into reports

    def __post_init__(self) -> None:
        if not self.urls:
            raise ConfigError("at least one url is needed")
        if not self.keys:
            raise ConfigError("at least one key is needed")
        if self.pick not in PICKS:
            raise ConfigError(f"pick must be one of {PICKS}")
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint must be one of {tuple(ENDPOINTS)}")
        if self.endpoint == "embeddings" and self.stream:
            raise ConfigError("embeddings cannot stream")
        if self.rate is not None and self.rate <= 0:
            raise ConfigError("rate must be > 0")
        if self.concurrency < 1 or self.max_inflight < 1 or self.processes < 1:
            raise ConfigError("concurrency, max_inflight and processes must be >= 1")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError("duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ConfigError("requests must be >= 1")
        if self.prompt_tokens < 0 or self.max_tokens < 1:
            raise ConfigError("prompt_tokens must be >= 0 and max_tokens >= 1")
        if (self.kill_at is None) != (self.kill_pid is None):
            raise ConfigError("kill_at and kill_pid go together")
        if (self.restart_at is None) != (self.restart_cmd is None):
            raise ConfigError("restart_at and restart_cmd go together")
        if self.kill_signal.upper().removeprefix("SIG") not in ("TERM", "KILL", "INT"):
            raise ConfigError("kill_signal must be TERM, KILL or INT")
        for url in self.urls:
            parse_target(url, allow_remote=self.allow_remote)

    @property
    def mode(self) -> str:
        return "closed" if self.rate is None else "open"

    @property
    def effective_duration(self) -> float | None:
        """The time bound: as given, else 10 s unless a request count bounds the run."""
        if self.duration is None and self.requests is None:
            return 10.0
        return self.duration

    def targets(self) -> list[Target]:
        return [parse_target(u, allow_remote=self.allow_remote) for u in self.urls]

    def replace(self, **changes: object) -> LoadConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> dict[str, object]:
        """The JSON-able settings that explain a result."""
        d = dataclasses.asdict(self)
        for k in ("shard", "shards", "keys"):
            d.pop(k)
        d["key_count"] = len(self.keys)
        d["mode"] = self.mode
        d["duration"] = self.effective_duration
        d["headers"] = [f"{k}: {v}" for k, v in self.headers]
        return d
