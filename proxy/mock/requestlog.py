"""The mock's request log: one JSON line per finished request."""

from __future__ import annotations

from typing import IO, Any

import orjson


class _RequestLog:
    """Appends one JSON line per finished request; flushed per line for readers after a run.

    Fields: t, t_end, endpoint, model, stream, prompt_tokens, completion_tokens (what the usage
    reported, or the truth when no usage was sent), true_prompt_tokens, true_completion_tokens,
    usage_sent, status (499: the client went away), authorization_present, authorization,
    fault."""

    def __init__(self, path: str | None) -> None:
        self._path = path
        self._file: IO[bytes] | None = None

    def write(self, entry: dict[str, Any]) -> None:
        if self._path is None:
            return
        if self._file is None:
            self._file = open(self._path, "ab")  # noqa: SIM115 - kept open for the app's life
        self._file.write(orjson.dumps(entry) + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
