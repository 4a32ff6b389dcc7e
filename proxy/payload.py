"""Validation of the request fields the proxy reads, and the cost they imply.

Only what the limiter needs is checked; everything else is the upstream's business and passes
through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import InvalidRequest

CHAT, COMPLETIONS, EMBEDDINGS = "chat", "completions", "embeddings"
MAX_N = 128  # OpenAI's own ceiling for n
MAX_OUTPUT = 10_000_000  # far above any model's output; stops absurd reservations early
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Request:
    """What the proxy needs to know about one request body."""

    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for stream_options.include_usage
    output_reservation: int  # per request, n included


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc.args[0] if exc.args else exc}"
            ". (HINT: send valid JSON with content-type application/json.)"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _int_field(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        # JSON 5.0 parses as float; OpenAI refuses it too.
        raise InvalidRequest(f"Invalid type for '{name}': expected an integer.", param=name)
    if not lo <= v <= hi:
        raise InvalidRequest(
            f"Invalid '{name}': {v}. Expected a value between {lo} and {hi}.", param=name
        )
    return v


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list):
        raise InvalidRequest("Invalid type for 'messages': expected an array.", param="messages")
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message.", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"Invalid type for '{where}': expected an object.", param=where)
        if not isinstance(m.get("role"), str):
            raise InvalidRequest(f"Missing or invalid '{where}.role'.", param=f"{where}.role")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"Invalid type for '{where}.content': expected a string or an array.",
                param=f"{where}.content",
            )
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or (
                    part.get("type") == "text" and not isinstance(part.get("text"), str)
                ):
                    raise InvalidRequest(
                        f"Invalid '{where}.content[{j}]': expected a content part object.",
                        param=f"{where}.content[{j}]",
                    )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"Invalid type for '{where}.name'.", param=f"{where}.name")


def _check_text_input(value: Any, name: str) -> None:
    """String, list of strings, list of token ids, or list of lists of token ids."""
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            f"Invalid '{name}': expected a string, an array of strings, or token arrays.",
            param=name,
        )
    first = value[0]
    if isinstance(first, str):
        ok = all(isinstance(x, str) for x in value)
    elif isinstance(first, int) and not isinstance(first, bool):
        ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    elif isinstance(first, list):
        ok = all(
            isinstance(row, list)
            and row
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in row)
            for row in value
        )
    else:
        ok = False
    if not ok:
        raise InvalidRequest(
            f"Invalid '{name}': expected a string, an array of strings, or token arrays.",
            param=name,
        )


def parse_request(endpoint: str, body: dict[str, Any], default_output: int) -> Request:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("Invalid type for 'stream': expected a boolean.", param="stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidRequest(
                "Invalid type for 'stream_options': expected an object.", param="stream_options"
            )
        iu = opts.get("include_usage", False)
        if not isinstance(iu, bool):
            raise InvalidRequest(
                "Invalid type for 'stream_options.include_usage': expected a boolean.",
                param="stream_options.include_usage",
            )
        include_usage = iu

    if endpoint == EMBEDDINGS:
        if "input" not in body:
            raise InvalidRequest("Missing required parameter: 'input'.", param="input")
        _check_text_input(body["input"], "input")
        return Request(endpoint, body, model, False, False, 0)

    if endpoint == CHAT:
        _check_messages(body.get("messages"))
    else:
        if "prompt" not in body:
            raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt")
        _check_text_input(body["prompt"], "prompt")

    n = _int_field(body, "n", 1, MAX_N) or 1
    mct = _int_field(body, "max_completion_tokens", 1, MAX_OUTPUT)
    mt = _int_field(body, "max_tokens", 1, MAX_OUTPUT)
    per_choice = mct if mct is not None else mt if mt is not None else default_output
    if endpoint == COMPLETIONS:
        best_of = _int_field(body, "best_of", 1, MAX_N)
        if best_of is not None:
            # best_of generates best_of completions server side and bills all of them.
            n = max(n, best_of)
    return Request(endpoint, body, model, stream, include_usage, per_choice * n)
