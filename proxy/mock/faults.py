"""The `x-mock-fault` request header: fault directives parsed into a `Faults`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import MockRequestError

FAULT_HEADER = "x-mock-fault"


@dataclass(frozen=True, slots=True)
class Faults:
    """The parsed `x-mock-fault` header. `length` is the natural answer length (not a fault:
    the answer stops there with finish_reason "stop" when max_tokens allows)."""

    status: int | None = None
    cut_after: int | None = None
    no_usage: bool = False
    malformed_after: int | None = None
    usage_prompt: int | None = None
    usage_completion: int | None = None
    delay_first_ms: float = 0
    hang: bool = False
    length: int | None = None
    raw: str | None = None


_INT_FAULTS = {
    "status": "status",
    "cut-after": "cut_after",
    "malformed-after": "malformed_after",
    "usage-prompt": "usage_prompt",
    "usage-completion": "usage_completion",
    "delay-first-ms": "delay_first_ms",
    "length": "length",
}
_FLAG_FAULTS = {"no-usage": "no_usage", "hang": "hang"}
_NO_FAULTS = Faults()


def parse_faults(header: str | None) -> Faults:
    if not header:
        return _NO_FAULTS
    values: dict[str, Any] = {"raw": header}
    for item in header.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if key in _FLAG_FAULTS and not sep:
            values[_FLAG_FAULTS[key]] = True
        elif key in _INT_FAULTS and sep:
            try:
                number = int(value.strip())
            except ValueError:
                raise MockRequestError(f"{FAULT_HEADER}: {key} needs an integer") from None
            if number < 0 or (key == "status" and not 400 <= number <= 599):
                raise MockRequestError(f"{FAULT_HEADER}: {key}={number} is out of range")
            values[_INT_FAULTS[key]] = number
        else:
            raise MockRequestError(f"{FAULT_HEADER}: unknown directive {item!r}")
    return Faults(**values)
