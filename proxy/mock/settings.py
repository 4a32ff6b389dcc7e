"""How the mock upstream paces its answers, where it logs and how it counts tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MockSettings:
    latency_ms: float = 0
    tokens_per_second: float = 0  # 0 = as fast as possible
    chunk_tokens: int = 1
    log_path: str | None = None
    # Must equal the proxy's default_encoding, or counts differ for unknown model names.
    default_encoding: str = "cl100k_base"
