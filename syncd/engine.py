"""One poll of one sync: fetch -> parse -> extract and fingerprint -> diff -> one commit.

A run that fails in any way changes nothing: no events, no fingerprints, and above all no deletes.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import orjson
import structlog
from xxhash import xxh3_128, xxh3_128_digest

from syncd import diff
from syncd.config import Sync, scrub
from syncd.errors import CommitError, FetchError, RunError
from syncd.events import DELTA, INITIAL, LIFECYCLE_KEY, EventType, lifecycle, new_id, new_ids
from syncd.jsonpath import without
from syncd.records import dumps as exact_dumps
from syncd.records import may_need_exact, parse_document, parse_json, split_list
from syncd.source.fetcher import Fetch, Page, Source
from syncd.source.paginate import next_page_hint
from syncd.store import (
    RUNS_KEPT,
    Commit,
    LeaseLost,
    OutboxEvent,
    RunEvents,
    RunRecord,
    StateConflict,
    StateStore,
    StoreError,
    body_dictionary,
    compress_body,
)

log = structlog.get_logger("syncd.engine")

#: Bodies larger than this are parsed, diffed and turned into envelopes in a worker thread. orjson
#: holds the GIL while it parses, so the loop still stalls for the parse itself (~180 ms for 100k
#: records), but no longer for the diff and the envelopes.
THREAD_THRESHOLD = 512 * 1024


@dataclass
class RunResult:
    """What one poll did, and the events it queued (`events`: their webhook bodies)."""

    sync_id: str
    run_id: str
    outcome: str  # changed | unchanged | baseline | failed
    sync_type: str | None = None
    error: str | None = None
    #: The record events it queued, then `outbox`: the lifecycle events it queued after them.
    run_events: RunEvents | None = None
    outbox: list[OutboxEvent] = field(default_factory=list)
    records: int | None = None
    new: int = 0
    modified: int = 0
    deleted: int = 0
    invalid_ids: int = 0
    duplicate_ids: int = 0
    duration: float = 0.0
    pages: int = 0
    requests: int = 0
    #: Why deletes were held although the run succeeded (a next-page hint without pagination).
    warning: str | None = None
    invalid_examples: list[str] = field(default_factory=list)
    #: The API asked not to be polled before this unix time (a Retry-After longer than the interval).
    not_before: float | None = None
    #: Deletions this run held back (max_delete_fraction): it failed instead.
    deletes_held: int = 0
    #: Records missing but not deleted yet (confirm_deletes_after), after this run.
    pending_deletes: int = 0
    #: The instance lost the sync's lease during the run: its results were discarded (PostgreSQL).
    lease_lost: bool = False

    def failed(self, error: str) -> None:
        """The run failed: nothing it computed is queued."""
        self.outcome, self.error, self.run_events, self.outbox = "failed", error, None, []

    @property
    def queued(self) -> int:
        """How many events the run queued."""
        return len(self.run_events or ()) + len(self.outbox)

    @property
    def events(self) -> list[bytes]:
        """The webhook bodies of the queued events, in order (what `syncd once` prints)."""
        records = self.run_events.envelopes() if self.run_events else []
        return records + [event.envelope() for event in self.outbox]

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"


@dataclass
class _Analysis:
    """Everything a run commits, computed off the event loop."""

    fingerprints: dict[str, bytes]
    invalid_ids: int
    duplicate_ids: int
    invalid_examples: list[str]
    events: RunEvents
    upserts: dict[str, bytes]
    deletes: list[str]
    counts: dict[str, int]
    missing: dict[str, int]
    bodies: dict[str, bytes] | None
    body_dict: bytes | None


_background: set[asyncio.Task] = set()
_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = True


@contextmanager
def _gc_paused():
    """Pause the cyclic GC while a large response is parsed and diffed.

    orjson.loads of 100k records builds ~400k containers; with the collector on, full passes over
    them cost more than the parse itself (measured: ~450 ms of a 900 ms run). JSON cannot form
    reference cycles, so nothing is lost by not looking for any. Process-wide, hence counted."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def _extract(sync: Sync, body: bytes, keep_json: bool = False) -> tuple[diff.Snapshot, str | None]:
    """Parse and extract a one-page response (in a worker thread when it is large). `keep_json`:
    every record will be sent (see SnapshotBuilder.add_raw)."""
    with _gc_paused():
        builder = diff.SnapshotBuilder(sync.id, sync.list_path, sync.id_path, sync.ignore_paths)
        steps = sync.list_path.steps if sync.list_path is not None else None
        split = split_list(body, steps) if steps is not None else None
        if split is not None:
            # A list along a plain path: record by record, never the whole document at once.
            items, hints = split
            builder.add_raw(items, exact_possible=may_need_exact(body), keep_json=keep_json)
            del items, split
            return builder.finish(), next_page_hint(None, hints)
        document, exact = parse_document(body)
        builder.add(document, exact=exact)
        hint = next_page_hint(None, document) if sync.list_path is not None else None
        del document  # freed before the collector runs again: the records live on in the snapshot
        return builder.finish(), hint


def _plan(snap: diff.Snapshot, old: dict[str, bytes], pending: dict[str, int], initial: bool, hold: bool,
          confirm_after: int) -> diff.Plan:
    with _gc_paused():
        # Records we could not read may be among the "missing" ones: never delete on such a run.
        allow_deletes = snap.invalid_ids == 0 and not hold
        return diff.plan(old, snap, initial=initial, allow_deletes=allow_deletes, pending=pending,
                         confirm_after=confirm_after)


def _build(sync: Sync, snap: diff.Snapshot, plan: diff.Plan, run_id: str, sync_type: str, send_records: bool,
           old_bodies: dict[str, bytes], keep: bool, body_dict: bytes | None) -> _Analysis:
    """The run's outbox events (the types the sync sends), counts and, with keep_records, the
    compressed bodies to store: everything the commit needs, built off the event loop."""
    with _gc_paused():
        spec = sync.spec
        wanted = set(spec.events) if send_records else set()
        tally = EventType.ALL_CONSUMED in spec.events
        run_key = run_id if tally else None
        types, record_ids, recs = plan.types, plan.record_ids, plan.records
        counts = {kind: types.count(kind) for kind in (EventType.NEW, EventType.MODIFIED, EventType.DELETED)}
        if not all(counts[kind] == 0 or kind in wanted for kind in counts):
            sent = [kind in wanted for kind in types]
            types, record_ids, recs = (list(compress(column, sent)) for column in (types, record_ids, recs))
        now = time.time()
        webhook_url, sid = spec.webhook_url, sync.id
        ignore = list(sync.ignore_paths)
        exact_possible, exact = snap.exact_possible, snap.exact
        record_json, record_value = diff.record_json, diff.record_value
        DELETED, NEW = EventType.DELETED, EventType.NEW
        # Stored as eventData plus the run's constants: envelopes are rendered when read back.
        events = RunEvents(sid, webhook_url, now, sync_type, run_id, run_key, new_ids("evt", len(types)),
                           record_ids, types)
        changed: list[bytes | None] = []
        if not keep and DELETED not in types:
            # Every event's data is its record's JSON: one comprehension, no per-event branches.
            events.data = [record_json(record, exact_possible, exact) for record in recs]
        else:
            add = events.data.append
            for kind, record_id, record in zip(types, record_ids, recs, strict=True):
                fields = None
                if kind == DELETED:
                    before = old_bodies.get(record_id) if keep else None
                    add(before if before is not None else b"null")
                else:
                    add(record_json(record, exact_possible, exact))
                    if keep and kind != NEW:
                        before = old_bodies.get(record_id)
                        if before is not None:
                            # changedFields never names an ignored path: both sides are compared without them.
                            # The stored body is read as the response is: numbers beyond a double
                            # stay exact (plain orjson would round them, or refuse 1e400).
                            old_record = parse_document(before)[0]
                            new_record = record_value(record, exact_possible)
                            if ignore:
                                old_record, new_record = without(old_record, ignore), without(new_record, ignore)
                            fields = orjson.dumps(diff.changed_fields(old_record, new_record))
                if keep:
                    changed.append(fields)
        if any(fields is not None for fields in changed):
            events.changed_fields = changed
        bodies, new_dict = None, None
        if keep:
            dumps = exact_dumps if snap.exact else orjson.dumps
            records = snap.records

            def sorted_json(rid: str) -> bytes:
                return dumps(record_value(records[rid], exact_possible), option=orjson.OPT_SORT_KEYS)

            if body_dict is None:
                ids = list(records)
                step = max(1, len(ids) // 64)
                body_dict = new_dict = body_dictionary([sorted_json(rid) for rid in ids[::step][:64]])
            bodies = {rid: compress_body(sorted_json(rid), body_dict) for rid in plan.upserts}
        snap.records = {}
        return _Analysis(snap.fingerprints, snap.invalid_ids, snap.duplicate_ids, snap.invalid_examples,
                         events, plan.upserts, plan.deletes, counts, plan.missing, bodies, new_dict)


#: Syncs with fewer stored records are exempt from max_delete_fraction (DESIGN §7).
GUARD_MIN_RECORDS = 10


class DeletesHeld(RunError):
    """The run would delete more than max_delete_fraction of the stored records."""

    stage = "guard"

    def __init__(self, reason: str, held: int) -> None:
        super().__init__(reason)
        self.held = held


async def poll(sync: Sync, store: StateStore | None, source: Source, *, dry_run: bool = False,
               accept_deletes: bool = False) -> RunResult:
    """Run one poll of `sync` and commit its outcome (unless `dry_run`). Never raises for a failed
    run. `accept_deletes`: commit even a run that max_delete_fraction would hold."""
    run_id = new_id("run")
    started = time.time()
    t0 = time.perf_counter()
    result = RunResult(sync.id, run_id, "failed")
    with structlog.contextvars.bound_contextvars(sync=sync.id, run=run_id):
        try:
            try:
                await _poll(sync, store, source, dry_run, result, started, accept_deletes)
            except CommitError as exc:
                # The state moved under this run (another process committed or reset it): nothing
                # is wrong with the API, so run once more against the new state right away.
                log.info("state changed during the poll; polling again", reason=exc.reason)
                result = RunResult(sync.id, run_id, "failed")
                await _poll(sync, store, source, dry_run, result, started, accept_deletes)
        except RunError as exc:
            result.failed(f"{exc.stage}: {exc.reason}")
            if isinstance(exc, FetchError):
                result.not_before = exc.not_before
            if isinstance(exc, DeletesHeld):
                result.deletes_held = exc.held
            log.warning("poll failed", stage=exc.stage, error=exc.reason)
        except LeaseLost as exc:
            # Another instance owns the sync now: it polls it; nothing of this run is kept.
            result.failed(f"lease lost: {exc}")
            result.lease_lost = True
            log.warning("poll discarded: this instance no longer holds the sync's lease", error=str(exc))
        except StoreError as exc:
            result.failed(f"state database: {exc}")
            log.error("poll failed: the state database refused it", error=str(exc),
                      hint="check the state database's disk space, permissions and reachability; another process "
                           "may hold a lock")
        except Exception as exc:  # a bug must fail this run only, never the daemon or other syncs
            result.failed(f"internal error: {type(exc).__name__}: {scrub(str(exc), sync.secrets)}")
            log.exception("poll failed with an internal error; please report it", error=result.error)
        result.duration = time.perf_counter() - t0
        if result.outcome == "failed" and store is not None and not dry_run and not result.lease_lost:
            try:
                await store.record_run(_run_record(result, started), not_before=result.not_before,
                                       deletes_held=result.deletes_held)
            except LeaseLost:
                log.warning("failed poll not recorded: this instance no longer holds the sync's lease")
            except StoreError as exc:
                log.error("could not record the failed poll in the state database", error=str(exc))
    return result


@dataclass
class _Run:
    """What one poll knows before it commits."""

    sync: Sync
    store: StateStore | None
    state: Any
    result: RunResult
    started: float
    dry_run: bool
    initial: bool
    rebaseline: bool
    #: The byte-identical and 304 short cuts apply: same shape, and no deletion is waiting to be
    #: confirmed (a response identical to the last one must still count a missing record again).
    short_cuts: bool
    accept_deletes: bool
    #: (invalid_ids, duplicate_ids) of the last good run, which a short cut skips again.
    skips: tuple[int, int] = (0, 0)


async def _poll(sync: Sync, store: StateStore | None, source: Source, dry_run: bool, result: RunResult, started: float,
                accept_deletes: bool) -> None:
    state = await store.sync_state(sync.id) if store is not None else None
    same_shape = state is not None and state.baselined and state.shape == sync.shape
    initial = state is None or not state.baselined
    short_cuts = same_shape and state.pending_deletes == 0 and state.keeps_records == sync.spec.keep_records
    skips = None
    if short_cuts:
        key = (sync.id, state.shape, state.body_hash)
        skips = _SKIPS.get(key)
        if skips is None:  # once per sync and process: then each run that reads a body notes its own
            skips = await _last_skips(store, sync.id)
            if skips is not None:
                _note_skips(key, skips)
    short_cuts = skips is not None
    run = _Run(sync, store, state, result, started, dry_run, initial, not initial and not same_shape, short_cuts,
               accept_deletes, skips or (0, 0))
    # Validators of the last good response, only for the same definition (a new URL or new
    # headers must never be answered "not modified" on the strength of the old one's ETag).
    validators = None
    if short_cuts and state.validators and state.validators.get("definition") == sync.digest:
        validators = state.validators
    fetch = Fetch(sync, source, validators=validators, parse=parse_json)
    try:
        if sync.spec.api_details.pagination is None:
            await _poll_one(run, fetch)
        else:
            await _poll_pages(run, fetch)
    finally:
        result.pages, result.requests = fetch.pages_fetched, fetch.requests


#: (sync id, shape, body hash) -> (invalid_ids, duplicate_ids) of the run that read that body: a
#: short cut of the same bytes skips the same records again, without a query each poll (at 10,000
#: syncs that query was a tenth of the daemon's CPU). Keyed by the body, so a run by another
#: instance cannot leave a stale entry behind.
_SKIPS: dict[tuple[str, str | None, bytes | None], tuple[int, int]] = {}
_SKIPS_KEPT = 50_000


def _note_skips(key: tuple[str, str | None, bytes | None], skips: tuple[int, int]) -> None:
    _SKIPS[key] = skips
    if len(_SKIPS) > _SKIPS_KEPT:
        del _SKIPS[next(iter(_SKIPS))]  # the oldest


async def _last_skips(store: StateStore, sync_id: str) -> tuple[int, int] | None:
    """(invalid_ids, duplicate_ids) of the sync's last successful run. A byte-identical response
    (or a 304) is the one that run read, or read by a short cut that carried its counts on: it
    skips the same records again. None if the kept history has no successful run any more (then
    the response is parsed: its counts are never guessed)."""
    runs = await store.runs(sync_id, 1)
    if runs and runs[0].outcome == "failed":
        runs = await store.runs(sync_id, RUNS_KEPT)
    good = next((r for r in runs if r.outcome != "failed"), None)
    return (good.invalid_ids, good.duplicate_ids) if good is not None else None


async def _poll_one(run: _Run, fetch: Fetch) -> None:
    """A one-request sync: the byte-identical and 304 short cuts come before any parsing."""
    sync, state = run.sync, run.state
    pages = [page async for page in fetch.pages()]  # one request: one page
    page = pages[-1]
    run.result.pages, run.result.requests = fetch.pages_fetched, fetch.requests
    validators = _validators(page, sync) if sync.spec.conditional_requests else None
    if page.not_modified:
        await _unchanged(run, validators or state.validators)
        return
    body = page.body
    body_hash = xxh3_128_digest(b"empty %d" % page.status if page.empty else body)
    if run.short_cuts and state.body_hash == body_hash:
        await _unchanged(run, validators)
        return
    header_hint = next_page_hint(page.headers, None) if sync.list_path is not None else None
    big = len(body) > THREAD_THRESHOLD
    if page.empty:
        snap, hint = diff.Snapshot({}, {}), None
    else:
        # An initial run sends every record: render each one's JSON while it is parsed anyway.
        keep_json = run.initial and not run.rebaseline and sync.spec.initial_sync != "skip" and EventType.NEW in sync.spec.events
        snap, hint = await asyncio.to_thread(_extract, sync, body, keep_json) if big else _extract(sync, body, keep_json)
    del body, page, pages
    await _finish(run, snap, body_hash, validators, header_hint or hint, big=big)


async def _poll_pages(run: _Run, fetch: Fetch) -> None:
    """A paginated sync: every page parsed (the next request depends on it) and added to one snapshot."""
    sync, state = run.sync, run.state
    hasher = xxh3_128()
    builder = diff.SnapshotBuilder(sync.id, sync.list_path, sync.id_path, sync.ignore_paths)
    total = 0
    async for page in fetch.pages():
        if page.empty:
            hasher.update(b"empty %d;" % page.status)
            continue
        body = page.body
        total += len(body)
        hasher.update(len(body).to_bytes(8, "little"))
        hasher.update(body)
        if len(body) > THREAD_THRESHOLD:
            await asyncio.to_thread(_add_page, builder, page)
        else:
            _add_page(builder, page)
    run.result.pages, run.result.requests = fetch.pages_fetched, fetch.requests
    body_hash = hasher.digest()
    if run.short_cuts and state.body_hash == body_hash:
        await _unchanged(run, None)
        return
    with _gc_paused():
        snap = builder.finish()
    hint = fetch.end_hint and (f"pagination ended after page {fetch.pages_fetched}, but that page says there is more: "
                               f"check the pagination paths ({fetch.end_hint})")
    await _finish(run, snap, body_hash, None, hint, big=total > THREAD_THRESHOLD)


def _add_page(builder: diff.SnapshotBuilder, page: Page) -> None:
    with _gc_paused():
        document, exact = parse_document(page.body)
        page.document, page.parsed = document, True  # the paginator reads it for the next request
        builder.add(document, page.number, exact=exact)


def _validators(page: Page, sync: Sync) -> dict[str, str] | None:
    """ETag / Last-Modified of a good one-request response, remembered for a conditional request."""
    headers = page.headers
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if not etag and not modified:
        return None
    found = {"definition": sync.digest}
    if etag:
        found["etag"] = etag
    if modified:
        found["last_modified"] = modified
    return found


async def _unchanged(run: _Run, validators: dict[str, str] | None) -> None:
    """Byte-identical to the last good run, or 304 Not Modified: nothing can have changed."""
    result, state, sync = run.result, run.state, run.sync
    result.outcome, result.sync_type, result.records = "unchanged", DELTA, state.record_count
    result.warning = state.last_warning  # the reason deletes were held still stands
    result.invalid_ids, result.duplicate_ids = run.skips  # the same records are skipped again
    events = _processed(sync, result, [], tally=EventType.ALL_CONSUMED in sync.spec.events)
    result.outbox = events
    if run.store is not None and not run.dry_run:
        await run.store.record_run(_run_record(result, run.started), validators=validators, events=events,
                                   tally=_tally(sync, result))
    log.debug("poll unchanged", records=state.record_count, pages=result.pages)


def _processed(sync: Sync, result: RunResult, record_events: list[OutboxEvent], *, tally: bool) -> list[OutboxEvent]:
    """The run's sync.events.processed, if the sync sends it: queued after its record events."""
    if EventType.PROCESSED not in sync.spec.events:
        return []
    data = {
        "recordsProcessed": result.records or 0, "eventsEmitted": len(record_events), "new": result.new,
        "modified": result.modified, "deleted": result.deleted, "skipped": result.invalid_ids + result.duplicate_ids,
        "outcome": result.outcome,
    }
    now = time.time()
    # A re-baseline run (result.sync_type None: no record events) is a later run all the same: its
    # envelope says delta_sync, as DESIGN §5 allows only initial_sync and delta_sync.
    event_id, body = lifecycle(EventType.PROCESSED, data, sync_type=result.sync_type or DELTA, sync_id=sync.id,
                               run_id=result.run_id, now=now)
    return [OutboxEvent(event_id, sync.id, LIFECYCLE_KEY, EventType.PROCESSED, sync.spec.webhook_url, now, body,
                        result.run_id if tally else None)]


def _tally(sync: Sync, result: RunResult) -> tuple[str, str | None] | None:
    return (sync.spec.webhook_url, result.sync_type or DELTA) if EventType.ALL_CONSUMED in sync.spec.events else None


async def _finish(run: _Run, snap: diff.Snapshot, body_hash: bytes, validators: dict[str, str] | None,
                  hint: str | None, *, big: bool) -> None:
    """Diff, guard, build the events and commit: the part of a run after its data is read."""
    sync, result, state, store = run.sync, run.result, run.state, run.store
    spec = sync.spec
    result.records = len(snap.fingerprints)
    result.invalid_ids, result.duplicate_ids = snap.invalid_ids, snap.duplicate_ids
    result.invalid_examples = snap.invalid_examples
    if snap.invalid_ids:
        log.warning("records without a usable id were skipped; no record.deleted this run",
                    skipped=snap.invalid_ids, examples=snap.invalid_examples, record_identifier=sync.id_path.text)
    if snap.duplicate_ids:
        log.warning("duplicate record ids were skipped after their first occurrence", skipped=snap.duplicate_ids)
    if hint is not None and not run.rebaseline:
        if spec.api_details.pagination is None:
            result.warning = (f"the API says there are more pages, but no pagination is configured: only the first page "
                              f"was read and no record.deleted was sent ({hint})")
        else:
            result.warning = f"no record.deleted was sent: {hint}"
        log.warning("the list may be incomplete; no record.deleted this run", hint=hint)

    keep = spec.keep_records
    if run.rebaseline:
        log.info("list_identifier, record_identifier or ignore_fields changed: re-baselining without events",
                 records=len(snap.fingerprints))
        plan = diff.Plan.writes_only(dict(snap.fingerprints))
        result.outcome, result.sync_type = "baseline", None
        sync_type, send_records, old_count = None, False, 0
    else:
        old = await run.store.fingerprints(state) if store is not None and not run.initial else {}
        pending = await store.pending_missing(sync.id) if store is not None and state.pending_deletes else {}
        args = (snap, old, pending, run.initial, hint is not None, spec.confirm_deletes_after)
        plan = await asyncio.to_thread(_plan, *args) if big else _plan(*args)
        _guard_deletes(sync, plan, len(old), run.accept_deletes)
        if keep and not run.initial and not state.keeps_records:
            plan.upserts = dict(snap.fingerprints)  # keep_records just turned on: store every body once
        sync_type = INITIAL if run.initial else DELTA
        send_records = not (run.initial and spec.initial_sync == "skip")
        old_count = len(old)
    old_bodies: dict[str, bytes] = {}
    body_dict = state.body_dict if state is not None and state.keeps_records and not run.rebaseline else None
    if keep and store is not None and plan.types and not run.initial and state.keeps_records:
        wanted = [rid for kind, rid in zip(plan.types, plan.record_ids, strict=True) if kind != EventType.NEW]
        old_bodies = await store.bodies(state, wanted) if wanted else {}
    args = (sync, snap, plan, result.run_id, sync_type, send_records, old_bodies, keep, body_dict)
    a = await asyncio.to_thread(_build, *args) if big else _build(*args)
    del plan, old_bodies

    result.new, result.modified, result.deleted = (a.counts[EventType.NEW], a.counts[EventType.MODIFIED],
                                                   a.counts[EventType.DELETED])
    if not run.rebaseline:
        result.sync_type = sync_type
        detected = result.new + result.modified + result.deleted
        result.outcome = "baseline" if not send_records else "changed" if detected else "unchanged"
    tally = EventType.ALL_CONSUMED in spec.events
    result.run_events, result.outbox = a.events, _processed(sync, result, a.events, tally=tally)
    # An initial run's (or a re-baseline's) upserts are the complete set: written as a replacement,
    # which also seeds the store's fingerprint cache for the next run.
    commit = Commit(_run_record(result, run.started), sync.shape, body_hash, upserts=a.upserts, deletes=a.deletes,
                    run_events=a.events, events=result.outbox, replace_all=run.initial or run.rebaseline,
                    record_count=old_count + result.new - result.deleted if not run.rebaseline else len(a.upserts),
                    validators=validators, missing=a.missing, bodies=a.bodies, changed=bool(a.events),
                    tally=_tally(sync, result), drop_bodies=not keep and state is not None and state.keeps_records,
                    body_dict=a.body_dict)
    result.pending_deletes = len(a.missing)
    if store is not None and not run.dry_run:
        commit.expected_generation = state.generation
        try:
            result.pending_deletes = await store.commit_run(commit)
        except LeaseLost:
            raise
        except StateConflict as exc:
            raise CommitError(str(exc)) from None
        _note_skips((sync.id, sync.shape, body_hash), (result.invalid_ids, result.duplicate_ids))
    if big:
        _schedule_trim()
    log.info("poll done", outcome=result.outcome, records=result.records, new=result.new,
             modified=result.modified, deleted=result.deleted, pages=result.pages)


def _guard_deletes(sync: Sync, plan: diff.Plan, stored: int, accepted: bool) -> None:
    """max_delete_fraction: a run that would delete more than that share of the stored records
    fails (an API that flips to [] must not mass-delete), unless `syncd once --accept-deletes`."""
    fraction = sync.spec.max_delete_fraction
    deleting = len(plan.deletes)
    if fraction is None or accepted or stored < GUARD_MIN_RECORDS or deleting <= fraction * stored:
        return
    raise DeletesHeld(
        f"this run would delete {deleting} of {stored} stored records ({deleting / stored:.0%}), more than "
        f"max_delete_fraction = {fraction:g}; nothing was written. If the records are really gone, run "
        f"'syncd once {sync.id} --accept-deletes' to commit this once", deleting)


TRIM_DELAY = 5.0  # seconds without a large run before freed heap is handed back to the OS
_trim: asyncio.TimerHandle | None = None


def _schedule_trim() -> None:
    """Trim once large runs pause: trimming between back-to-back runs would only make the next
    one fault the same pages in again (measured: +20 ms on a 100k-record run)."""
    global _trim
    if _trim is not None:
        _trim.cancel()

    def start() -> None:
        global _trim
        _trim = None
        task = asyncio.create_task(asyncio.to_thread(release_memory))
        _background.add(task)  # a reference until done; nothing awaits it
        task.add_done_callback(_background.discard)

    _trim = asyncio.get_running_loop().call_later(TRIM_DELAY, start)


def release_memory() -> None:
    """Hand freed heap back to the OS after a large run (glibc keeps it otherwise: measured 530 MiB
    resident for a 25 MiB live heap after a 100k-record run). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _run_record(result: RunResult, started: float) -> RunRecord:
    return RunRecord(
        run_id=result.run_id, sync_id=result.sync_id, started_at=started, finished_at=time.time(),
        outcome=result.outcome, sync_type=result.sync_type, error=result.error, records=result.records,
        new=result.new, modified=result.modified, deleted=result.deleted,
        invalid_ids=result.invalid_ids, duplicate_ids=result.duplicate_ids, pages=result.pages, warning=result.warning,
    )
