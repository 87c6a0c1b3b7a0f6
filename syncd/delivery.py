"""Webhook delivery from the outbox: at least once, signed, ordered per record, retried, dead letters.

A dispatcher claims due events (only the oldest undelivered event of each record), workers POST
them with bounded concurrency, and one writer persists outcomes in batches. A record stays
claimed until its outcome is committed, so the next event of that record is never sent before
the earlier one is recorded as delivered or dead — not even across a crash.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
import structlog

from syncd.fetch import USER_AGENT, error_snippet
from syncd.metrics import Metrics
from syncd.signing import sign_headers
from syncd.store import PendingEvent, Store

log = structlog.get_logger("syncd.delivery")

IDLE_RECHECK = 1.0  # seconds between outbox checks when idle (events written by other processes)
BATCH = 256


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to deliver a sync's events."""

    url: str | None  # None: use the URL stored with the event
    secret: str | None


@dataclass(slots=True)
class Outcome:
    event: PendingEvent
    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def next_delay(attempts: int, schedule: list[float], retry_after: float | None, rnd: random.Random = random._inst) -> float | None:
    """Delay before the next attempt after `attempts` failed attempts; None when the schedule is exhausted."""
    if attempts > len(schedule):
        return None
    scheduled = schedule[attempts - 1]
    if retry_after is not None:
        # Honour the receiver's Retry-After, but never beyond twice our own next delay.
        return min(retry_after, scheduled * 2)
    return scheduled * rnd.uniform(0.8, 1.2)


class Deliverer:
    """Delivers the outbox until `stop` is set. Embeddable: `await Deliverer(...).run(stop)`."""

    def __init__(self, store: Store, session: aiohttp.ClientSession, *, concurrency: int, timeout: float,
                 schedule: list[float], target: Callable[[str], Target], metrics: Metrics | None = None,
                 drain_timeout: float = 10.0) -> None:
        self.store = store
        self.session = session
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.schedule = list(schedule)
        self.target = target
        self.metrics = metrics
        #: At stop, how long in-flight attempts may take before they are cancelled (and stay queued).
        self.drain_timeout = drain_timeout
        self._claimed: set[int] = set()  # seqs read and not yet committed
        self._claimed_records: set[tuple[str, str]] = set()
        self._ready: deque[PendingEvent] = deque()  # claimed, waiting for a worker
        self._results: asyncio.Queue[Outcome] = asyncio.Queue()
        # One wake-up for the feeder: new events committed (the store sets it), outcomes
        # persisted (claims released), a worker running low, or stop.
        self._wake = store.outbox_changed
        self._work = asyncio.Condition()
        self._stopping = False
        self._in_flight = 0
        self.delivered = 0
        self.failed_attempts = 0

    async def run(self, stop: asyncio.Event) -> None:
        writer = asyncio.create_task(self._writer(), name="delivery-writer")
        workers = [asyncio.create_task(self._worker(), name=f"delivery-{i}") for i in range(self.concurrency)]
        stopper = asyncio.create_task(self._on_stop(stop), name="delivery-stop")
        try:
            await self._feed(stop)
        finally:
            # Let in-flight attempts finish (bounded), persist what they achieved, leave the rest queued.
            self._stopping = True
            self._ready.clear()
            async with self._work:
                self._work.notify_all()
            if self._in_flight:
                log.info("waiting for in-flight deliveries", in_flight=self._in_flight, timeout=self.drain_timeout)
            done, not_done = await asyncio.wait(workers, timeout=self.drain_timeout)
            for task in not_done:
                task.cancel()
            if not_done:
                await asyncio.wait(not_done)
            if self._cancelled:
                log.warning("in-flight deliveries cancelled at shutdown; they stay queued", cancelled=self._cancelled)
            await self._results.join()
            for task in (writer, stopper):
                task.cancel()
            await asyncio.gather(writer, stopper, return_exceptions=True)

    _cancelled = 0

    async def _on_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _feed(self, stop: asyncio.Event) -> None:
        """Keep the ready queue topped up from the outbox; sleep when there is nothing due."""
        store, low = self.store, self.concurrency
        while not stop.is_set():
            self._wake.clear()
            if len(self._ready) < low:
                found = await self._refill()
                if found:
                    async with self._work:
                        self._work.notify(found)
                    if len(self._ready) < low:
                        continue  # there may be more right behind
            timeout = IDLE_RECHECK
            if not self._ready and not self._in_flight and not self._claimed:
                due = await store.next_due()
                if due is not None:
                    timeout = min(IDLE_RECHECK, max(0.01, due - time.time()))
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _refill(self) -> int:
        rows = await self.store.due_events(time.time(), len(self._claimed) + BATCH)
        found = 0
        for event in rows:
            key = (event.sync_id, event.record_id)
            if event.seq in self._claimed or key in self._claimed_records:
                continue
            self._claimed.add(event.seq)
            self._claimed_records.add(key)
            self._ready.append(event)
            found += 1
        return found

    async def _worker(self) -> None:
        ready, work = self._ready, self._work
        while True:
            if not ready:
                async with work:
                    await work.wait_for(lambda: bool(ready) or self._stopping)
                if self._stopping:
                    return
                continue
            event = ready.popleft()
            if len(ready) < self.concurrency:
                self._wake.set()  # running low: let the feeder look for more
            self._in_flight += 1
            try:
                outcome = await self._post(event)
            except asyncio.CancelledError:
                # Shutdown: the attempt's result is unknown; the event stays queued and is sent again.
                self._cancelled += 1
                self._release([event])
                raise
            finally:
                self._in_flight -= 1
            self._results.put_nowait(outcome)
            if self._stopping:
                return

    async def _post(self, event: PendingEvent) -> Outcome:
        target = self.target(event.sync_id)
        url = target.url or event.webhook_url
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if target.secret:
            headers.update(sign_headers(target.secret, event.event_id, int(time.time()), event.body))
        t0 = time.perf_counter()
        try:
            async with self.session.post(url, data=event.body, headers=headers, allow_redirects=False,
                                         timeout=self.timeout) as resp:
                status = resp.status
                if 200 <= status < 300:
                    return Outcome(event, True, status)
                detail = await error_snippet(resp)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time()) if status in (429, 503) else None
                if 300 <= status < 400:
                    where = resp.headers.get("Location", "")
                    error = f"HTTP {status} redirect to {where!r} (redirects are not followed; fix webhook_url)"
                else:
                    error = f"HTTP {status}{detail}"
                return Outcome(event, False, status, error, retry_after, gone=status == 410)
        except asyncio.TimeoutError:
            return Outcome(event, False, None, f"no response within webhook_timeout ({self.timeout.total:g}s)")
        except aiohttp.ClientConnectorError as exc:
            return Outcome(event, False, None, f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}")
        except aiohttp.ClientError as exc:
            return Outcome(event, False, None, f"{type(exc).__name__}: {exc}")
        finally:
            if self.metrics is not None and self.metrics.known(event.sync_id):
                self.metrics.delivery_duration.labels(event.sync_id).observe(time.perf_counter() - t0)

    async def _writer(self) -> None:
        """Persist outcomes in batches: one transaction for everything that finished meanwhile."""
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():
                batch.append(self._results.get_nowait())
            try:
                await self._persist(batch)
            except Exception:
                log.exception("could not record delivery outcomes; the events stay queued and will be sent again")
            finally:
                self._release([o.event for o in batch])
                for _ in batch:
                    self._results.task_done()
                self._wake.set()  # released records may have their next event due

    async def _persist(self, batch: list[Outcome]) -> None:
        now = time.time()
        delivered, retries, dead = [], [], []
        metrics = self.metrics
        for o in batch:
            e = o.event
            counted = metrics is not None and metrics.known(e.sync_id)
            if o.ok:
                delivered.append(e.seq)
                self.delivered += 1
                if counted:
                    metrics.deliveries.labels(e.sync_id).inc()
                continue
            self.failed_attempts += 1
            if counted:
                metrics.delivery_failures.labels(e.sync_id).inc()
            attempts = e.attempts + 1
            delay = None if o.gone else next_delay(attempts, self.schedule, o.retry_after)
            if delay is None:
                dead.append((attempts, now, o.status, o.error, e.seq))
                log.warning("event is now a dead letter", sync=e.sync_id, event_id=e.event_id, record_id=e.record_id,
                            attempts=attempts, error=o.error,
                            hint="replay with: syncd deliveries replay --event " + e.event_id)
            else:
                retries.append((attempts, now + delay, o.status, o.error, e.seq))
                log.info("delivery failed; will retry", sync=e.sync_id, event_id=e.event_id, attempts=attempts,
                         retry_in=round(delay, 3), error=o.error)
        await self.store.record_attempts(delivered, retries, dead)

    def _release(self, events: list[PendingEvent]) -> None:
        for e in events:
            self._claimed.discard(e.seq)
            self._claimed_records.discard((e.sync_id, e.record_id))
