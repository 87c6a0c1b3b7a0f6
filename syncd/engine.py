"""One poll of one sync: fetch -> parse -> extract and fingerprint -> diff -> one commit.

A run that fails in any way changes nothing: no events, no fingerprints, and above all no deletes.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from xxhash import xxh3_128, xxh3_128_digest

from syncd import diff
from syncd.config import Sync, scrub
from syncd.errors import CommitError, FetchError, RunError
from syncd.records import dumps as exact_dumps
from syncd.records import parse_document, parse_json
from syncd.source.fetcher import Fetch, Page, Source
from syncd.source.paginate import next_page_hint
from syncd.store import Commit, OutboxEvent, RunRecord, StateConflict, Store
from syncd.units import iso_time

log = structlog.get_logger("syncd.engine")

INITIAL = "initial_sync"
DELTA = "delta_sync"
#: Bodies larger than this are parsed, diffed and turned into envelopes in a worker thread. orjson
#: holds the GIL while it parses, so the loop still stalls for the parse itself (~180 ms for 100k
#: records), but no longer for the diff and the envelopes.
THREAD_THRESHOLD = 512 * 1024


def new_id(prefix: str) -> str:
    """`prefix_` + 32 hex digits: 48 bits of milliseconds (sortable by time) then 80 random bits."""
    return f"{prefix}_{int(time.time() * 1000):012x}{os.urandom(10).hex()}"


@dataclass
class RunResult:
    """What one poll did. `events` are the webhook bodies, in the order they were queued."""

    sync_id: str
    run_id: str
    outcome: str  # changed | unchanged | baseline | failed
    sync_type: str | None = None
    error: str | None = None
    events: list[bytes] = field(default_factory=list)
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
    events: list[OutboxEvent]
    upserts: dict[str, bytes]
    deletes: list[str]
    counts: dict[str, int]


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


def _analyse(sync: Sync, body: bytes, old: dict[str, bytes], initial: bool, rebaseline: bool, run_id: str,
             hold_deletes: bool = False) -> tuple[_Analysis, Any]:
    """Parse, extract and diff a one-page response (in a worker thread when it is large)."""
    with _gc_paused():
        document, exact = parse_document(body)
        builder = diff.SnapshotBuilder(sync.id, sync.list_path, sync.id_path, sync.ignore_paths)
        builder.add(document, exact=exact)
        snap = builder.finish()
        hint = next_page_hint(None, document) if sync.list_path is not None else None
        del document  # freed before the collector runs again: the records live on only in `changes`
        return _changes(sync, snap, old, initial, rebaseline, run_id, hold_deletes or hint is not None), hint


def _changes(sync: Sync, snap: diff.Snapshot, old: dict[str, bytes], initial: bool, rebaseline: bool, run_id: str,
             hold_deletes: bool) -> _Analysis:
    with _gc_paused():
        counts = {diff.NEW: 0, diff.MODIFIED: 0, diff.DELETED: 0}
        if rebaseline:
            snap.records = {}
            return _Analysis(snap.fingerprints, snap.invalid_ids, snap.duplicate_ids, snap.invalid_examples,
                             [], snap.fingerprints, [], counts)
        # Records we could not read may be among the "missing" ones: never delete on such a run.
        allow_deletes = snap.invalid_ids == 0 and not hold_deletes
        changes = diff.changes(old, snap, initial=initial, allow_deletes=allow_deletes)
        snap.records = {}
        sync_type = INITIAL if initial else DELTA
        now = time.time()
        timestamp = iso_time(now)
        webhook_url = sync.spec.webhook_url
        dumps = exact_dumps if snap.exact else orjson.dumps
        events: list[OutboxEvent] = []
        for change in changes:
            event_id = new_id("evt")
            envelope = dumps({
                "eventId": event_id,
                "eventType": change.type,
                "eventData": change.record,
                "syncType": sync_type,
                "syncJobId": sync.id,
                "syncRunId": run_id,
                "recordId": change.record_id,
                "timestamp": timestamp,
            })
            # orjson hands back each result in a ~4 KiB allocation: an exact-size copy keeps a
            # 100k-event initial run at ~50 MB of bodies instead of ~400 MB until the commit.
            envelope = bytes(memoryview(envelope))
            events.append(OutboxEvent(event_id, sync.id, change.record_id, change.type, webhook_url, now, envelope))
            counts[change.type] += 1
        upserts, deletes = diff.apply(old, snap, changes)
        del changes
        return _Analysis(snap.fingerprints, snap.invalid_ids, snap.duplicate_ids, snap.invalid_examples,
                         events, upserts, deletes, counts)


async def poll(sync: Sync, store: Store | None, source: Source, *, dry_run: bool = False) -> RunResult:
    """Run one poll of `sync` and commit its outcome (unless `dry_run`). Never raises for a failed run."""
    run_id = new_id("run")
    started = time.time()
    t0 = time.perf_counter()
    result = RunResult(sync.id, run_id, "failed")
    with structlog.contextvars.bound_contextvars(sync=sync.id, run=run_id):
        try:
            try:
                await _poll(sync, store, source, dry_run, result, started)
            except CommitError as exc:
                # The state moved under this run (another process committed or reset it): nothing
                # is wrong with the API, so run once more against the new state right away.
                log.info("state changed during the poll; polling again", reason=exc.reason)
                result = RunResult(sync.id, run_id, "failed")
                await _poll(sync, store, source, dry_run, result, started)
        except RunError as exc:
            result.outcome, result.error, result.events = "failed", f"{exc.stage}: {exc.reason}", []
            if isinstance(exc, FetchError):
                result.not_before = exc.not_before
            log.warning("poll failed", stage=exc.stage, error=exc.reason)
        except sqlite3.Error as exc:
            result.outcome, result.error, result.events = "failed", f"state database: {exc}", []
            log.error("poll failed: the state database refused it", error=str(exc),
                      hint="check state_path's disk space and permissions; another process may hold a lock")
        except Exception as exc:  # a bug must fail this run only, never the daemon or other syncs
            result.outcome, result.error, result.events = "failed", f"internal error: {type(exc).__name__}: {scrub(str(exc), sync.secrets)}", []
            log.exception("poll failed with an internal error; please report it", error=result.error)
        result.duration = time.perf_counter() - t0
        if result.outcome == "failed" and store is not None and not dry_run:
            try:
                await store.record_run(_run_record(result, started), not_before=result.not_before)
            except sqlite3.Error as exc:
                log.error("could not record the failed poll in the state database", error=str(exc))
    return result


@dataclass
class _Run:
    """What one poll knows before it commits."""

    sync: Sync
    store: Store | None
    state: Any
    result: RunResult
    started: float
    dry_run: bool
    initial: bool
    rebaseline: bool
    same_shape: bool


async def _poll(sync: Sync, store: Store | None, source: Source, dry_run: bool, result: RunResult, started: float) -> None:
    state = await store.sync_state(sync.id) if store is not None else None
    same_shape = state is not None and state.baselined and state.shape == sync.shape
    initial = state is None or not state.baselined
    run = _Run(sync, store, state, result, started, dry_run, initial, not initial and not same_shape, same_shape)
    # Validators of the last good response, only for the same definition (a new URL or new
    # headers must never be answered "not modified" on the strength of the old one's ETag).
    validators = None
    if same_shape and state.validators and state.validators.get("definition") == sync.digest:
        validators = state.validators
    fetch = Fetch(sync, source, validators=validators, parse=parse_json)
    try:
        if sync.spec.api_details.pagination is None:
            await _poll_one(run, fetch)
        else:
            await _poll_pages(run, fetch)
    finally:
        result.pages, result.requests = fetch.pages_fetched, fetch.requests


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
    if run.same_shape and state.body_hash == body_hash:
        await _unchanged(run, validators)
        return
    header_hint = next_page_hint(page.headers, None) if sync.list_path is not None else None
    old = await _old(run)
    big = len(body) > THREAD_THRESHOLD
    if page.empty:
        a, hint = _changes(sync, diff.Snapshot({}, {}), old, run.initial, run.rebaseline, run.result.run_id, False), None
    else:
        args = (sync, body, old, run.initial, run.rebaseline, run.result.run_id, header_hint is not None)
        a, hint = await asyncio.to_thread(_analyse, *args) if big else _analyse(*args)
    del body, page
    await _commit(run, a, len(old), body_hash, validators, header_hint or hint, big=big)


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
    if run.same_shape and state.body_hash == body_hash:
        await _unchanged(run, None)
        return
    with _gc_paused():
        snap = builder.finish()
    old = await _old(run)
    hint = fetch.end_hint and (f"pagination ended after page {fetch.pages_fetched}, but that page says there is more: "
                               f"check the pagination paths ({fetch.end_hint})")
    args = (sync, snap, old, run.initial, run.rebaseline, run.result.run_id, bool(hint))
    big = total > THREAD_THRESHOLD
    a = await asyncio.to_thread(_changes, *args) if big else _changes(*args)
    await _commit(run, a, len(old), body_hash, None, hint, big=big)


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


async def _old(run: _Run) -> dict[str, bytes]:
    if run.store is None or run.initial:
        return {}
    return await run.store.fingerprints(run.state)


async def _unchanged(run: _Run, validators: dict[str, str] | None) -> None:
    """Byte-identical to the last good run, or 304 Not Modified: nothing can have changed."""
    result, state = run.result, run.state
    result.outcome, result.sync_type, result.records = "unchanged", DELTA, state.record_count
    result.warning = state.last_warning  # the reason deletes were held still stands
    if run.store is not None and not run.dry_run:
        await run.store.record_run(_run_record(result, run.started), validators=validators)
    log.debug("poll unchanged", records=state.record_count, pages=result.pages)


async def _commit(run: _Run, a: _Analysis, old_count: int, body_hash: bytes, validators: dict[str, str] | None, hint: str | None, *, big: bool) -> None:
    sync, result, state, store = run.sync, run.result, run.state, run.store
    result.records = len(a.fingerprints)
    result.invalid_ids, result.duplicate_ids = a.invalid_ids, a.duplicate_ids
    result.invalid_examples = a.invalid_examples
    if a.invalid_ids:
        log.warning("records without a usable id were skipped; no record.deleted this run",
                    skipped=a.invalid_ids, examples=a.invalid_examples, record_identifier=sync.id_path.text)
    if a.duplicate_ids:
        log.warning("duplicate record ids were skipped after their first occurrence", skipped=a.duplicate_ids)
    if hint is not None and not run.rebaseline:
        if sync.spec.api_details.pagination is None:
            result.warning = (f"the API says there are more pages, but no pagination is configured: only the first page "
                              f"was read and no record.deleted was sent ({hint})")
        else:
            result.warning = f"no record.deleted was sent: {hint}"
        log.warning("the list may be incomplete; no record.deleted this run", hint=hint)

    if run.rebaseline:
        log.info("list_identifier, record_identifier or ignore_fields changed: re-baselining without events",
                 records=len(a.fingerprints))
        result.outcome, result.sync_type = "baseline", None
        commit = Commit(_run_record(result, run.started), sync.shape, body_hash, upserts=a.fingerprints,
                        replace_all=True, record_count=len(a.fingerprints), validators=validators)
    else:
        result.new, result.modified, result.deleted = a.counts[diff.NEW], a.counts[diff.MODIFIED], a.counts[diff.DELETED]
        result.events = [e.body for e in a.events]
        result.sync_type = INITIAL if run.initial else DELTA
        result.outcome = "changed" if a.events else "unchanged"
        # An initial run's upserts are the complete set: written as a replacement, which also
        # seeds the store's fingerprint cache for the next run.
        commit = Commit(_run_record(result, run.started), sync.shape, body_hash, upserts=a.upserts, deletes=a.deletes,
                        events=a.events, replace_all=run.initial,
                        record_count=old_count + result.new - result.deleted, validators=validators)
    if store is not None and not run.dry_run:
        commit.run = _run_record(result, run.started)
        commit.expected_generation = state.generation
        try:
            await store.commit_run(commit)
        except StateConflict as exc:
            raise CommitError(str(exc)) from None
    if big:
        _schedule_trim()
    log.info("poll done", outcome=result.outcome, records=result.records, new=result.new,
             modified=result.modified, deleted=result.deleted, pages=result.pages)


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
