"""What one generation request produces (model, prompt tokens, choices, length, usage
options), validated from its body."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.tokens import TokenCounter

from .errors import MockRequestError
from .faults import Faults
from .text import word_offset

DEFAULT_MAX_TOKENS = 16
MAX_COMPLETION_TOKENS = 1_000_000
MAX_CHOICES = 128


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _opt_int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MockRequestError(f"{key} must be an integer in [{low}, {high}]", param=key)
    return value


@dataclass(slots=True)
class _Plan:
    """What one generation request produces."""

    kind: str  # "chat" | "text"
    model: str
    prompt_tokens: int
    offsets: list[int]  # one per choice
    tokens: int  # per choice
    finish: str
    include_usage: bool
    continuous: bool


def _plan(body: dict[str, Any], kind: str, counter: TokenCounter, faults: Faults) -> _Plan:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MockRequestError("model is required", param="model")
    n = _opt_int(body, "n", 1, MAX_CHOICES) or 1
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise MockRequestError("messages must be a non-empty array", param="messages")
        tools = body.get("tools")
        if tools is None:
            tools = body.get("functions")
        prompt_tokens = counter.count_chat(messages, model, tools)
        limit = _opt_int(body, "max_completion_tokens", 0, MAX_COMPLETION_TOKENS)
        if limit is None:
            limit = _opt_int(body, "max_tokens", 0, MAX_COMPLETION_TOKENS)
        seeds = [messages]
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise MockRequestError("prompt is required", param="prompt")
        prompt_tokens = counter.count_prompt(prompt, model)
        limit = _opt_int(body, "max_tokens", 0, MAX_COMPLETION_TOKENS)
        # Several prompts: n choices for each, like OpenAI.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            seeds = list(prompt)
        else:
            seeds = [prompt]
    natural = faults.length
    if natural is None:
        tokens = DEFAULT_MAX_TOKENS if limit is None else limit
        finish = "stop" if limit is None else "length"
    elif limit is not None and natural >= limit:
        tokens, finish = limit, "length"
    else:
        tokens, finish = natural, "stop"
    offsets = []
    for seed in seeds:
        base = word_offset(seed)
        offsets.extend(base + 17 * j for j in range(n))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    continuous = include_usage and options.get("continuous_usage_stats") is True
    return _Plan(kind, model, prompt_tokens, offsets, tokens, finish, include_usage, continuous)
