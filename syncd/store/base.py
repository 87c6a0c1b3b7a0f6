"""What every state backend offers: the typed values, the errors, and the `StateStore` protocol.

The engine, delivery, the daemon and the CLI see only this module: SQLite (`store.sqlite`, the
embedded default) and PostgreSQL (`store.postgres`, several instances sharing one database) are
interchangeable behind it. Backend errors never leave a store as themselves: they become a
`StoreError` whose `kind` says what a sysadmin can do about it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import zlib
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from syncd.events import Envelopes, render_stored
from syncd.units import iso_time

RUNS_KEPT = 100  # run history rows kept per sync


# -- errors ------------------------------------------------------------------------------------


class StoreError(Exception):
    """The state store failed an operation. `kind` is one of: "unavailable" (cannot reach or open
    it), "locked" (busy for too long), "full" (no space), "readonly" (no permission to write),
    "corrupt" (not a database syncd can read), "schema" (written by another syncd version), "other"."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


class SchemaError(StoreError):
    """The database was written by a newer syncd, or is older and opened read-only."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "schema")


class StateConflict(Exception):
    """The sync's state changed under a run; the run must be repeated against the new state."""


class LeaseLost(StateConflict):
    """This instance no longer holds the sync's lease (it expired, or another instance took it):
    the run's results are discarded, the new owner polls the sync."""


@dataclass(frozen=True, slots=True)
class ConsumedRun:
    """A run whose events are all delivered or dead: what its sync.events.allConsumed says."""

    run_id: str
    sync_id: str
    sync_type: str | None
    webhook_url: str
    delivered: int
    dead: int


@dataclass
class SyncState:
    """What the store remembers of one sync between runs."""

    sync_id: str
    shape: str | None = None
    body_hash: bytes | None = None
    generation: int = 0
    baselined: bool = False
    record_count: int = 0
    last_run_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_success_at: float | None = None
    last_change_at: float | None = None
    next_run_at: float | None = None
    #: ETag / Last-Modified of the last good one-request response (plus the definition they belong to).
    validators: dict[str, str] | None = None
    #: Why the last good run held its deletes (a next-page hint without pagination), if it did.
    last_warning: str | None = None
    #: Records missing from the last runs whose deletion waits for confirm_deletes_after.
    pending_deletes: int = 0
    #: Deletions the last run held back (max_delete_fraction); 0 after a successful run.
    deletes_held: int = 0
    #: The stored records carry their last bodies (keep_records).
    keeps_records: bool = False
    #: The preset dictionary the sync's bodies are compressed with (see compress_body).
    body_dict: bytes | None = None


@dataclass
class RunRecord:
    """One poll, as kept in the run history."""

    run_id: str
    sync_id: str
    started_at: float
    finished_at: float
    outcome: str  # changed | unchanged | baseline | failed
    sync_type: str | None = None
    error: str | None = None
    records: int | None = None
    new: int = 0
    modified: int = 0
    deleted: int = 0
    invalid_ids: int = 0
    duplicate_ids: int = 0
    pages: int = 0
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An event to queue. `body` is the webhook body, or, when `sync_run_id` is set, only its
    eventData (compact JSON): the envelope is rendered from the parts when it is read back, so
    an initial run of 100k records does not build and store 100k envelopes (see `envelope`)."""

    event_id: str
    sync_id: str
    record_id: str
    event_type: str
    webhook_url: str
    created_at: float
    body: bytes
    #: Set when the run's events are tallied for sync.events.allConsumed.
    run_id: str | None = None
    #: The parts of a record event's envelope that `body` lacks (its run's syncType and
    #: syncRunId; changedFields as JSON, keep_records only). None: `body` is the whole envelope.
    sync_type: str | None = None
    sync_run_id: str | None = None
    changed_fields: bytes | None = None

    def envelope(self) -> bytes:
        """The webhook body."""
        return stored_body(self.event_id, self.sync_id, self.record_id, self.event_type, self.created_at, self.body,
                           self.sync_type, self.sync_run_id, self.changed_fields)


def stored_body(event_id: str, sync_id: str, record_id: str, event_type: str, created_at: float, body: bytes,
                sync_type: str | None, sync_run_id: str | None, changed_fields: bytes | None) -> bytes:
    """The webhook body of an event kept as OutboxEvent's fields: `body` itself, or (sync_run_id
    set) the envelope rendered around it."""
    if sync_run_id is None:
        return body
    return render_stored(event_id, event_type, record_id, body, sync_type=sync_type, sync_id=sync_id,
                         run_id=sync_run_id, created_at=created_at, fields_json=changed_fields)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An event ready for a delivery attempt."""

    seq: int
    event_id: str
    sync_id: str
    record_id: str
    event_type: str
    webhook_url: str
    body: bytes
    attempts: int
    created_at: float


@dataclass(slots=True)
class RunEvents:
    """One run's record events, column by column: what they share once, and per event its id,
    record id, type and eventData (compact JSON). An initial run of 100k records queues them
    without building 100k event objects, and a store can write them in one statement."""

    sync_id: str
    webhook_url: str
    created_at: float
    sync_type: str | None
    sync_run_id: str
    #: The run's id when its events are tallied for sync.events.allConsumed, else None.
    run_id: str | None
    event_ids: list[str] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    #: changedFields as JSON per event (keep_records' record.modified), or None when no event has any.
    changed_fields: list[bytes | None] | None = None

    def __len__(self) -> int:
        return len(self.event_ids)

    def events(self) -> list[OutboxEvent]:
        """The same events as OutboxEvent objects (stored as parts: see OutboxEvent)."""
        sid, url, at, run_id, sync_type, sync_run_id = (self.sync_id, self.webhook_url, self.created_at, self.run_id,
                                                       self.sync_type, self.sync_run_id)
        fields = self.changed_fields or [None] * len(self.event_ids)
        return [OutboxEvent(event_id, sid, record_id, kind, url, at, data, run_id, sync_type, sync_run_id, changed)
                for event_id, record_id, kind, data, changed in zip(self.event_ids, self.record_ids, self.types,
                                                                     self.data, fields, strict=True)]

    def envelopes(self) -> list[bytes]:
        """The webhook bodies, in order."""
        render = Envelopes(sync_type=self.sync_type, sync_id=self.sync_id, run_id=self.sync_run_id,
                           timestamp=iso_time(self.created_at)).render
        fields = self.changed_fields or [None] * len(self.event_ids)
        return [render(event_id, kind, data, record_id, changed)
                for event_id, record_id, kind, data, changed in zip(self.event_ids, self.record_ids, self.types,
                                                                     self.data, fields, strict=True)]

    def counts(self) -> tuple[int, int, int]:
        """How many record.new, record.modified and record.deleted events there are."""
        types = self.types
        return types.count("record.new"), types.count("record.modified"), types.count("record.deleted")


def pending_event(seq: int, event_id: str, sync_id: str, record_id: str, event_type: str, webhook_url: str,
                  body: bytes, attempts: int, created_at: float, sync_type: str | None, sync_run_id: str | None,
                  changed_fields: bytes | None) -> PendingEvent:
    """A PendingEvent from an outbox row stored as its parts (see OutboxEvent), its body rendered."""
    body = stored_body(event_id, sync_id, record_id, event_type, created_at, body, sync_type, sync_run_id, changed_fields)
    return PendingEvent(seq, event_id, sync_id, record_id, event_type, webhook_url, body, attempts, created_at)


@dataclass(frozen=True, slots=True)
class Delivery:
    """An undelivered event as `syncd deliveries list` shows it."""

    seq: int
    event_id: str
    sync_id: str
    record_id: str
    event_type: str
    webhook_url: str
    created_at: float
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    dead_at: float | None
    #: A dead letter whose record has a later event delivered or queued: replay skips it.
    superseded: bool = False

    @property
    def state(self) -> str:
        if self.dead_at is None:
            return "pending"
        return "superseded" if self.superseded else "dead"


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    dead: int
    oldest_pending_created_at: float | None


@dataclass
class Commit:
    """Everything a successful run writes, applied in one transaction."""

    run: RunRecord
    shape: str
    body_hash: bytes
    upserts: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    replace_all: bool = False  # re-baseline: drop every stored fingerprint first
    record_count: int = 0  # fingerprints stored once the commit is applied
    #: The run's record events, queued first; then `events` (its lifecycle events).
    run_events: RunEvents | None = None
    events: list[OutboxEvent] = field(default_factory=list)
    #: The sync's generation when the run read its state: if another process (`syncd once`,
    #: `syncd reset`) committed since, this run's diff is stale and the commit is refused.
    expected_generation: int = 0
    validators: dict[str, str] | None = None
    #: Records missing but not deleted yet (confirm_deletes_after): id -> consecutive runs missing.
    missing: dict[str, int] = field(default_factory=dict)
    #: keep_records: the compressed bodies of the upserted records (None: bodies are not kept).
    bodies: dict[str, bytes] | None = None
    #: The run queued record events (last_change_at moves).
    changed: bool = False
    #: Tally the run's events for sync.events.allConsumed: (webhook_url, sync_type), or None.
    tally: tuple[str, str | None] | None = None
    #: keep_records was turned off: forget the stored bodies.
    drop_bodies: bool = False
    #: The bodies' compression dictionary, when this commit starts using one.
    body_dict: bytes | None = None


# -- the protocol ---------------------------------------------------------------------------------


class StateStore(Protocol):
    """What the engine, delivery, the daemon and the CLI need from a state backend.

    Writes of one run are atomic. Delivery claims are the store's: `claim_due` hands out the head
    event of each record (the oldest one not delivered or dead) to one deliverer at a time, in this
    process (SQLite) or across instances (PostgreSQL), until `record_attempts` settles it or
    `release` gives it back. `outbox_changed` is set when deliverable events appear."""

    outbox_changed: asyncio.Event
    #: A short description of where the state lives, for logs and errors (never with a password).
    location: str

    async def close(self) -> None: ...
    def identity_problem(self) -> str | None: ...

    # syncs and runs
    async def sync_state(self, sync_id: str) -> SyncState: ...
    async def all_states(self) -> list[SyncState]: ...
    async def fingerprints(self, state: SyncState) -> dict[str, bytes]: ...
    async def pending_missing(self, sync_id: str) -> dict[str, int]: ...
    async def bodies(self, state: SyncState, record_ids: list[str]) -> dict[str, bytes]: ...
    async def commit_run(self, commit: Commit) -> int: ...
    async def record_run(self, run: RunRecord, *, validators: dict[str, str] | None = None,
                         not_before: float | None = None, events: list[OutboxEvent] = (),
                         tally: tuple[str, str | None] | None = None, deletes_held: int = 0) -> None: ...
    async def runs(self, sync_id: str, limit: int = 20) -> list[RunRecord]: ...
    async def all_runs(self, sync_id: str) -> list[RunRecord]: ...
    async def events_since(self, since: float) -> dict[str, tuple[int, int, int]]: ...
    async def reset(self, sync_id: str) -> bool: ...
    async def paused(self) -> set[str]: ...
    async def lease_owners(self) -> dict[str, str]: ...
    async def set_paused(self, sync_id: str, paused: bool) -> None: ...

    # delivery
    async def claim_due(self, now: float, limit: int, sync_id: str | None = None) -> list[PendingEvent]: ...
    async def claim_spread(self, now: float, rooms: dict[str, int]) -> list[PendingEvent]: ...
    async def release(self, events: list[PendingEvent]) -> None: ...
    def claim_valid(self, event: PendingEvent) -> bool: ...
    async def due_syncs(self, now: float) -> list[str]: ...
    async def next_due(self) -> float | None: ...
    async def record_attempts(self, delivered: list[int], retries: list[tuple], dead: list[tuple]) -> None: ...
    async def consumed_runs(self) -> list[ConsumedRun]: ...
    async def announce_consumed(self, events: list[OutboxEvent], run_ids: list[str], now: float) -> None: ...

    # operators
    async def outbox_stats(self) -> dict[str, OutboxStats]: ...
    async def deliveries(self, *, sync_id: str | None = None, dead_only: bool = False,
                         limit: int | None = None) -> list[Delivery]: ...
    async def replay(self, *, sync_id: str | None = None, since: float | None = None, event_id: str | None = None,
                     now: float) -> tuple[int, int]: ...
    async def purge_dead(self, *, before: float, sync_id: str | None = None) -> int: ...
    async def outbox(self, sync_id: str | None = None) -> list[OutboxEvent]: ...

# -- helpers both backends use ------------------------------------------------------------------


class FingerprintCache:
    """Each sync's fingerprints as of a generation: a poll of 100k records need not re-read 100k
    rows when nobody else (another process, another instance, `syncd reset`) wrote them since."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, dict[str, bytes]]] = {}

    def get(self, sync_id: str, generation: int) -> dict[str, bytes] | None:
        cached = self._entries.get(sync_id)
        return cached[1] if cached is not None and cached[0] == generation else None

    def put(self, sync_id: str, generation: int, fingerprints: dict[str, bytes]) -> None:
        self._entries[sync_id] = (generation, fingerprints)

    def forget(self, sync_id: str) -> None:
        self._entries.pop(sync_id, None)

    def committed(self, commit: Commit, generation: int) -> None:
        """Bring a sync's entry to `generation`, the one `commit` just wrote."""
        sid = commit.run.sync_id
        cached = self._entries.get(sid)
        if commit.replace_all:
            self._entries[sid] = (generation, dict(commit.upserts))
        elif cached is not None and cached[0] == generation - 1:
            fingerprints = cached[1]
            for rid in commit.deletes:
                fingerprints.pop(rid, None)
            fingerprints.update(commit.upserts)
            self._entries[sid] = (generation, fingerprints)
        else:
            self._entries.pop(sid, None)


def default_instance_id() -> str:
    """An instance's name in leases and claims unless instance_id says otherwise: HOSTNAME:PID."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: Tallied runs whose events are all delivered or dead, not announced yet (both backends; no
#: parameters). Rows: run_id, sync_id, sync_type, webhook_url, total, dead letters.
CONSUMED_RUNS_SQL = """
    SELECT t.run_id, t.sync_id, t.sync_type, t.webhook_url, t.total,
           t.dead_purged + (SELECT count(*) FROM outbox o WHERE o.run_id = t.run_id AND o.dead_at IS NOT NULL)
    FROM run_tallies t
    WHERE t.emitted_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = t.run_id AND o.dead_at IS NULL)
"""


def consumed_runs_of(rows) -> list[ConsumedRun]:
    """CONSUMED_RUNS_SQL's rows as ConsumedRuns."""
    return [ConsumedRun(run_id, sync_id, sync_type, url, total - dead, dead)
            for run_id, sync_id, sync_type, url, total, dead in rows]


def tallied_events(events: list[OutboxEvent], run_events: RunEvents | None = None) -> int:
    """How many of a run's queued events count towards its sync.events.allConsumed tally."""
    total = sum(1 for e in events if e.run_id is not None)
    return total + len(run_events) if run_events is not None and run_events.run_id is not None else total


def record_event_counts(events: list[OutboxEvent], run_events: RunEvents | None = None) -> tuple[int, int, int]:
    """How many record.new, record.modified and record.deleted events are in `events` and `run_events`."""
    counts = {"record.new": 0, "record.modified": 0, "record.deleted": 0}
    for e in events:
        if e.event_type in counts:
            counts[e.event_type] += 1
    new, modified, deleted = run_events.counts() if run_events else (0, 0, 0)
    return counts["record.new"] + new, counts["record.modified"] + modified, counts["record.deleted"] + deleted


def dump_validators(validators: dict[str, str] | None) -> str | None:
    return orjson.dumps(validators).decode() if validators else None


def load_validators(text: str | None) -> dict[str, str] | None:
    try:
        value = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def neutral_errors(errors: tuple[type[BaseException], ...], convert):
    """A class decorator: every public coroutine of the class (and `open`) raises
    `convert(exc)`, a StoreError, instead of one of the backend's `errors`."""
    def wrap(fn):
        @functools.wraps(fn)
        async def method(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except errors as exc:
                raise convert(exc) from exc
        return method

    def decorate(cls):
        for name, value in list(vars(cls).items()):
            if not name.startswith("_") and asyncio.iscoroutinefunction(value):
                setattr(cls, name, wrap(value))
            elif name == "open":
                setattr(cls, name, classmethod(wrap(value.__func__)))
        return cls

    return decorate


# -- keep_records bodies -------------------------------------------------------------------------

#: Bodies are compressed one by one (each is read alone) with a preset dictionary cut from the
#: sync's own records: a 320-byte JSON record becomes ~55 bytes, where zlib alone gets ~240.
BODY_DICT_SIZE = 8192


def body_dictionary(samples: list[bytes]) -> bytes:
    """A preset dictionary from canonical bodies spread over a sync's records."""
    out, size = [], 0
    for sample in samples:
        out.append(sample)
        size += len(sample)
        if size >= BODY_DICT_SIZE:
            break
    return b"".join(out)[-BODY_DICT_SIZE:] or b"{}"


def compress_body(body: bytes, dictionary: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15, zdict=dictionary)
    return packer.compress(body) + packer.flush()


def decompress_body(data: bytes, dictionary: bytes) -> bytes:
    unpacker = zlib.decompressobj(-15, zdict=dictionary)
    return unpacker.decompress(data) + unpacker.flush()
