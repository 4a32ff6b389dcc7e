"""Pre-built HTTP/1.1 request bytes: one per (node, key), so sending costs one write."""

from __future__ import annotations

import orjson

from loadtest.config import ENDPOINTS, LoadConfig, Target

# Short common words that are one token each in the usual BPE encodings (with a leading space).
_WORDS = (
    "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "the", "red", "sun",
    "in", "one", "big", "old", "tree", "by", "sea",
)  # fmt: skip


def build_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of plain text made of repeated short words."""
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(tokens))


def build_body(cfg: LoadConfig) -> bytes:
    prompt = build_prompt(cfg.prompt_tokens)
    body: dict[str, object] = {"model": cfg.model}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    elif cfg.endpoint == "completions":
        body["prompt"] = prompt
    else:
        body["input"] = prompt
    if cfg.endpoint != "embeddings":
        body["max_tokens"] = cfg.max_tokens
        if cfg.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def build_request(cfg: LoadConfig, target: Target, key: str, body: bytes) -> bytes:
    path = target.base_path + ENDPOINTS[cfg.endpoint]
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {target.authority}",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Accept: text/event-stream" if cfg.stream else "Accept: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines.extend(f"{k}: {v}" for k, v in cfg.headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def build_all(cfg: LoadConfig) -> list[list[bytes]]:
    """requests[node][key] for every target and key of the config."""
    body = build_body(cfg)
    return [[build_request(cfg, t, k, body) for k in cfg.keys] for t in cfg.targets()]
