"""Limiter storages behind one interface (``base.Backend``); ``build_backend`` picks one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import Backend

if TYPE_CHECKING:
    from ..config import MemoryBackendConfig, RedisBackendConfig


def build_backend(
    cfg: MemoryBackendConfig | RedisBackendConfig,
    on_state: Callable[[str], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> Backend:
    """The configured backend; ``on_state`` / ``on_error`` report outage transitions and failed
    calls of a shared store (the app passes its metrics hooks)."""
    if cfg.type == "memory":
        from .memory import MemoryBackend

        return MemoryBackend()
    from .redis import RedisBackend, RedisSettings

    sentinels = tuple((h, int(p)) for h, _, p in (s.rpartition(":") for s in cfg.sentinels))
    from .failover import FailoverBackend

    shared = RedisBackend.from_settings(
        RedisSettings(
            url=cfg.url,
            cluster=cfg.cluster,
            sentinels=sentinels,
            service_name=cfg.service_name,
            timeout_ms=cfg.timeout_ms,
            key_prefix=cfg.key_prefix,
        )
    )
    return FailoverBackend(
        shared, cfg.outage_policy, cfg.local_node_count, on_state=on_state, on_error=on_error
    )
