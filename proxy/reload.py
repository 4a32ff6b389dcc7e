"""Hot reload: the YAML is re-read on SIGHUP and when the file changes, and swapped in atomically.

A request reads ``node.snapshot`` once and keeps it, so one assignment is the whole swap; usage
is keyed by key name and survives. An invalid file is rejected with one log line and the old
configuration stays. Upstream clients that the new configuration replaced are closed only once
every request that started before the swap has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, load_config
from .exchange import InFlight

if TYPE_CHECKING:
    from .app import Node, Snapshot
    from .upstream import Upstream

log = logging.getLogger("proxy.reload")

POLL_S = 1.0


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


class Reloader:
    """Watches one config file for a node; ``start``/``stop`` from the app's lifespan."""

    def __init__(
        self,
        node: Node,
        path: str | Path,
        build: Callable[[Config, Snapshot], Snapshot],
        inflight: InFlight,
        on_apply: Sequence[Callable[[Config], None]] = (),
        poll_s: float = POLL_S,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.node = node
        self.path = Path(path)
        self.build = build
        self.inflight = inflight
        self.on_apply = tuple(on_apply)
        self.poll_s = poll_s
        self.on_result = on_result
        self.reloads = 0  # applied reloads, for tests and /readyz
        self._seen: str | None = None  # digest of the file content last looked at
        self._wake = asyncio.Event()
        self._forced: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[Upstream] = []
        self._sighup = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.request, "SIGHUP")
            self._sighup = True
        except (AttributeError, NotImplementedError, RuntimeError, ValueError):
            pass  # no SIGHUP (Windows) or not the main thread: the file watch still works

    async def stop(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in (self._task, *self._retiring):
            if task is not None:
                task.cancel()
        for task in (self._task, *self._retiring):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for up in self._retired:
            with contextlib.suppress(Exception):
                await up.aclose()
        self._retired.clear()

    def request(self, reason: str = "SIGHUP") -> None:
        """Reload at the next opportunity, even if the file did not change."""
        self._forced = reason
        self._wake.set()

    # -- the watch loop -------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            forced, self._forced = self._forced, None
            try:
                digest = await asyncio.to_thread(self._digest)
            except OSError:
                digest = None  # moved away for a moment (editors replace files); next tick
            if forced is not None:
                self._seen = digest
                await self.reload(forced)
            elif digest is not None and digest != self._seen:
                first = self._seen is None
                self._seen = digest
                # The first look only catches a change made while the app was starting.
                await self.reload("file changed", quiet_if_unchanged=first)

    def _digest(self) -> str:
        # Size and mtime can stay equal over an edit; the content's hash cannot.
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    # -- one reload -----------------------------------------------------------------------------

    async def reload(self, reason: str, quiet_if_unchanged: bool = False) -> bool:
        """Load the file and apply it; False (and the old configuration stays) if invalid."""
        try:
            cfg = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            log.error(
                "config reload (%s) rejected, the previous configuration stays: %s",
                reason,
                _one_line(str(exc)),
            )
            self._result("rejected")
            return False
        try:
            return self.apply(cfg, reason, quiet_if_unchanged)
        except Exception as exc:  # e.g. an upstream client that cannot be built
            log.error(
                "config reload (%s) failed, the previous configuration stays: %s: %s",
                reason,
                type(exc).__name__,
                _one_line(str(exc)),
            )
            self._result("rejected")
            return False

    def apply(self, cfg: Config, reason: str = "api", quiet_if_unchanged: bool = False) -> bool:
        node = self.node
        previous = node.snapshot
        if cfg.backend != previous.config.backend:
            log.warning(
                "config reload (%s): the backend section changed; that needs a restart, "
                "the running backend and its settings are kept",
                reason,
            )
            cfg = cfg.model_copy(update={"backend": previous.config.backend})
        if cfg == previous.config:
            if not quiet_if_unchanged:
                log.info("config reload (%s): unchanged [pid %d]", reason, os.getpid())
            return True
        snap = self.build(cfg, previous)
        swapped_at = time.perf_counter()
        node.snapshot = snap  # the swap: one assignment; requests keep the snapshot they read
        for hook in self.on_apply:
            hook(cfg)
        kept = {id(u) for u in snap.upstreams.values()}
        replaced = {id(u): u for u in previous.upstreams.values() if id(u) not in kept}
        if replaced:
            task = asyncio.create_task(self._retire(list(replaced.values()), swapped_at))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self.reloads += 1
        self._result("applied")
        log.info(
            "config reloaded (%s) [pid %d]: %d keys, %d upstreams",
            reason,
            os.getpid(),
            len(cfg.keys),
            len(cfg.upstreams),
        )
        return True

    async def _retire(self, upstreams: list[Upstream], swapped_at: float) -> None:
        """Close replaced upstream clients once no request that might use them is left."""
        self._retired.extend(upstreams)
        while self.inflight.started_before(swapped_at):
            await asyncio.sleep(self.poll_s)
        for up in upstreams:
            self._retired.remove(up)
            with contextlib.suppress(Exception):
                await up.aclose()

    def _result(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)


def forwarding_supervisor(config: Any, sockets: list[Any]) -> Any:
    """uvicorn's multi-worker supervisor, except that SIGHUP makes every worker reload its
    configuration in place (stock uvicorn 0.55 replaces all workers on SIGHUP instead)."""
    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_hup(self) -> None:
            log.info("received SIGHUP, asking %d workers to reload", len(self.processes))
            for process in self.processes:
                pid = process.pid
                if pid is not None and process.process.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)

    return Supervisor(config, sockets=sockets)
