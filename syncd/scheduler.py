"""One polling loop per sync: interval with ±10% jitter, never overlapping itself, bounded overall."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import structlog

from syncd.config import Sync
from syncd.source.ratelimit import PollSlot

log = structlog.get_logger("syncd.scheduler")

STARTUP_SPREAD = 10.0  # seconds over which the first polls of never-polled syncs are spread at start
ADDED_SPREAD = 1.0  # the same for a sync added while running


class _Entry:
    __slots__ = ("sync", "task", "reschedule", "removed", "polling", "last_start", "triggered", "next_at")

    def __init__(self, sync: Sync) -> None:
        self.sync = sync
        self.task: asyncio.Task | None = None
        self.reschedule = asyncio.Event()
        self.removed = False
        self.polling = False
        self.last_start: float | None = None  # wall clock
        self.triggered = False  # poll now (the control API's trigger)
        self.next_at: float | None = None  # wall clock of the next poll, for status views


class Scheduler:
    """Runs `run_poll(sync)` for every sync on its interval."""

    def __init__(self, run_poll: Callable[[Sync], Awaitable[object]], *, max_concurrent: int,
                 last_runs: dict[str, float] | None = None, not_before: dict[str, float] | None = None,
                 rnd: random.Random | None = None) -> None:
        self._run_poll = run_poll
        self._slots = asyncio.Semaphore(max_concurrent)
        self._entries: dict[str, _Entry] = {}
        self._last_runs = dict(last_runs or {})
        #: Syncs whose API asked for a pause past the interval (Retry-After): no poll before then.
        self._not_before = dict(not_before or {})
        self._rnd = rnd or random.Random()
        # Loops of removed syncs still finishing a poll: a re-added sync waits for them.
        self._retiring: dict[str, asyncio.Task] = {}

    def remember(self, states: dict) -> None:
        """When syncs this instance takes over (a lease, PostgreSQL) were last polled elsewhere, and
        their earliest next poll: the first poll here keeps their interval instead of starting anew."""
        for sync_id, state in states.items():
            if state.last_run_at:
                self._last_runs[sync_id] = state.last_run_at
            if state.next_run_at:
                self._not_before[sync_id] = state.next_run_at

    def next_polls(self) -> dict[str, float | None]:
        """When each scheduled sync polls next (None while it polls)."""
        return {sid: (None if e.polling else e.next_at) for sid, e in self._entries.items()}

    def trigger(self, sync_id: str) -> bool:
        """Poll `sync_id` now (after the poll under way, if one is). False if it is not scheduled."""
        entry = self._entries.get(sync_id)
        if entry is None:
            return False
        entry.triggered = True
        entry.reschedule.set()
        return True

    def running_polls(self) -> int:
        return sum(e.polling for e in self._entries.values())

    def update(self, syncs: dict[str, Sync], *, startup: bool = False, why: str = "sync removed or paused") -> None:
        """Start, change and stop loops so that exactly `syncs` are polled. `why`: the reason the
        log gives for those that stop."""
        for sync_id in list(self._entries):
            if sync_id not in syncs:
                entry = self._entries.pop(sync_id)
                entry.removed = True
                entry.reschedule.set()  # a running poll finishes; the loop then ends
                if entry.task is not None and not entry.task.done():
                    self._retiring[sync_id] = entry.task
                log.info(f"polling stopped ({why}); state and pending webhooks kept", sync=sync_id)
        for sync_id, sync in syncs.items():
            entry = self._entries.get(sync_id)
            if entry is None:
                entry = self._entries[sync_id] = _Entry(sync)
                first = self._first_delay(sync, STARTUP_SPREAD if startup else ADDED_SPREAD)
                entry.task = asyncio.create_task(self._loop(entry, first, self._retiring.pop(sync_id, None)), name=f"poll:{sync_id}")
                entry.task.add_done_callback(self._reap)
            elif entry.sync is not sync:
                changed_interval = entry.sync.spec.interval != sync.spec.interval
                entry.sync = sync
                if changed_interval:
                    entry.reschedule.set()

    def _first_delay(self, sync: Sync, spread: float) -> float:
        interval = sync.spec.interval
        wait = self._not_before.pop(sync.id, 0.0) - time.time()
        if wait > 0:
            return wait
        last = self._last_runs.get(sync.id)
        if last is not None:
            # Next-run times survive restarts: polled 2 min ago with a 5 min interval -> in ~3 min.
            due = last + interval - time.time()
            if due > 0:
                return min(due, interval)
        return self._rnd.uniform(0, min(interval, spread))

    async def _loop(self, entry: _Entry, delay: float, previous: asyncio.Task | None = None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # never overlap the removed version's last poll
        while not entry.removed:
            entry.next_at = time.time() + delay
            if delay > 0:
                try:
                    await asyncio.wait_for(entry.reschedule.wait(), delay)
                except TimeoutError:
                    pass
                else:
                    entry.reschedule.clear()
                    if entry.removed:
                        return
                    if entry.triggered:
                        entry.triggered = False
                        delay = 0.0
                        continue
                    # The interval changed: count the new one from the last poll's start.
                    start = entry.last_start or time.time()
                    delay = max(0.0, start + entry.sync.spec.interval - time.time())
                    continue
            async with PollSlot(self._slots):
                if entry.removed:
                    return
                entry.polling = True
                entry.last_start = time.time()
                not_before = None
                try:
                    outcome = await self._run_poll(entry.sync)
                    not_before = getattr(outcome, "not_before", None)
                except Exception:
                    log.exception("poll crashed; it will run again at the next interval", sync=entry.sync.id)
                finally:
                    entry.polling = False
            interval = entry.sync.spec.interval
            delay = max(0.0, entry.last_start + interval * self._rnd.uniform(0.9, 1.1) - time.time())
            if not_before is not None:
                # The API asked for a longer pause (Retry-After beyond the interval): honour it.
                delay = max(delay, not_before - time.time())

    def _reap(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # Never silently lose a poller: log it and start it again.
            name = task.get_name().removeprefix("poll:")
            log.error("polling loop died; restarting it", sync=name, error=repr(exc))
            entry = self._entries.get(name)
            if entry is not None and entry.task is task:
                entry.task = asyncio.create_task(self._loop(entry, entry.sync.spec.interval), name=task.get_name())
                entry.task.add_done_callback(self._reap)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every loop; a poll still running after `timeout` is cancelled (it then commits nothing)."""
        entries = list(self._entries.values())
        self._entries.clear()
        for entry in entries:
            entry.removed = True
            entry.reschedule.set()
        tasks = [e.task for e in entries if e.task is not None and not e.task.done()]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("polls cancelled at shutdown; a cancelled poll commits nothing unless its commit had begun",
                        cancelled=len(pending))
