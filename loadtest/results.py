"""Per-request records of a run as compact columns (stdlib arrays), mergeable across processes."""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Negative "status" values for requests that got no complete HTTP response.
STATUS_CONNECT = -1  # no node accepted the connection / answered anything (after retries)
STATUS_TIMEOUT = -2  # the request timeout expired
STATUS_BROKEN = -3  # the response was cut off or malformed
STATUS_UNSENT = -4  # open loop: still held back by the in-flight cap when the run ended
STATUS_NAMES = {
    STATUS_CONNECT: "connection error",
    STATUS_TIMEOUT: "timeout",
    STATUS_BROKEN: "broken response",
    STATUS_UNSENT: "not sent (in-flight cap)",
}

# (column, array typecode). Times are seconds since the run start on the monotonic clock.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("intended", "d"),  # when the request was meant to go (open loop: the schedule)
    ("start", "d"),  # when it actually went (NaN: never sent)
    ("end", "d"),  # when the response was complete (or the failure known)
    ("first", "d"),  # first body byte (NaN without a response)
    ("status", "h"),  # HTTP status or one of STATUS_*
    ("dim", "b"),  # loadtest.classify.DIM_* for 429s
    ("retries", "b"),  # failovers to another node
    ("node", "b"),  # index into the config's urls of the node that answered last
    ("bytes_out", "q"),
    ("bytes_in", "q"),
    ("tok_in", "q"),  # usage.prompt_tokens, -1 when not reported
    ("tok_out", "q"),  # usage.completion_tokens, else stream data events, -1 when unknown
)
NAN = math.nan


@dataclass(slots=True)
class RunEvent:
    """Something the run did to the system under test (kill, restart), for the charts."""

    t: float
    kind: str
    detail: str
    pid: int | None = None


@dataclass(slots=True)
class Results:
    """All requests of a run (any order) plus what is needed to explain them."""

    columns: dict[str, array] = field(
        default_factory=lambda: {name: array(code) for name, code in COLUMNS}
    )
    config: dict[str, object] = field(default_factory=dict)
    events: list[RunEvent] = field(default_factory=list)
    ceiling_rps: float | None = None
    ceiling_source: str = "none"  # measured | given | none
    elapsed_s: float = 0.0  # from the run start to the end of the last request
    processes: int = 1

    def __len__(self) -> int:
        return len(self.columns["status"])

    def __getitem__(self, name: str) -> array:
        return self.columns[name]

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[float | int]], **meta: object) -> Results:
        """Rows are tuples in COLUMNS order (cheaper to append while running than 12 arrays)."""
        cols = {name: array(code, [r[i] for r in rows]) for i, (name, code) in enumerate(COLUMNS)}
        return cls(columns=cols, **meta)  # type: ignore[arg-type]

    @classmethod
    def merge(cls, parts: Iterable[Results], **meta: object) -> Results:
        parts = list(parts)
        merged = cls(**meta)  # type: ignore[arg-type]
        for part in parts:
            for name, col in part.columns.items():
                merged.columns[name].extend(col)
            merged.events.extend(part.events)
        merged.elapsed_s = max((p.elapsed_s for p in parts), default=0.0)
        merged.events.sort(key=lambda e: e.t)
        return merged
