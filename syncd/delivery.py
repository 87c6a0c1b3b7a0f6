"""Webhook delivery from the outbox: at least once, signed, ordered per record, retried, dead letters.

A dispatcher claims due events from the store (only the oldest undelivered event of each record),
workers POST them with bounded concurrency, and one writer persists outcomes in batches. A record
stays claimed until its outcome is committed, so the next event of that record is never sent
before the earlier one is recorded as delivered or dead: not across a crash, and (PostgreSQL) not
by another instance.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_plus, urlsplit

import orjson
import structlog
from yarl import URL

from syncd.config import scrub
from syncd.events import LIFECYCLE_KEY, EventType, lifecycle
from syncd.http import describe_error, parse_retry_after, snippet_text
from syncd.metrics import Metrics
from syncd.signing import signer
from syncd.store import OutboxEvent, PendingEvent, StateStore, StoreError
from syncd.webhook_client import WebhookClient, WebhookError

log = structlog.get_logger("syncd.delivery")

IDLE_RECHECK = 1.0  # seconds between outbox checks when idle (events written by other processes)
ANNOUNCE_AFTER = 0.2  # seconds of outcomes gathered before looking for fully consumed runs
BATCH = 256
MAX_BATCH = 1024
# A timer per request costs CPU on every attempt: attempts are timed out by one sweep instead,
# running every TIMEOUT_SLACK x webhook_timeout (10 ms to 1 s), so an attempt ends at most that
# much late. Cancelling an attempt closes its connection (syncd.webhook_client).
TIMEOUT_SLACK = 0.1
# While attempts are in flight the writer waits this long (seconds) for more outcomes: fewer,
# larger transactions. A record's next event waits for the commit, so it is sent this much later.
WRITE_LINGER = 0.005
SYNC_LIST_REFRESH = 0.5  # seconds between looks at which syncs have due events
MAX_SYNCS_PER_REFILL = 32
SHOWN = 200  # characters of a receiver's error body, or of a redirect's Location, put in an error


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to deliver a sync's events."""

    url: str | None  # None: use the URL stored with the event
    secret: str | None = field(repr=False)
    #: Never shown in a delivery error: the sync's ${NAME} values and credentials (config.Sync.secrets).
    secrets: frozenset[str] = field(default=frozenset(), repr=False)


@dataclass(slots=True)
class Outcome:
    event: PendingEvent
    ok: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    gone: bool = False


#: Seconds between two warnings about one sync's failing receiver.
WARN_EVERY = 300.0


def receiver_of(url: str) -> str:
    """A webhook URL's host:port, for logs: its path and query may hold a token."""
    try:
        u = URL(url)
        return f"{u.host}:{u.port}"
    except (ValueError, TypeError):
        return "(unparsable URL)"


@functools.lru_cache(maxsize=256)
def url_secrets(url: str) -> frozenset[str]:
    """What in a webhook URL may be a credential, whatever its name: every query value and the
    userinfo's password (its user name when there is no password: a token then), each as written,
    as sent (normalised) and decoded, and the Basic credentials the userinfo becomes. A receiver
    echoing the request in its error body must not put them in an error."""
    found: set[str] = set()
    queries = []
    try:
        queries.append(urlsplit(url).query)
        u = URL(url)
        queries.append(u.raw_query_string)
        userinfo = [u.raw_password, u.password] if u.raw_password else [u.raw_user, u.user]
        if u.raw_user is not None or u.raw_password is not None:  # as syncd.webhook_client sends it
            credentials = f"{u.user or ''}:{u.password or ''}"
            try:
                raw = credentials.encode("latin-1")
            except UnicodeEncodeError:
                raw = credentials.encode()
            userinfo.append(base64.b64encode(raw).decode())
    except (ValueError, TypeError):
        return frozenset()
    found.update(v for v in userinfo if v)
    for query in queries:
        for part in query.replace(";", "&").split("&"):
            value = part.partition("=")[2] if "=" in part else part
            if value:
                found.update((value, unquote(value), unquote_plus(value)))
    found |= {orjson.dumps(v).decode()[1:-1] for v in found}  # as a JSON string shows it
    return frozenset(found)


_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/]*@")


def _location(value: str) -> str:
    """A redirect's Location for an error: without userinfo and fragment, its query values masked."""
    where, _, query = value.partition("#")[0].partition("?")
    where = _USERINFO.sub(r"\1", where, count=1)
    if query:
        where += "?" + "&".join(f"{part.partition('=')[0]}=***" if "=" in part else "***"
                                for part in query.split("&") if part)
    return where


def _shown(text: str, secrets: frozenset[str]) -> str:
    """`text` without secrets, then cut to SHOWN characters (cut first, a secret could be left in part)."""
    text = scrub(text, secrets)
    return text if len(text) <= SHOWN else text[:SHOWN] + "..."


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
    """Delivers the outbox until `stop` is set. Embeddable: `await Deliverer(...).run(stop)`.

    `session` is the client from `syncd.http.webhook_session()`, closed by the caller."""

    def __init__(self, store: StateStore, session: WebhookClient, *, concurrency: int, timeout: float,
                 schedule: list[float], target: Callable[[str], Target], metrics: Metrics | None = None,
                 drain_timeout: float = 10.0) -> None:
        self.store = store
        self.session = session
        self.concurrency = concurrency
        self.timeout = timeout
        self.schedule = list(schedule)
        self.target = target
        self.metrics = metrics
        #: At stop, how long in-flight attempts may take before they are cancelled (and stay queued).
        self.drain_timeout = drain_timeout
        self._claimed: set[int] = set()  # seqs claimed from the store and not yet settled
        self._claims_by_sync: Counter[str] = Counter()
        #: When a sync's failing receiver was last warned about: a warning every WARN_EVERY at
        #: most, the attempts in between at info (a receiver down for an hour is one line, not 10,000).
        self._warned_at: dict[str, float] = {}
        self._busy_by_sync: Counter[str] = Counter()
        self._due_syncs: list[str] = []
        self._due_syncs_at = 0.0
        self._due_looked_at = 0.0  # when due_syncs was last read (_due_syncs_at may be reset to force a look)
        self._turn = 0  # round-robin offset over syncs
        self._store_failing = False
        # Claimed events waiting for a worker, per sync (in claim order), and how many in all.
        self._queues: dict[str, deque[PendingEvent]] = {}
        self._queued = 0
        self._turns = itertools.count()
        self._last_turn: dict[str, int] = {}  # when each sync with claims last got a worker (a turn number)
        self._deadlines: dict[asyncio.Task, float] = {}  # worker -> when its attempt times out (monotonic)
        self._expired: set[asyncio.Task] = set()  # workers cancelled by the sweep for their timeout
        self._outcomes: list[Outcome] = []  # attempts finished, not yet handed to the writer
        self._have_outcomes = asyncio.Event()
        self._unwritten = 0  # outcomes not yet persisted (handed to the writer or not)
        self._all_written = asyncio.Event()
        self._all_written.set()
        # One wake-up for the feeder: new events committed (the store sets it), outcomes
        # persisted (claims released), a worker running low, or stop.
        self._wake = store.outbox_changed
        self._work = asyncio.Condition()
        self._waiting = 0  # workers waiting on _work for an event they may take
        self._stopping = False
        self._settled = asyncio.Event()  # outcomes were written: a run may be fully consumed
        self._settled.set()  # look once at start (a crash may have left a run unannounced)
        self._in_flight = 0
        self._cancelled = 0  # attempts cut off at shutdown
        self._unsettled: list[PendingEvent] = []  # their events, given back to the store at the end
        self.delivered = 0
        self.failed_attempts = 0

    async def run(self, stop: asyncio.Event) -> None:
        writer = asyncio.create_task(self._writer(), name="delivery-writer")
        workers = [asyncio.create_task(self._worker(), name=f"delivery-{i}") for i in range(self.concurrency)]
        stopper = asyncio.create_task(self._on_stop(stop), name="delivery-stop")
        announcer = asyncio.create_task(self._announcer(), name="delivery-announcer")
        sweeper = asyncio.create_task(self._sweep(), name="delivery-timeouts")
        try:
            await self._feed(stop)
        finally:
            # Let in-flight attempts finish (bounded), persist what they achieved, leave the rest queued.
            self._stopping = True
            self._queues.clear()
            self._queued = 0
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
            try:
                await asyncio.wait_for(self._all_written.wait(), max(self.drain_timeout, 1.0))
            except TimeoutError:
                log.error("could not record the last delivery outcomes before stopping; those events will be sent again")
            if self._unsettled:
                try:
                    await self.store.release(self._unsettled)
                except Exception:  # they are claimable again once this instance is gone
                    log.warning("could not give back the claims of cancelled deliveries", events=len(self._unsettled))
            for task in (writer, stopper, announcer, sweeper):
                task.cancel()
            await asyncio.gather(writer, stopper, announcer, sweeper, return_exceptions=True)

    async def _on_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _feed(self, stop: asyncio.Event) -> None:
        """Keep the ready queue topped up from the outbox; sleep when there is nothing due."""
        store, low = self.store, self.concurrency
        backoff = 0.5
        while not stop.is_set():
            self._wake.clear()
            timeout = IDLE_RECHECK
            try:
                now = time.time()
                if self._unsettled and not self._stopping:
                    dropped, self._unsettled = self._unsettled, []
                    await store.release(dropped)
                if now - self._due_syncs_at > SYNC_LIST_REFRESH:
                    self._due_syncs, self._due_syncs_at = await store.due_syncs(now), now
                    self._due_looked_at = now
                # A sync with due events and nothing claimed is starving behind the others' backlog.
                starving = any(s not in self._claims_by_sync for s in self._due_syncs)
                found = 0
                if (self._queued < low or starving) and not self._store_failing:
                    found = await self._refill()
                # Also without new events: released claims may have raised the shares (fewer syncs
                # with work), making queued events takeable by idle workers.
                if self._queued and self._waiting:
                    async with self._work:
                        self._work.notify(self._queued)
                if found and self._queued < low:
                    continue  # there may be more right behind
                if not self._queued and not self._in_flight and not self._claimed:
                    due = await store.next_due()
                    if due is not None:
                        timeout = min(IDLE_RECHECK, max(0.01, due - time.time()))
                else:
                    # Work in hand (perhaps every worker waiting on hung receivers, so no wake-up
                    # comes): look for syncs that became due as soon as the list may be read again,
                    # for them to get their share of the workers as the current attempts end.
                    # From the last look, not from _due_syncs_at, which an empty refill resets to 0:
                    # that made this a 10 ms loop of queries while one attempt hung.
                    timeout = min(timeout, max(0.01, self._due_looked_at + SYNC_LIST_REFRESH - time.time()))
                backoff = 0.5
            except StoreError as exc:
                # The state database is unreadable (locked for long, I/O error, server away): keep trying, slowly.
                log.error("cannot read the outbox; retrying", error=str(exc), retry_in=backoff)
                timeout, backoff = backoff, min(backoff * 2, 30.0)
            except Exception:
                log.exception("cannot read the outbox (internal error; please report it); retrying", retry_in=backoff)
                timeout, backoff = backoff, min(backoff * 2, 30.0)
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _refill(self) -> int:
        """Claim due events, taking turns between syncs so that one sync's backlog or dead receiver
        never holds up the others."""
        now = time.time()
        if not self._due_syncs:
            self._due_syncs, self._due_syncs_at = await self.store.due_syncs(now), now
            self._due_looked_at = now
        syncs = self._due_syncs
        if not syncs:
            return 0
        shared = len(syncs) > 1
        start = self._turn % len(syncs)
        self._turn += 1
        order = (syncs[start:] + syncs[:start])[:MAX_SYNCS_PER_REFILL]
        claims = self._claims_by_sync
        if shared:
            # Each sync claims up to twice its share of the workers: its share in flight and as many
            # queued for its next turn, not its whole backlog.
            room = 2 * self._share(len(claims.keys() | set(order)))
            rooms = {sid: min(BATCH, room - claims[sid]) for sid in order}
            events = await self.store.claim_spread(now, {sid: n for sid, n in rooms.items() if n > 0})
        else:
            # The store reads the rows it has claimed already again (it skips them): claim at least
            # as many as are held, so that no more than one row is read twice per new one.
            events = await self.store.claim_due(now, min(MAX_BATCH, max(BATCH, len(self._claimed))))
        queues, claimed = self._queues, self._claimed
        for event in events:
            claimed.add(event.seq)
            claims[event.sync_id] += 1
            queue = queues.get(event.sync_id)
            if queue is None:
                queue = queues[event.sync_id] = deque()
            queue.append(event)
        found = len(events)
        self._queued += found
        if not found:
            self._due_syncs_at = 0.0  # look again next time: the list may be stale
        return found

    def _share(self, syncs: int) -> int:
        """The most workers one of `syncs` syncs with work may hold: all of them for one sync,
        ceil(concurrency / syncs) for several."""
        return -(-self.concurrency // syncs) if syncs > 1 else self.concurrency

    def _take(self) -> PendingEvent | None:
        """The next event of the sync that holds the fewest workers, among those it may go to; on a
        tie, of the sync whose last turn is the oldest.

        The syncs with work are those with events claimed (queued, in flight, or their outcome
        being written); a sync with due events is among them from the next refill (the feeder looks
        for syncs with nothing claimed every time). While n syncs have work, each is guaranteed
        concurrency // n workers and may hold at most ceil(concurrency / n): a worker goes to a sync
        beyond its guaranteed number only if enough stay free for the others' guarantees. So the
        workers that receivers which never answer hold are freed within one webhook_timeout and are
        then kept for the other syncs, however many receivers hang (with more syncs than workers,
        each sync gets one in turn). A cap of 3/4 of the workers each let two hung syncs hold all of
        them; a cap alone lets them take the workers back whenever another sync's queue runs dry for
        a moment (its next events wait for the outcomes of the last to be written)."""
        queues = self._queues
        if not queues:
            return None
        claims = self._claims_by_sync
        if len(claims) == 1:  # one sync alone: all the workers are its own (a free one is below its share)
            sync_id = next(iter(queues))
        else:
            busy, last = self._busy_by_sync, self._last_turn
            cap = self._share(len(claims))
            base = self.concurrency // len(claims)
            reserved = 0  # free workers the syncs below their guaranteed number may still claim
            if base:
                for sid in claims:
                    held = busy[sid]
                    if held < base:
                        reserved += base - held
            spare = self.concurrency - self._in_flight - reserved  # this worker included
            sync_id, best = None, None
            for sid in queues:
                held = busy[sid]
                if held < base or (held < cap and spare > 0):
                    key = (held, last.get(sid, -1))
                    if best is None or key < best:
                        sync_id, best = sid, key
            if sync_id is None:
                return None
            last[sync_id] = next(self._turns)
        queue = queues[sync_id]
        event = queue.popleft()
        if not queue:
            del queues[sync_id]
        self._queued -= 1
        return event

    async def _worker(self) -> None:
        work, busy, outcomes = self._work, self._busy_by_sync, self._outcomes
        me = asyncio.current_task()
        while True:
            event = None if self._stopping else self._take()
            if event is None:
                if self._stopping:
                    return
                self._waiting += 1
                try:
                    async with work:
                        await work.wait()  # the feeder found more (or shares changed), or stop
                finally:
                    self._waiting -= 1
                continue
            if not self.store.claim_valid(event):
                # This instance's claim may have passed to another (its heartbeat lapsed: paused,
                # or cut off from the database): sending now could overtake a later event.
                self._release([event])
                self._unsettled.append(event)
                self._wake.set()
                continue
            if self._queued < self.concurrency:
                self._wake.set()  # running low: let the feeder look for more
            self._in_flight += 1
            busy[event.sync_id] += 1
            try:
                outcome = await self._attempt(event, me)
            except asyncio.CancelledError:
                # Shutdown: the attempt's result is unknown; the event stays queued and is sent again.
                self._cancelled += 1
                self._release([event])
                self._unsettled.append(event)
                raise
            except Exception as exc:  # a bug must cost one attempt, never the worker or the claim
                log.exception("delivery attempt failed with an internal error; please report it",
                              sync=event.sync_id, event_id=event.event_id)
                outcome = Outcome(event, False, None, f"internal error: {type(exc).__name__}")
            finally:
                self._in_flight -= 1
                busy[event.sync_id] -= 1
            outcomes.append(outcome)
            self._unwritten += 1
            if self._unwritten == 1:
                self._all_written.clear()
            self._have_outcomes.set()
            if self._stopping:
                return

    async def _attempt(self, event: PendingEvent, me: asyncio.Task) -> Outcome:
        """One attempt, timed out by `_sweep` after webhook_timeout."""
        t0 = time.monotonic()
        self._deadlines[me] = t0 + self.timeout
        try:
            return await self._post(event)
        except asyncio.CancelledError:
            if me not in self._expired:
                raise
            self._expired.discard(me)
            if me.uncancel():
                raise  # stopping as well
            return Outcome(event, False, None, describe_error(TimeoutError(), self.timeout, "webhook_timeout"))
        finally:
            del self._deadlines[me]
            if me in self._expired:  # the attempt ended (and swallowed the cancellation) as it expired
                self._expired.discard(me)
                me.uncancel()
            metrics = self.metrics
            if metrics is not None and metrics.known(event.sync_id):
                metrics.delivery_histogram(event.sync_id).observe(time.monotonic() - t0)

    async def _sweep(self) -> None:
        """Cancel the attempts that have run longer than webhook_timeout (see TIMEOUT_SLACK)."""
        tick = max(0.01, min(1.0, self.timeout * TIMEOUT_SLACK))
        deadlines, expired = self._deadlines, self._expired
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for task, deadline in deadlines.items():
                if deadline <= now and task not in expired:
                    expired.add(task)
                    task.cancel()

    async def _post(self, event: PendingEvent) -> Outcome:
        target = self.target(event.sync_id)
        url = target.url or event.webhook_url
        # signer() is cached per secret: a changed secret takes effect on the next attempt.
        headers = signer(target.secret).headers(event.event_id, int(time.time()), event.body) if target.secret else None
        try:
            resp = await self.session.post(url, event.body, headers)
        except WebhookError as exc:
            return Outcome(event, False, None, scrub(str(exc), target.secrets | url_secrets(url)))
        status = resp.status
        if 200 <= status < 300:
            return Outcome(event, True, status)
        retry_after = parse_retry_after(resp.retry_after, time.time()) if status in (429, 503) else None
        # What the receiver sends back may echo the request (the URL's query, its credentials, a
        # token in the path): errors go to the log, `syncd deliveries list` and the operator page.
        secrets = target.secrets | url_secrets(url)
        if 300 <= status < 400:
            where = _shown(_location(resp.location or ""), secrets)
            error = f"HTTP {status} redirect to {where!r} (redirects are not followed; fix webhook_url)"
        else:
            error = f"HTTP {status}{_shown(snippet_text(resp.snippet, secrets), secrets)}"
        return Outcome(event, False, status, error, retry_after, gone=status == 410)

    async def _writer(self) -> None:
        """Persist outcomes in batches: one transaction for everything that finished meanwhile.

        If the database refuses the write, the outcomes and their claims are kept and the write is
        retried: releasing them would send the same events again at once, in a loop."""
        batch: list[Outcome] = []
        backoff = 0.5
        while True:
            if not batch:
                await self._have_outcomes.wait()
                if self._in_flight and WRITE_LINGER:
                    await asyncio.sleep(WRITE_LINGER)
            self._have_outcomes.clear()
            batch += self._outcomes
            self._outcomes.clear()
            delivered, retries, dead, notes = self._plan(batch)
            try:
                await self.store.record_attempts(delivered, retries, dead)
            except Exception as exc:
                self._store_failing = True
                (log.error if isinstance(exc, StoreError) else log.exception)(
                    "could not record delivery outcomes; keeping them and retrying", error=str(exc),
                    outcomes=len(batch), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self._store_failing, backoff = False, 0.5
            self._settled.set()
            self._account(batch, notes)
            self._release([o.event for o in batch])
            self._unwritten -= len(batch)
            if not self._unwritten:
                self._all_written.set()
            batch = []
            self._wake.set()  # released records may have their next event due

    async def _announcer(self) -> None:
        """sync.events.allConsumed: once every event of a tallied run is delivered or dead, queue
        the run's announcement. Looked for after outcomes are written, and now and then (a crash
        between the last outcome and the announcement, runs committed by other processes)."""
        while True:
            try:
                await asyncio.wait_for(self._settled.wait(), IDLE_RECHECK)
            except TimeoutError:
                pass
            # Not after every batch of outcomes: a query each time, for an announcement that can wait.
            await asyncio.sleep(ANNOUNCE_AFTER)
            self._settled.clear()
            try:
                runs = await self.store.consumed_runs()
                if runs:
                    now = time.time()
                    events = []
                    for run in runs:
                        data = {"syncRunId": run.run_id, "eventsDelivered": run.delivered, "deadLetters": run.dead}
                        event_id, body = lifecycle(EventType.ALL_CONSUMED, data, sync_type=run.sync_type,
                                                   sync_id=run.sync_id, run_id=run.run_id, now=now)
                        events.append(OutboxEvent(event_id, run.sync_id, LIFECYCLE_KEY, EventType.ALL_CONSUMED,
                                                  run.webhook_url, now, body))
                    await self.store.announce_consumed(events, [r.run_id for r in runs], now)
                    log.info("runs fully consumed", runs=len(runs))
            except Exception as exc:  # the database may refuse for a while: look again later
                (log.error if isinstance(exc, StoreError) else log.exception)(
                    "could not check for fully consumed runs; retrying", error=str(exc))
                await asyncio.sleep(IDLE_RECHECK)

    def _plan(self, batch: list[Outcome]) -> tuple[list, list, list, list]:
        now = time.time()
        delivered, retries, dead, notes = [], [], [], []
        for o in batch:
            e = o.event
            if o.ok:
                delivered.append(e.seq)
                continue
            attempts = e.attempts + 1
            delay = None if o.gone else next_delay(attempts, self.schedule, o.retry_after)
            if delay is None:
                dead.append((attempts, now, o.status, o.error, e.seq))
            else:
                retries.append((attempts, now + delay, o.status, o.error, e.seq))
            notes.append((o, attempts, delay))
        return delivered, retries, dead, notes

    def _account(self, batch: list[Outcome], notes: list) -> None:
        """Counters, metrics and logs, once the outcomes are committed."""
        metrics = self.metrics
        self.delivered += len(batch) - len(notes)
        if metrics is not None:
            by_sync = Counter(o.event.sync_id for o in batch if o.ok)
            for sync_id, count in by_sync.items():
                if metrics.known(sync_id):
                    metrics.deliveries.labels(sync_id).inc(count)
        for o, attempts, delay in notes:
            e = o.event
            self.failed_attempts += 1
            if metrics is not None and metrics.known(e.sync_id):
                metrics.delivery_failures.labels(e.sync_id).inc()
            receiver = receiver_of(e.webhook_url)
            if delay is None:
                log.warning("event is now a dead letter", sync=e.sync_id, event_id=e.event_id, record_id=e.record_id,
                            attempts=attempts, error=o.error, receiver=receiver,
                            hint="replay with: syncd deliveries replay --event " + e.event_id)
            elif time.monotonic() - self._warned_at.get(e.sync_id, -WARN_EVERY) >= WARN_EVERY:
                self._warned_at[e.sync_id] = time.monotonic()
                log.warning("webhook receiver failing; its events wait and are retried", sync=e.sync_id,
                            receiver=receiver, error=o.error, event_id=e.event_id, retry_in=round(delay, 3),
                            hint=f"syncd deliveries list --sync {e.sync_id} shows what waits; nothing is lost "
                                 "before the retry schedule ends")
            else:
                log.info("delivery failed; will retry", sync=e.sync_id, event_id=e.event_id, attempts=attempts,
                         retry_in=round(delay, 3), error=o.error, receiver=receiver)

    def _release(self, events: list[PendingEvent]) -> None:
        for e in events:
            if e.seq in self._claimed:
                self._claimed.discard(e.seq)
                self._claims_by_sync[e.sync_id] -= 1
                if self._claims_by_sync[e.sync_id] <= 0:
                    del self._claims_by_sync[e.sync_id]
                    self._last_turn.pop(e.sync_id, None)
