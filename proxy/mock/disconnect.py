"""Noticing that the client went away while the mock waits or streams."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any


class _Disconnect:
    """Watches `receive` for the client going away, without consuming anything else."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.event = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.event.set()
                return

    async def sleep(self, seconds: float) -> bool:
        """Sleep; True if the client disconnected meanwhile."""
        if seconds > 0 and not self.event.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), seconds)
        return self.event.is_set()

    def close(self) -> None:
        self._task.cancel()
