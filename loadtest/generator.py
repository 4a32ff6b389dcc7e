"""The load generator: closed or open loop over keep-alive connections, one or many processes.

Library use: ``await run_load(cfg)`` runs in the current event loop (one process);
``run_load_sync(cfg)`` also forks ``cfg.processes`` workers, each running its share of the one
global schedule, and merges their records.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from loadtest import live
from loadtest.classify import DIM_NONE, rate_limit_dimension, usage_from_body
from loadtest.client import BadResponse, Connection, NoResponse, Response
from loadtest.config import LoadConfig
from loadtest.failure import FailureSwitch
from loadtest.payload import build_all
from loadtest.results import (
    NAN,
    STATUS_BROKEN,
    STATUS_CONNECT,
    STATUS_TIMEOUT,
    STATUS_UNSENT,
    Results,
)

_START_DELAY_S = 0.02  # from building requests to the first send, single process
_FORK_START_DELAY_S = 0.1  # from the last worker process being ready to the common start
_DOWN_BACKOFF_S = 0.01  # closed loop: pause after a request no node accepted, not a hot spin
_YIELD_EVERY = 64  # open loop: let sends run at least this often when behind schedule

T = TypeVar("T")


class _Node:
    __slots__ = ("down_until", "host", "idle", "port", "requests")

    def __init__(self, host: str, port: int, requests: list[bytes]) -> None:
        self.host = host
        self.port = port
        self.requests = requests  # per key
        self.idle: list[Connection] = []
        self.down_until = 0.0  # monotonic; refused a connection recently


def share(total: int, shard: int, shards: int) -> int:
    """How many of the global indices 0..total-1 fall on ``shard`` (index % shards)."""
    return total // shards + (1 if shard < total % shards else 0)


class _Runner:
    def __init__(self, cfg: LoadConfig, t0: float, row: live.Row) -> None:
        self.cfg = cfg
        self.t0 = t0
        self.row = row
        payloads = build_all(cfg)
        self.nodes = [_Node(t.host, t.port, payloads[n]) for n, t in enumerate(cfg.targets())]
        self.nkeys = len(cfg.keys)
        # Keys and nodes both go round-robin by request index; when their counts share a factor
        # some (key, node) pairs would never meet, so shift the node once per full cycle.
        n = len(self.nodes)
        self.shift_every = math.lcm(self.nkeys, n) if math.gcd(self.nkeys, n) > 1 else 0
        self.rng = random.Random(cfg.seed * 1009 + cfg.shard)
        self.rows: list[tuple[float | int, ...]] = []
        dur = cfg.effective_duration
        self.deadline = math.inf if dur is None else t0 + dur
        total = cfg.requests if cfg.requests is not None else sys.maxsize
        self.limit = share(total, cfg.shard, cfg.shards)

    # -- node choice -------------------------------------------------------------------------

    def _pick(self, i: int) -> int:
        n = len(self.nodes)
        if n == 1:
            return 0
        if self.cfg.pick == "random":
            idx = self.rng.randrange(n)
        else:
            idx = (i + i // self.shift_every) % n if self.shift_every else i % n
        return self._up_from(idx, time.monotonic())

    def _up_from(self, idx: int, now: float) -> int:
        """``idx`` or the next node after it that has not refused a connection recently."""
        n = len(self.nodes)
        for k in range(n):
            j = (idx + k) % n
            if self.nodes[j].down_until <= now:
                return j
        return idx

    # -- one request -------------------------------------------------------------------------

    async def _attempt(self, node: _Node, request: bytes) -> Response:
        conn = node.idle.pop() if node.idle else await Connection.open(node.host, node.port)
        while True:
            try:
                resp = await conn.exchange(request)
            except NoResponse:
                conn.close()
                if not conn.reused:
                    raise
                # A kept-alive connection the server had closed: once more on a fresh one.
                conn = await Connection.open(node.host, node.port)
                continue
            except BaseException:
                conn.close()
                raise
            if resp.keep_alive:
                node.idle.append(conn)
            else:
                conn.close()
            return resp

    async def one(self, i: int, intended: float | None) -> int:
        """Send request ``i`` (retrying connection failures on other nodes), record it."""
        cfg = self.cfg
        t0 = self.t0
        key = i % self.nkeys
        node_idx = self._pick(i)
        start = time.monotonic()
        if intended is None:
            intended = start - t0
        retries = 0
        bytes_out = 0
        resp: Response | None = None
        status = 0
        try:
            async with asyncio.timeout(cfg.timeout):
                while True:
                    node = self.nodes[node_idx]
                    request = node.requests[key]
                    try:
                        resp = await self._attempt(node, request)
                        bytes_out += len(request)
                        break
                    except NoResponse:
                        now = time.monotonic()
                        node.down_until = now + cfg.eject_s
                        if retries >= cfg.retries:
                            status = STATUS_CONNECT
                            break
                        retries += 1
                        node_idx = self._up_from((node_idx + 1) % len(self.nodes), now)
        except TimeoutError:
            status = STATUS_TIMEOUT
        except BadResponse:
            status = STATUS_BROKEN
        end = time.monotonic()
        dim = DIM_NONE
        first = NAN
        bytes_in = tok_in = tok_out = -1
        if resp is not None:
            status = resp.status
            first = resp.first_byte - t0
            bytes_in = resp.bytes_in
            if status == 429:
                dim = rate_limit_dimension(resp.body, resp.headers)
            sse = resp.sse
            if sse is not None:
                if sse.usage is not None:
                    tok_in, tok_out = sse.usage
                else:
                    tok_out = sse.events
            elif 200 <= status < 300 and (usage := usage_from_body(resp.body)) is not None:
                tok_in, tok_out = usage
        self.rows.append(
            (
                intended,
                start - t0,
                end - t0,
                first,
                status,
                dim,
                retries,
                node_idx,
                bytes_out,
                max(bytes_in, 0),
                tok_in,
                tok_out,
            )
        )
        live.record(self.row, status, retries, end - t0 - intended)
        return status

    # -- the two loops -----------------------------------------------------------------------

    async def closed_loop(self) -> None:
        cfg = self.cfg
        tickets = itertools.count()
        shard, shards = cfg.shard, cfg.shards
        limit, deadline = self.limit, self.deadline

        t0 = self.t0

        async def worker() -> None:
            while (j := next(tickets)) < limit:
                now = time.monotonic()
                if now >= deadline:
                    return
                if await self.one(shard + j * shards, now - t0) == STATUS_CONNECT:
                    await asyncio.sleep(_DOWN_BACKOFF_S)

        n = share(cfg.concurrency, shard, shards)
        await asyncio.gather(*(worker() for _ in range(n)))

    async def open_loop(self) -> None:
        cfg = self.cfg
        assert cfg.rate is not None
        rate, t0 = cfg.rate, self.t0
        shard, shards = cfg.shard, cfg.shards
        dur = cfg.effective_duration
        sem = asyncio.Semaphore(max(1, math.ceil(cfg.max_inflight / shards)))
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()

        async def send(i: int, intended: float) -> None:
            try:
                await self.one(i, intended)
            finally:
                sem.release()

        behind = 0
        for j in range(self.limit):
            i = shard + j * shards
            intended = i / rate  # the global schedule; latency counts from here
            if dur is not None and intended >= dur:
                break
            delay = t0 + intended - time.monotonic()
            if delay > 0.0005:
                behind = 0
                await asyncio.sleep(delay)
            else:
                behind += 1
                if behind >= _YIELD_EVERY:
                    behind = 0
                    await asyncio.sleep(0)
            await sem.acquire()
            if time.monotonic() >= self.deadline:
                # The in-flight cap held requests back past the end: they count as not sent,
                # so a server that cannot keep up shows as failures rather than vanishing.
                sem.release()
                self._record_unsent(j, rate, dur)
                break
            task = loop.create_task(send(i, intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)  # each is bounded by the request timeout

    def _record_unsent(self, j0: int, rate: float, dur: float | None) -> None:
        shard, shards, t0 = self.cfg.shard, self.cfg.shards, self.t0
        end = time.monotonic() - t0
        for j in range(j0, self.limit):
            intended = (shard + j * shards) / rate
            if dur is not None and intended >= dur:
                break
            self.rows.append((intended, NAN, end, NAN, STATUS_UNSENT, 0, 0, 0, 0, 0, -1, -1))
            live.record(self.row, STATUS_UNSENT, 0, 0.0)

    def close(self) -> None:
        for node in self.nodes:
            for conn in node.idle:
                conn.close(graceful=True)
            node.idle.clear()


async def run_load(
    cfg: LoadConfig, *, t0: float | None = None, live_row: live.Row | None = None
) -> Results:
    """Run ``cfg`` in this event loop and process (``cfg.processes`` is ignored here).

    ``t0`` is the common monotonic start (the multi-process wrapper passes one); a standalone
    call also runs the failure switch, the progress line and the ceiling measurement."""
    standalone = t0 is None
    ceiling_rps, ceiling_source = cfg.ceiling_rps, "given" if cfg.ceiling_rps else "none"
    if standalone and ceiling_rps is None and cfg.measure_ceiling:
        from loadtest.ceiling import measure_in_subprocess

        ceiling_rps = await asyncio.to_thread(measure_in_subprocess, 1, cfg.ceiling_duration)
        ceiling_source = "measured"
    row = live_row if live_row is not None else live.new_row()
    if t0 is None:
        t0 = time.monotonic() + _START_DELAY_S
    runner = _Runner(cfg, t0, row)
    switch = FailureSwitch(cfg, t0) if standalone else None
    progress = live.Progress([row], t0) if standalone and cfg.progress else None
    if switch:
        switch.start()
    if progress:
        progress.start()
    try:
        if (delay := t0 - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        if cfg.rate is None:
            await runner.closed_loop()
        else:
            await runner.open_loop()
    finally:
        runner.close()
        if switch:
            switch.stop()
        if progress:
            progress.stop()
    results = Results.from_rows(
        runner.rows,
        config=cfg.describe(),
        ceiling_rps=ceiling_rps,
        ceiling_source=ceiling_source,
        processes=1,
    )
    results.elapsed_s = time.monotonic() - t0
    if switch:
        results.events.extend(switch.events)
    return results


def run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _worker_main(
    cfg: LoadConfig, conn: mp.connection.Connection, row: live.Row
) -> None:  # pragma: no cover - runs in a forked process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # Forked from a caller that may itself be inside an event loop: this process has none.
    asyncio.events._set_running_loop(None)
    conn.send("ready")
    t0 = conn.recv()
    results = run_coroutine(run_load(cfg, t0=t0, live_row=row))
    conn.send(results)
    conn.close()


def run_load_sync(cfg: LoadConfig) -> Results:
    """Run ``cfg`` to the end in ``cfg.processes`` processes and merge their records."""
    if cfg.processes == 1:
        return run_coroutine(run_load(cfg))
    ceiling_rps, ceiling_source = cfg.ceiling_rps, "given" if cfg.ceiling_rps else "none"
    if ceiling_rps is None and cfg.measure_ceiling:
        from loadtest.ceiling import measure_in_subprocess

        ceiling_rps = measure_in_subprocess(cfg.processes, cfg.ceiling_duration)
        ceiling_source = "measured"
    # No process without work: each needs at least one worker and one request of its own.
    nproc = min(cfg.processes, cfg.requests or cfg.processes)
    if cfg.rate is None:
        nproc = min(nproc, cfg.concurrency)
    if nproc == 1:
        one = run_coroutine(run_load(cfg.replace(ceiling_rps=ceiling_rps, measure_ceiling=False)))
        one.ceiling_source = ceiling_source
        return one
    ctx = mp.get_context("fork")
    rows = [ctx.RawArray("d", live.ROW_SIZE) for _ in range(nproc)]
    pipes: list[mp.connection.Connection] = []
    procs = []
    for k in range(nproc):
        child_cfg = cfg.replace(
            shard=k,
            shards=nproc,
            processes=1,
            kill_at=None,
            kill_pid=None,
            restart_at=None,
            restart_cmd=None,
            progress=False,
            measure_ceiling=False,
        )
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child_cfg, theirs, rows[k]), daemon=True)
        proc.start()
        theirs.close()
        pipes.append(ours)
        procs.append(proc)
    switch: FailureSwitch | None = None
    progress: live.Progress | None = None
    finished = False
    try:
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                raise RuntimeError("a generator process did not start")
        t0 = time.monotonic() + _FORK_START_DELAY_S
        for pipe in pipes:
            pipe.send(t0)
        switch = FailureSwitch(cfg, t0).start()
        if cfg.progress:
            progress = live.Progress(rows, t0).start()
        parts = []
        for proc, pipe in zip(procs, pipes, strict=True):
            try:
                parts.append(pipe.recv())
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"generator process exited with {proc.exitcode}") from None
        finished = True
    finally:
        if switch:
            switch.stop()
        if progress:
            progress.stop()
        for proc in procs:
            proc.join(5 if finished else 0)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
                proc.join()
        for pipe in pipes:
            pipe.close()
    merged = Results.merge(
        parts,
        config=cfg.describe(),
        ceiling_rps=ceiling_rps,
        ceiling_source=ceiling_source,
        processes=nproc,
    )
    if switch:
        merged.events.extend(switch.events)
    return merged
