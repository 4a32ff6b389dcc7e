"""The failure switch: kill a process at second S of a run and optionally start it again later."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time

from loadtest.config import LoadConfig
from loadtest.results import RunEvent


def signal_of(name: str) -> signal.Signals:
    return signal.Signals["SIG" + name.upper().removeprefix("SIG")]


class FailureSwitch:
    """Runs the config's kill/restart on a thread, timed from the run start ``t0``
    (monotonic). Events land in ``events``; a restarted process is left running (it is the
    service brought back) and its pid is in the restart event."""

    def __init__(self, cfg: LoadConfig, t0: float) -> None:
        self.t0 = t0
        self.actions: list[tuple[float, str]] = []
        if cfg.kill_at is not None:
            self.actions.append((cfg.kill_at, "kill"))
        if cfg.restart_at is not None:
            self.actions.append((cfg.restart_at, "restart"))
        self.actions.sort()
        self.cfg = cfg
        self.events: list[RunEvent] = []
        self.restarted: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loadtest-failure", daemon=True)

    @property
    def active(self) -> bool:
        return bool(self.actions)

    def start(self) -> FailureSwitch:
        if self.active:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel what has not happened yet (the run ended first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        for at, action in self.actions:
            if self._stop.wait(max(0.0, self.t0 + at - time.monotonic())):
                return
            now = time.monotonic() - self.t0
            if action == "kill":
                self.events.append(self._kill(now))
            else:
                self.events.append(self._restart(now))

    def _kill(self, now: float) -> RunEvent:
        pid = self.cfg.kill_pid
        assert pid is not None
        sig = signal_of(self.cfg.kill_signal)
        try:
            os.kill(pid, sig)
        except OSError as e:
            return RunEvent(now, "kill-failed", f"pid {pid}: {e}", pid)
        return RunEvent(now, "kill", f"{sig.name} to pid {pid}", pid)

    def _restart(self, now: float) -> RunEvent:
        cmd = self.cfg.restart_cmd
        assert cmd is not None
        try:
            # Detached (setsid): the service must outlive this run and ignore our terminal.
            self.restarted = subprocess.Popen(
                shlex.split(cmd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as e:
            return RunEvent(now, "restart-failed", f"{cmd}: {e}")
        pid = self.restarted.pid
        return RunEvent(now, "restart", f"pid {pid}: {cmd}", pid)
