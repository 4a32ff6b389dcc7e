"""The YAML configuration, parsed and validated once into frozen objects.

Errors name the file and the path inside it (``keys[2].limits.rpm: must be a positive integer``).
Secrets are never stored here in plain form: client keys become SHA-256 digests, upstream keys are
read from the environment at load time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PositiveInt = Annotated[int, Field(gt=0, strict=True)]


class ConfigError(Exception):
    """An invalid configuration; the message names the file and the path inside it."""


def hash_key(key: str) -> str:
    """The SHA-256 form of a client key, as written in ``key_sha256``."""
    return hashlib.sha256(key.encode()).hexdigest()


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Frozen):
    rpm: PositiveInt | None = None
    input_tpm: PositiveInt | None = None
    output_tpm: PositiveInt | None = None

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.input_tpm is None and self.output_tpm is None


class KeyConfig(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@/-]+$")]
    key: Annotated[str | None, Field(min_length=8, repr=False)] = None
    key_sha256: str | None = None
    limits: Limits = Limits()
    models: dict[str, Limits] = {}

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64.match(v.lower()):
            raise ValueError("must be 64 hexadecimal characters (see `python -m proxy hash-key`)")
        return v.lower() if v else v

    @model_validator(mode="after")
    def _one_key(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> str:
        return self.key_sha256 or hash_key(self.key or "")


class MockUpstream(_Frozen):
    type: Literal["mock"]
    latency_ms: Annotated[float, Field(ge=0)] = 0
    tokens_per_second: Annotated[float, Field(ge=0)] = 0
    chunk_tokens: PositiveInt = 1
    stream_usage: bool = True
    max_response_bytes: PositiveInt = 64 * 1024 * 1024


class HttpUpstream(_Frozen):
    type: Literal["http"] = "http"
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+")]
    api_key_env: str | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 600
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10
    max_connections: PositiveInt = 1000
    stream_usage: bool = True
    max_response_bytes: PositiveInt = 64 * 1024 * 1024
    # Read from the environment at load time; never printed.
    api_key: Annotated[str | None, Field(repr=False, exclude=True)] = None


Upstream = Annotated[MockUpstream | HttpUpstream, Field(discriminator="type")]


class MemoryBackendConfig(_Frozen):
    type: Literal["memory"]


class RedisBackendConfig(_Frozen):
    type: Literal["redis"]
    url: Annotated[str, Field(pattern=r"^(redis|rediss|unix)://")] = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    sentinels: tuple[str, ...] = ()
    service_name: str | None = None
    timeout_ms: PositiveInt = 250
    outage_policy: Literal["fail_closed", "fail_open", "local"] = "fail_closed"
    local_node_count: PositiveInt = 1
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$")] = "rl"

    @field_validator("sentinels")
    @classmethod
    def _hostports(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for s in v:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{s!r}: must be host:port")
        return v

    @model_validator(mode="after")
    def _forms(self) -> RedisBackendConfig:
        if self.sentinels and not self.service_name:
            raise ValueError("sentinels need service_name")
        if self.sentinels and self.cluster:
            raise ValueError("cluster and sentinels exclude each other")
        return self


Backend = Annotated[MemoryBackendConfig | RedisBackendConfig, Field(discriminator="type")]


class AdminConfig(_Frozen):
    token_env: str
    token: Annotated[str | None, Field(repr=False, exclude=True)] = None


class LoggingConfig(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True


class Config(_Frozen):
    backend: Backend = MemoryBackendConfig(type="memory")
    upstreams: dict[str, Upstream]
    default_upstream: str
    routes: dict[str, str] = {}
    output_reservation_default: PositiveInt = 256
    window_s: Annotated[float, Field(gt=0, le=86400)] = 60
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    default_encoding: Literal["cl100k_base", "o200k_base"] = "cl100k_base"
    shutdown_grace_s: Annotated[float, Field(ge=0)] = 30
    admin: AdminConfig | None = None
    logging: LoggingConfig = LoggingConfig()
    keys: Annotated[list[KeyConfig], Field(min_length=1)]

    @model_validator(mode="after")
    def _references(self) -> Config:
        if self.default_upstream not in self.upstreams:
            raise ValueError(f"default_upstream {self.default_upstream!r} is not in upstreams")
        for pattern, name in self.routes.items():
            if name not in self.upstreams:
                raise ValueError(f"routes[{pattern!r}] names unknown upstream {name!r}")
        names: set[str] = set()
        digests: set[str] = set()
        for i, k in enumerate(self.keys):
            if k.name in names:
                raise ValueError(f"keys[{i}].name: duplicate name {k.name!r}")
            if k.digest in digests:
                raise ValueError(f"keys[{i}]: the same key is configured twice")
            names.add(k.name)
            digests.add(k.digest)
        return self

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    def upstream_for(self, model: str | None) -> str:
        if model:
            for pattern, name in self.routes.items():
                if fnmatch.fnmatchcase(model, pattern):
                    return name
        return self.default_upstream


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("mock", "http", "memory", "redis") and out.count(".") >= 0 and _tag_ok(out):
            # pydantic adds the discriminator value as a path element; users never wrote it
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _tag_ok(prefix: str) -> bool:
    return prefix.startswith("upstreams.") or prefix == "backend"


_INT_FIELDS = frozenset(
    {
        "rpm",
        "input_tpm",
        "output_tpm",
        "chunk_tokens",
        "max_connections",
        "timeout_ms",
        "local_node_count",
        "output_reservation_default",
        "max_body_bytes",
        "max_response_bytes",
    }
)

_MESSAGES = {
    "greater_than": "must be a positive {what}",
    "int_type": "must be an integer",
    "extra_forbidden": "unknown field",
    "missing": "is required",
}


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    if kind == "greater_than" and err.get("ctx", {}).get("gt") == 0:
        # The field's own type decides the wording, not the value the user wrote.
        strict_int = err["loc"][-1] in _INT_FIELDS
        return f"must be a positive {'integer' if strict_int else 'number'}"
    if kind in ("int_type", "extra_forbidden", "missing"):
        return _MESSAGES[kind]
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def parse_config(
    data: Any, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Validate a parsed YAML document; resolve environment references."""
    env = os.environ if env is None else env
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the document must be a mapping")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = _loc(tuple(err["loc"]))
            lines.append(
                f"{source}: {where}: {_message(err)}" if where else f"{source}: {_message(err)}"
            )
        raise ConfigError("\n".join(lines)) from None
    upstreams = {}
    for name, up in cfg.upstreams.items():
        if isinstance(up, HttpUpstream) and up.api_key_env:
            value = env.get(up.api_key_env)
            if not value:
                raise ConfigError(
                    f"{source}: upstreams.{name}.api_key_env: environment variable "
                    f"{up.api_key_env} is not set"
                )
            up = up.model_copy(update={"api_key": value})
        upstreams[name] = up
    admin = cfg.admin
    if admin is not None:
        token = env.get(admin.token_env)
        if not token:
            raise ConfigError(
                f"{source}: admin.token_env: environment variable {admin.token_env} is not set"
            )
        admin = admin.model_copy(update={"token": token})
    return cfg.model_copy(update={"upstreams": upstreams, "admin": admin})


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path), env)


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
