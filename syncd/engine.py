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
from datetime import datetime, timezone

import aiohttp
import orjson
import structlog
from xxhash import xxh3_128_digest

from syncd import diff
from syncd.config import Sync, scrub
from syncd.errors import CommitError, ParseError, RunError
from syncd.fetch import fetch
from syncd.store import Commit, OutboxEvent, RunRecord, StateConflict, Store

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


def iso_timestamp(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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

    @property
    def ok(self) -> bool:
        return self.outcome != "failed"


def parse_json(body: bytes):
    """Strict RFC 8259 JSON (no NaN/Infinity, valid UTF-8, bounded nesting)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        start = body[:60].decode("utf-8", "replace")
        start = " ".join(start.split())
        hint = " (an HTML page: is the URL or the token right?)" if start.lstrip().startswith("<") else ""
        raise ParseError(f"response is not valid JSON: {exc}; it starts with {start!r}{hint}") from None


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


def _analyse(sync: Sync, body: bytes, old: dict[str, bytes], initial: bool, rebaseline: bool, run_id: str) -> _Analysis:
    with _gc_paused():
        document = parse_json(body)
        snap = diff.snapshot(document, sync.id, sync.list_path, sync.id_path, sync.ignore_paths)
        del document  # freed before the collector runs again: the records live on only in `changes`
        counts = {diff.NEW: 0, diff.MODIFIED: 0, diff.DELETED: 0}
        if rebaseline:
            snap.records = {}
            return _Analysis(snap.fingerprints, snap.invalid_ids, snap.duplicate_ids, snap.invalid_examples,
                             [], snap.fingerprints, [], counts)
        # Records we could not read may be among the "missing" ones: never delete on such a run.
        changes = diff.changes(old, snap, initial=initial, allow_deletes=snap.invalid_ids == 0)
        snap.records = {}
        sync_type = INITIAL if initial else DELTA
        now = time.time()
        timestamp = iso_timestamp(now)
        webhook_url = sync.spec.webhook_url
        dumps = orjson.dumps
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


async def poll(sync: Sync, store: Store | None, session: aiohttp.ClientSession, *, max_bytes: int, dry_run: bool = False) -> RunResult:
    """Run one poll of `sync` and commit its outcome (unless `dry_run`). Never raises for a failed run."""
    run_id = new_id("run")
    started = time.time()
    t0 = time.perf_counter()
    result = RunResult(sync.id, run_id, "failed")
    with structlog.contextvars.bound_contextvars(sync=sync.id, run=run_id):
        try:
            try:
                await _poll(sync, store, session, max_bytes, dry_run, result, started)
            except CommitError as exc:
                # The state moved under this run (another process committed or reset it): nothing
                # is wrong with the API, so run once more against the new state right away.
                log.info("state changed during the poll; polling again", reason=exc.reason)
                result = RunResult(sync.id, run_id, "failed")
                await _poll(sync, store, session, max_bytes, dry_run, result, started)
        except RunError as exc:
            result.outcome, result.error, result.events = "failed", f"{exc.stage}: {exc.reason}", []
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
                await store.record_run(_run_record(result, started))
            except sqlite3.Error as exc:
                log.error("could not record the failed poll in the state database", error=str(exc))
    return result


async def _poll(sync: Sync, store: Store | None, session, max_bytes: int, dry_run: bool, result: RunResult, started: float) -> None:
    state = await store.sync_state(sync.id) if store is not None else None
    body = await fetch(session, sync, max_bytes=max_bytes)
    body_hash = xxh3_128_digest(body)
    same_shape = state is not None and state.baselined and state.shape == sync.shape
    if same_shape and state.body_hash == body_hash:
        # Byte-identical to the last good run: nothing can have changed.
        result.outcome, result.sync_type, result.records = "unchanged", DELTA, state.record_count
        if store is not None and not dry_run:
            await store.record_run(_run_record(result, started))
        log.debug("poll unchanged", records=state.record_count)
        return

    initial = state is None or not state.baselined
    rebaseline = not initial and not same_shape
    old = await store.fingerprints(state) if store is not None and not initial else {}
    args = (sync, body, old, initial, rebaseline, result.run_id)
    big = len(body) > THREAD_THRESHOLD
    a = await asyncio.to_thread(_analyse, *args) if big else _analyse(*args)
    del body

    result.records = len(a.fingerprints)
    result.invalid_ids, result.duplicate_ids = a.invalid_ids, a.duplicate_ids
    if a.invalid_ids:
        log.warning("records without a usable id were skipped; no record.deleted this run",
                    skipped=a.invalid_ids, examples=a.invalid_examples, record_identifier=sync.id_path.text)
    if a.duplicate_ids:
        log.warning("duplicate record ids were skipped after their first occurrence", skipped=a.duplicate_ids)

    if rebaseline:
        log.info("list_identifier, record_identifier or ignore_fields changed: re-baselining without events",
                 records=len(a.fingerprints))
        result.outcome, result.sync_type = "baseline", None
        commit = Commit(_run_record(result, started), sync.shape, body_hash, upserts=a.fingerprints,
                        replace_all=True, record_count=len(a.fingerprints))
    else:
        result.new, result.modified, result.deleted = a.counts[diff.NEW], a.counts[diff.MODIFIED], a.counts[diff.DELETED]
        result.events = [e.body for e in a.events]
        result.sync_type = INITIAL if initial else DELTA
        result.outcome = "changed" if a.events else "unchanged"
        # An initial run's upserts are the complete set: written as a replacement, which also
        # seeds the store's fingerprint cache for the next run.
        commit = Commit(_run_record(result, started), sync.shape, body_hash, upserts=a.upserts, deletes=a.deletes,
                        events=a.events, replace_all=initial,
                        record_count=len(old) + result.new - result.deleted)
    if store is not None and not dry_run:
        commit.run = _run_record(result, started)
        commit.expected_generation = state.generation
        try:
            await store.commit_run(commit)
        except StateConflict as exc:
            raise CommitError(str(exc)) from None
    if big:
        _schedule_trim()
    log.info("poll done", outcome=result.outcome, records=result.records, new=result.new,
             modified=result.modified, deleted=result.deleted)


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
        invalid_ids=result.invalid_ids, duplicate_ids=result.duplicate_ids,
    )
