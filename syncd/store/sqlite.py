"""The embedded state backend: SQLite in WAL mode through aiosqlite. A successful run's fingerprints and its outbox events are
written in ONE transaction, so after a crash at any moment a change is either recorded with its
events or not at all (and then found again by the next run).
"""

from __future__ import annotations

import asyncio
import bisect
import fcntl
import itertools
import os
import sqlite3
import urllib.parse
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from syncd.store.base import (
    CONSUMED_RUNS_SQL,
    RUNS_KEPT,
    Commit,
    ConsumedRun,
    Delivery,
    FingerprintCache,
    OutboxEvent,
    OutboxStats,
    PendingEvent,
    RunEvents,
    RunRecord,
    SchemaError,
    StateConflict,
    StoreError,
    SyncState,
    consumed_runs_of,
    decompress_body,
    dump_validators,
    load_validators,
    neutral_errors,
    pending_event,
    record_event_counts,
    tallied_events,
)

SCHEMA_VERSION = 4

#: The outbox (v4): event_id is not UNIQUE (ids carry 80 random bits; the unique index cost an
#: initial run of 100k events ~25% of its insert), and a record event's body is its eventData
#: alone, its envelope rendered from sync_type, sync_run_id and changed_fields when read back
#: (NULL sync_run_id: body is the whole envelope, as for lifecycle events).
_OUTBOX = """CREATE TABLE IF NOT EXISTS {name} (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL,
    sync_id         TEXT NOT NULL,
    record_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    webhook_url     TEXT NOT NULL,
    created_at      REAL NOT NULL,
    body            BLOB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_status     INTEGER,
    last_error      TEXT,
    dead_at         REAL,
    superseded      INTEGER NOT NULL DEFAULT 0,
    run_id          TEXT,
    sync_type       TEXT,
    sync_run_id     TEXT,
    changed_fields  BLOB
)"""
_OLD_OUTBOX_COLUMNS = ("seq, event_id, sync_id, record_id, event_type, webhook_url, created_at, body, attempts, "
                       "next_attempt_at, last_status, last_error, dead_at, superseded, run_id")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS syncs (
    sync_id         TEXT PRIMARY KEY,
    shape           TEXT,
    body_hash       BLOB,
    generation      INTEGER NOT NULL DEFAULT 0,
    baselined       INTEGER NOT NULL DEFAULT 0,
    record_count    INTEGER NOT NULL DEFAULT 0,
    last_run_at     REAL,
    last_outcome    TEXT,
    last_error      TEXT,
    last_success_at REAL,
    last_change_at  REAL,
    next_run_at     REAL,
    validators      TEXT,
    last_warning    TEXT,
    pending_deletes INTEGER NOT NULL DEFAULT 0,
    deletes_held    INTEGER NOT NULL DEFAULT 0,
    keeps_records   INTEGER NOT NULL DEFAULT 0,
    body_dict       BLOB
);
CREATE TABLE IF NOT EXISTS records (
    sync_id     TEXT NOT NULL,
    record_id   TEXT NOT NULL,
    fingerprint BLOB NOT NULL,
    missing     INTEGER NOT NULL DEFAULT 0,
    body        BLOB,
    PRIMARY KEY (sync_id, record_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_missing ON records (sync_id) WHERE missing > 0;
CREATE TABLE IF NOT EXISTS runs (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id        TEXT NOT NULL,
    sync_id       TEXT NOT NULL,
    started_at    REAL NOT NULL,
    finished_at   REAL NOT NULL,
    outcome       TEXT NOT NULL,
    sync_type     TEXT,
    error         TEXT,
    records       INTEGER,
    new           INTEGER NOT NULL DEFAULT 0,
    modified      INTEGER NOT NULL DEFAULT 0,
    deleted       INTEGER NOT NULL DEFAULT 0,
    invalid_ids   INTEGER NOT NULL DEFAULT 0,
    duplicate_ids INTEGER NOT NULL DEFAULT 0,
    pages         INTEGER NOT NULL DEFAULT 0,
    warning       TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_sync ON runs (sync_id, seq);
%(outbox)s;
CREATE INDEX IF NOT EXISTS outbox_by_run ON outbox (run_id) WHERE run_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS run_tallies (
    run_id      TEXT PRIMARY KEY,
    sync_id     TEXT NOT NULL,
    sync_type   TEXT,
    webhook_url TEXT NOT NULL,
    total       INTEGER NOT NULL,
    dead_purged INTEGER NOT NULL DEFAULT 0,
    emitted_at  REAL
);
CREATE INDEX IF NOT EXISTS run_tallies_open ON run_tallies (run_id) WHERE emitted_at IS NULL;
CREATE TABLE IF NOT EXISTS event_hours (
    sync_id  TEXT NOT NULL,
    hour     INTEGER NOT NULL,
    new      INTEGER NOT NULL DEFAULT 0,
    modified INTEGER NOT NULL DEFAULT 0,
    deleted  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sync_id, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sync_controls (
    sync_id TEXT PRIMARY KEY,
    paused  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_by_record ON outbox (sync_id, record_id, seq);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, seq) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_due_by_sync ON outbox (sync_id, next_attempt_at, seq) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL;
"""
_SCHEMA = _SCHEMA % {"outbox": _OUTBOX.format(name="outbox")}

#: Each step takes the schema from version N to N+1; a database is brought up to date when opened.
_MIGRATIONS = {
    1: [  # pagination, conditional requests and held-delete warnings
        "ALTER TABLE syncs ADD COLUMN validators TEXT",
        "ALTER TABLE syncs ADD COLUMN last_warning TEXT",
        "ALTER TABLE runs ADD COLUMN pages INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN warning TEXT",
        "ALTER TABLE outbox ADD COLUMN superseded INTEGER NOT NULL DEFAULT 0",
    ],
    2: [  # change-semantics options and lifecycle events
        "ALTER TABLE records ADD COLUMN missing INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE records ADD COLUMN body BLOB",
        "ALTER TABLE syncs ADD COLUMN pending_deletes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE syncs ADD COLUMN deletes_held INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE syncs ADD COLUMN keeps_records INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE syncs ADD COLUMN body_dict BLOB",
        "ALTER TABLE outbox ADD COLUMN run_id TEXT",
    ],
    3: [  # the outbox rebuilt: no UNIQUE on event_id, record events stored as their parts
        _OUTBOX.format(name="outbox_v4"),
        f"INSERT INTO outbox_v4 ({_OLD_OUTBOX_COLUMNS}) SELECT {_OLD_OUTBOX_COLUMNS} FROM outbox",
        # Sequence numbers go on from where they were, not from the highest one still queued.
        "DELETE FROM sqlite_sequence WHERE name = 'outbox_v4'",
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'outbox_v4', seq FROM sqlite_sequence WHERE name = 'outbox'",
        "DROP TABLE outbox",  # and its indexes: _SCHEMA creates them again
        "ALTER TABLE outbox_v4 RENAME TO outbox",
    ],
}


@asynccontextmanager
async def _nothing():
    yield


class StateLocked(Exception):
    """Another `syncd run` uses this SQLite database (SQLite is single-instance)."""


def lock_instance(path: Path) -> int:
    """Take the state database's instance lock (`<state>.lock`, flock), for `syncd run`. Returns the
    open descriptor, to keep for the life of the process; raises StateLocked naming the holder."""
    create_private(path)  # the directory, 0700, if it is new
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateLocked(f"{path} is used by another syncd run (pid {holder}, lock file {lock}); SQLite state is for "
                          "one daemon at a time: stop the other one, or give this one its own --state-path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


#: SQL condition on an outbox row: a later event of its record is queued, or one was delivered.
_SUPERSEDED = ("superseded = 1 OR EXISTS (SELECT 1 FROM outbox later WHERE later.sync_id = outbox.sync_id "
               "AND later.record_id = outbox.record_id AND later.seq > outbox.seq AND later.dead_at IS NULL)")


#: A run's fingerprints or record events above this many go in as statements of packed
#: parameters: 100k rows bound one by one cost ~2 µs each in the sqlite3 module alone.
_PACK_OVER = 256
_TYPE_CODES = {"record.new": "n", "record.modified": "m", "record.deleted": "d"}

#: No ORDER BY in the packed statements: SQLite cannot tell that json_each yields its rows in
#: order, and sorted them, blobs and all, in temp files (a third of a 100k-row insert). Nothing
#: depends on the order the rows arrive in: record ids are unique here, and each event's seq is
#: given (?13 + its index), not taken from AUTOINCREMENT in arrival order.
_INSERT_FINGERPRINTS = (
    "INSERT OR REPLACE INTO records (sync_id, record_id, fingerprint) "
    "SELECT ?1, value, substr(?3, key * 16 + 1, 16) FROM json_each(?2)"
)

#: ?1 the record ids as a JSON array (one row each, in order); the event ids concatenated (all ?3
#: bytes long), the type codes (one byte each), the eventData concatenated and each one's start
#: and length (13 + 10 decimal digits) as BLOBs, which substr() indexes by byte; ?7..?12 the
#: run's constants; ?13 the seq of the first event (_NEXT_SEQ).
_INSERT_EVENTS = """
    INSERT INTO outbox (seq, event_id, sync_id, record_id, event_type, webhook_url, created_at, body, run_id,
                        sync_type, sync_run_id)
    SELECT ?13 + key, CAST(substr(?2, key * ?3 + 1, ?3) AS TEXT), ?7, value,
           CASE CAST(substr(?4, key + 1, 1) AS TEXT) WHEN 'n' THEN 'record.new' WHEN 'm' THEN 'record.modified'
                ELSE 'record.deleted' END,
           ?8, ?9, substr(?5, CAST(substr(?6, key * 23 + 1, 13) AS INTEGER), CAST(substr(?6, key * 23 + 14, 10) AS INTEGER)),
           ?10, ?11, ?12
    FROM json_each(?1)
"""

#: The seq AUTOINCREMENT would give the next outbox row: past every seq ever used.
_NEXT_SEQ = ("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0), "
             "coalesce((SELECT max(seq) FROM outbox), 0)) + 1")


def _json_array(values: list[str]) -> str | None:
    try:
        return orjson.dumps(values).decode()
    except orjson.JSONEncodeError:  # a lone surrogate in an id: row by row instead
        return None


#: One packed statement's eventData at most: SQLite refuses a value over 1e9 bytes
#: (SQLITE_MAX_LENGTH), and a 1M-record initial run's eventData alone is ~320 MB.
_PACK_BYTES = 64 << 20
#: One packed statement's fingerprints at most (16 bytes each, plus the ids' JSON).
_PACK_ROWS = 1 << 20


def _slices(lengths: list[int], limit: int) -> list[tuple[int, int]]:
    """[start, end) slices of consecutive items whose lengths add up to at most `limit` (an item
    longer than that alone), at most _PACK_ROWS items each."""
    ends = list(itertools.accumulate(lengths))
    out, start = [], 0
    while start < len(lengths):
        base = ends[start - 1] if start else 0
        end = max(start + 1, bisect.bisect_right(ends, base + limit, lo=start))
        end = min(end, start + _PACK_ROWS)
        out.append((start, end))
        start = end
    return out


async def _packed_fingerprints(upserts: dict[str, bytes]) -> list[tuple] | None:
    """Parameters of _INSERT_FINGERPRINTS (record ids as JSON, fingerprints concatenated), one
    tuple per statement, or None: row by row."""
    if len(upserts) < _PACK_OVER:
        return None

    def pack():
        fingerprints = list(upserts.values())
        if set(map(len, fingerprints)) != {16}:
            return None
        ids = list(upserts)
        out = []
        for start in range(0, len(ids), _PACK_ROWS):
            text = _json_array(ids[start:start + _PACK_ROWS])
            if text is None:
                return None
            out.append((text, b"".join(fingerprints[start:start + _PACK_ROWS])))
        return out

    return await asyncio.to_thread(pack)  # ~20 ms at 100k: not on the event loop


async def _packed_events(events: RunEvents | None) -> list[tuple] | None:
    """Parameters of _INSERT_EVENTS but the first seq, one tuple per statement (in order), or
    None when `events` need inserting row by row."""
    if (not events or len(events) < _PACK_OVER or events.changed_fields is not None
            or any(t not in _TYPE_CODES for t in set(events.types))):
        return None

    def pack():
        id_lengths = set(map(len, events.event_ids))
        if len(id_lengths) != 1:
            return None
        id_length = id_lengths.pop()
        run = (events.sync_id, events.webhook_url, events.created_at, events.run_id, events.sync_type,
               events.sync_run_id)
        lengths = list(map(len, events.data))
        out = []
        for start, end in _slices(lengths, _PACK_BYTES):
            ids = _json_array(events.record_ids[start:end])
            if ids is None:
                return None
            part = lengths[start:end]
            spans = b"".join(b"%013d%010d" % span
                             for span in zip(itertools.accumulate(part, initial=1), part, strict=False))
            codes = "".join(map(_TYPE_CODES.__getitem__, events.types[start:end])).encode()
            out.append((ids, "".join(events.event_ids[start:end]).encode(), id_length, codes,
                        b"".join(events.data[start:end]), spans, *run))
        return out

    return await asyncio.to_thread(pack)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def create_private(path: Path) -> None:
    """Create the database file 0600 (its directory 0700) before SQLite opens it: it holds record
    data and webhook URLs with their tokens. SQLite gives its -wal and -shm files the same mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


async def _rollback(conn: aiosqlite.Connection) -> None:
    """Roll back, keeping the error that caused it: after SQLITE_FULL or an I/O error SQLite has
    already rolled back, and "cannot rollback - no transaction is active" would hide the cause."""
    try:
        await conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    """Create the schema, or bring an older one up to date, in one transaction (two processes
    opening an old database at once upgrade it once)."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        version = (await (await conn.execute("PRAGMA user_version")).fetchone())[0]
        if version > SCHEMA_VERSION:
            raise SchemaError(f"{path} has schema version {version}, newer than this syncd's ({SCHEMA_VERSION}): "
                              "it was written by a newer syncd; upgrade syncd, or point state_path elsewhere")
        tables = await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'syncs'")
        if tables and version >= 1:
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    await conn.execute(statement)
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                await conn.execute(statement)
        if version != SCHEMA_VERSION:
            await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await conn.execute("COMMIT")
    except BaseException:
        await _rollback(conn)
        raise


def store_error(exc: sqlite3.Error) -> StoreError:
    """An SQLite error as a store-neutral one, its kind read from SQLite's message."""
    text = str(exc)
    low = text.lower()
    if "locked" in low or "busy" in low:
        kind = "locked"
    elif "full" in low:
        kind = "full"
    elif "readonly" in low or "read-only" in low or "unable to open" in low:
        kind = "readonly"
    elif isinstance(exc, sqlite3.DatabaseError) and ("not a database" in low or "malformed" in low or "encrypted" in low):
        kind = "corrupt"
    else:
        kind = "other"
    return StoreError(text, kind)


@neutral_errors((sqlite3.Error,), store_error)
class SqliteStore:
    """The state database. Open with `await SqliteStore.open(path)`; one instance per process."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self.location = str(path)
        # Delivery claims: seqs handed to this process's deliverer and not settled yet, and
        # their records (a record's next event waits until its claimed one is settled).
        self._claimed: set[int] = set()
        self._claimed_records: dict[tuple[str, str], int] = {}
        # Fingerprints of each sync as of a generation: a poll of 100k records need not re-read
        # 100k rows when nothing else (another syncd process, `syncd reset`) wrote them since.
        self._cache = FingerprintCache()
        # One connection serves every task: transactions must not interleave on it.
        self._tx_lock = asyncio.Lock()
        # Held while a run's commit is open: outbox reads wait for it, because this connection
        # would otherwise see the events of a commit that may still roll back.
        self._run_commit = asyncio.Lock()
        #: Set whenever this process adds deliverable events (a run's commit, a replay).
        self.outbox_changed = asyncio.Event()
        self._identity: tuple[int, int] | None = None

    @classmethod
    async def open(cls, path: Path | str, *, readonly: bool = False, busy_timeout: float = 10.0,
                   autocheckpoint: bool = True) -> SqliteStore:
        """`autocheckpoint=False`, for short-lived processes: no WAL checkpoint inside a commit
        (an initial run's COMMIT of 100k events took 150 ms for it, 20 ms without); the WAL is
        checkpointed when the last connection closes, or by the daemon's next commit."""
        path = Path(path)
        if readonly:
            # A WAL database is read through its -shm file, which a reader without write access
            # to the directory cannot create: when no writer has one open (no -wal file), nothing
            # can change under us, and SQLite may read the file as it is.
            immutable = not _exists(path.with_name(path.name + "-wal")) and not os.access(path.parent, os.W_OK)
            uri = f"file:{urllib.parse.quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")
            conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        else:
            create_private(path)
            conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            # Another syncd process (`syncd once`, `reset`, `deliveries replay`) may hold the write lock briefly.
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            if not readonly:
                # 16 KiB pages for a new database (an existing one keeps its own): a run's outbox
                # rows are ~0.5 KB each, and an initial run of 100k records went in ~25% faster
                # with a quarter of the pages to write, log and checkpoint.
                await conn.execute("PRAGMA page_size = 16384")
                await conn.execute("PRAGMA journal_mode = WAL")
                # WAL + NORMAL: a process crash loses nothing committed; a power cut may lose the
                # last transactions whole, never half of one, which the next run finds again.
                await conn.execute("PRAGMA synchronous = NORMAL")
                if not autocheckpoint:
                    await conn.execute("PRAGMA wal_autocheckpoint = 0")
                await _migrate(conn, path)
            else:
                version = (await (await conn.execute("PRAGMA user_version")).fetchone())[0]
                if version != SCHEMA_VERSION:
                    raise SchemaError(f"{path} has schema version {version}; this syncd reads version {SCHEMA_VERSION}"
                                      + (" (open it once with a writable syncd to upgrade it)" if version < SCHEMA_VERSION else
                                         " (written by a newer syncd: upgrade syncd)"))
        except BaseException:
            await conn.close()
            raise
        store = cls(conn, path)
        store._identity = _identity(path)
        return store

    def identity_problem(self) -> str | None:
        """How the file at `path` differs from the one this store has open: None (the same),
        "deleted" or "replaced by another file". Writes to a deleted file are lost at exit."""
        found = _identity(self.path)
        if found is None:
            return "deleted"
        if self._identity is not None and found != self._identity:
            return "replaced by another file"
        return None

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self):
        async with self._tx_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                await self._conn.execute("COMMIT")
            except BaseException:
                await _rollback(self._conn)
                raise

    # -- syncs ---------------------------------------------------------------------------------

    async def sync_state(self, sync_id: str) -> SyncState:
        rows = await self._conn.execute_fetchall(f"SELECT {_STATE_COLUMNS} FROM syncs WHERE sync_id = ?", (sync_id,))
        return _state(rows[0]) if rows else SyncState(sync_id)

    async def pending_missing(self, sync_id: str) -> dict[str, int]:
        """Records missing from recent runs, not deleted yet: id -> consecutive runs missing."""
        rows = await self._conn.execute_fetchall(
            "SELECT record_id, missing FROM records WHERE sync_id = ? AND missing > 0", (sync_id,))
        return dict(rows)

    async def bodies(self, state: SyncState, record_ids: list[str]) -> dict[str, bytes]:
        """The stored bodies (canonical JSON) of these records, where kept."""
        found: dict[str, bytes] = {}
        if state.body_dict is None:
            return found
        for start in range(0, len(record_ids), 500):
            chunk = record_ids[start:start + 500]
            rows = await self._conn.execute_fetchall(
                f"SELECT record_id, body FROM records WHERE sync_id = ? AND record_id IN ({','.join('?' * len(chunk))}) "
                "AND body IS NOT NULL", (state.sync_id, *chunk))
            found.update((rid, decompress_body(body, state.body_dict)) for rid, body in rows)
        return found

    async def all_states(self) -> list[SyncState]:
        """Every sync's state, in one query (a status page of 10,000 syncs must not make 10,000)."""
        rows = await self._conn.execute_fetchall(f"SELECT {_STATE_COLUMNS} FROM syncs ORDER BY sync_id")
        return [_state(row) for row in rows]

    async def fingerprints(self, state: SyncState) -> dict[str, bytes]:
        """Stored fingerprints of a sync. The returned dict must not be modified by the caller."""
        cached = self._cache.get(state.sync_id, state.generation)
        if cached is not None:
            return cached
        rows = await self._conn.execute_fetchall(
            "SELECT record_id, fingerprint FROM records WHERE sync_id = ?", (state.sync_id,)
        )
        fingerprints = dict(rows)
        self._cache.put(state.sync_id, state.generation, fingerprints)
        return fingerprints

    async def commit_run(self, commit: Commit) -> int:
        """Write a successful run: fingerprints, outbox events, sync row and history, atomically.
        Returns the records now waiting for their deletion to be confirmed."""
        run = commit.run
        sid = run.sync_id
        # A large run's parameters are packed before the write lock is taken (~90 ms at 100k
        # records), not while delivery's reads wait for the commit.
        fingerprints = await _packed_fingerprints(commit.upserts) if commit.bodies is None else None
        packed_events = await _packed_events(commit.run_events)
        async with self._run_commit, self._transaction() as conn:
            rows = await conn.execute_fetchall("SELECT generation FROM syncs WHERE sync_id = ?", (sid,))
            current = rows[0][0] if rows else 0
            if current != commit.expected_generation:
                raise StateConflict(f"the state of {sid} changed while this run was computing (generation "
                                    f"{commit.expected_generation} -> {current}: another syncd process or 'syncd reset'); "
                                    "nothing was written, the next run starts from the new state")
            if commit.replace_all:
                await conn.execute("DELETE FROM records WHERE sync_id = ?", (sid,))
            if commit.deletes:
                await conn.executemany(
                    "DELETE FROM records WHERE sync_id = ? AND record_id = ?", [(sid, rid) for rid in commit.deletes]
                )
            if commit.upserts:
                if fingerprints is not None:
                    for part in fingerprints:
                        await conn.execute(_INSERT_FINGERPRINTS, (sid, *part))
                elif commit.bodies is None:
                    await conn.executemany(
                        "INSERT OR REPLACE INTO records (sync_id, record_id, fingerprint) VALUES (?, ?, ?)",
                        [(sid, rid, fp) for rid, fp in commit.upserts.items()],
                    )
                else:
                    bodies = commit.bodies
                    await conn.executemany(
                        "INSERT OR REPLACE INTO records (sync_id, record_id, fingerprint, body) VALUES (?, ?, ?, ?)",
                        [(sid, rid, fp, bodies.get(rid)) for rid, fp in commit.upserts.items()],
                    )
            if commit.drop_bodies:
                # keep_records turned off: stored bodies are record data nobody needs any more.
                await conn.execute("UPDATE records SET body = NULL WHERE sync_id = ? AND body IS NOT NULL", (sid,))
                await conn.execute("UPDATE syncs SET body_dict = NULL WHERE sync_id = ?", (sid,))
            if commit.missing:
                await conn.executemany("UPDATE records SET missing = ? WHERE sync_id = ? AND record_id = ?",
                                       [(runs, sid, rid) for rid, runs in commit.missing.items()])
            if packed_events is not None:
                for part in packed_events:
                    first = (await conn.execute_fetchall(_NEXT_SEQ))[0][0]
                    await conn.execute(_INSERT_EVENTS, (*part, first))
            elif commit.run_events:
                await self._queue(conn, commit.run_events.events())
            await self._queue(conn, commit.events)
            await self._count_events(conn, sid, run.finished_at, commit.events, commit.run_events)
            if commit.tally is not None:
                await self._open_tally(conn, run, commit.tally, commit.events, commit.run_events)
            pending = (await (await conn.execute(
                "SELECT count(*) FROM records INDEXED BY records_missing WHERE sync_id = ? AND missing > 0",
                (sid,))).fetchone())[0]
            changed = commit.changed or commit.replace_all or bool(commit.upserts) or bool(commit.deletes)
            cursor = await conn.execute(
                """
                INSERT INTO syncs (sync_id, shape, body_hash, generation, baselined, record_count,
                                   last_run_at, last_outcome, last_error, last_success_at, last_change_at,
                                   validators, last_warning, pending_deletes, deletes_held, keeps_records, body_dict)
                VALUES (?1, ?2, ?3, 1, 1, ?4, ?5, ?6, NULL, ?5, CASE WHEN ?7 THEN ?5 END, ?8, ?9, ?10, 0, ?11, ?12)
                ON CONFLICT (sync_id) DO UPDATE SET
                    shape = ?2, body_hash = ?3, generation = generation + 1, baselined = 1, record_count = ?4,
                    last_run_at = ?5, last_outcome = ?6, last_error = NULL, last_success_at = ?5,
                    last_change_at = CASE WHEN ?7 THEN ?5 ELSE last_change_at END,
                    validators = ?8, last_warning = ?9, next_run_at = NULL, pending_deletes = ?10, deletes_held = 0,
                    keeps_records = ?11, body_dict = COALESCE(?12, body_dict)
                RETURNING generation
                """,
                (sid, commit.shape, commit.body_hash, commit.record_count, run.finished_at, run.outcome, changed,
                 dump_validators(commit.validators), run.warning, pending, commit.bodies is not None, commit.body_dict),
            )
            generation = (await cursor.fetchone())[0]
            await cursor.close()
            await self._insert_run(run)
        if commit.events or commit.run_events:
            self.outbox_changed.set()
        self._cache.committed(commit, generation)
        return pending

    async def record_run(self, run: RunRecord, *, validators: dict[str, str] | None = None,
                         not_before: float | None = None, events: list[OutboxEvent] = (),
                         tally: tuple[str, str | None] | None = None, deletes_held: int = 0) -> None:
        """Record a run that changed no fingerprints (failed, or unchanged response), with its
        lifecycle `events` if any. An unchanged run's `validators` replace the stored ones when
        given; `not_before` (a failed run's long Retry-After) is kept as the sync's earliest next
        run, across restarts; `deletes_held`: deletions a failed run held back."""
        success = run.outcome != "failed"
        async with self._run_commit if events else _nothing(), self._transaction() as conn:
            await conn.execute(
                """
                INSERT INTO syncs (sync_id, last_run_at, last_outcome, last_error, last_success_at, next_run_at, deletes_held)
                VALUES (?1, ?2, ?3, ?4, CASE WHEN ?5 THEN ?2 END, ?7, ?8)
                ON CONFLICT (sync_id) DO UPDATE SET
                    last_run_at = ?2, last_outcome = ?3, last_error = ?4,
                    last_success_at = CASE WHEN ?5 THEN ?2 ELSE last_success_at END,
                    validators = CASE WHEN ?5 AND ?6 IS NOT NULL THEN ?6 ELSE validators END,
                    next_run_at = ?7, deletes_held = ?8
                """,
                (run.sync_id, run.finished_at, run.outcome, run.error, success, dump_validators(validators), not_before,
                 deletes_held),
            )
            await self._queue(conn, list(events))
            if tally is not None and events:
                await self._open_tally(conn, run, tally, list(events))
            await self._insert_run(run)
        if events:
            self.outbox_changed.set()

    async def _queue(self, conn: aiosqlite.Connection, events: list[OutboxEvent]) -> None:
        if events:
            await conn.executemany(
                "INSERT INTO outbox (event_id, sync_id, record_id, event_type, webhook_url, created_at, body, run_id, "
                "sync_type, sync_run_id, changed_fields) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e.event_id, e.sync_id, e.record_id, e.event_type, e.webhook_url, e.created_at, e.body, e.run_id,
                  e.sync_type, e.sync_run_id, e.changed_fields) for e in events],
            )

    async def _open_tally(self, conn: aiosqlite.Connection, run: RunRecord, tally: tuple[str, str | None],
                          events: list[OutboxEvent], run_events: RunEvents | None = None) -> None:
        total = tallied_events(events, run_events)
        if total:
            await conn.execute("INSERT INTO run_tallies (run_id, sync_id, sync_type, webhook_url, total) VALUES (?, ?, ?, ?, ?)",
                               (run.run_id, run.sync_id, tally[1], tally[0], total))

    async def _count_events(self, conn: aiosqlite.Connection, sync_id: str, at: float, events: list[OutboxEvent],
                            run_events: RunEvents | None = None) -> None:
        """Hourly counts of queued record events (the web page's "last 24 h"), kept two days."""
        counts = record_event_counts(events, run_events)
        if not any(counts):
            return
        hour = int(at // 3600)
        await conn.execute(
            "INSERT INTO event_hours (sync_id, hour, new, modified, deleted) VALUES (?1, ?2, ?3, ?4, ?5) "
            "ON CONFLICT (sync_id, hour) DO UPDATE SET new = new + ?3, modified = modified + ?4, deleted = deleted + ?5",
            (sync_id, hour, *counts))
        await conn.execute("DELETE FROM event_hours WHERE sync_id = ? AND hour < ?", (sync_id, hour - 48))

    async def events_since(self, since: float) -> dict[str, tuple[int, int, int]]:
        """Record events queued per sync since `since` (hour granularity): (new, modified, deleted)."""
        rows = await self._conn.execute_fetchall(
            "SELECT sync_id, sum(new), sum(modified), sum(deleted) FROM event_hours WHERE hour >= ? GROUP BY sync_id",
            (int(since // 3600),))
        return {row[0]: (row[1], row[2], row[3]) for row in rows}

    async def all_runs(self, sync_id: str) -> list[RunRecord]:
        """The kept run history of a sync, oldest first."""
        return list(reversed(await self.runs(sync_id, limit=RUNS_KEPT)))

    # -- pause state (the control API) ------------------------------------------------------------

    async def paused(self) -> set[str]:
        rows = await self._conn.execute_fetchall("SELECT sync_id FROM sync_controls WHERE paused = 1")
        return {r[0] for r in rows}

    async def lease_owners(self) -> dict[str, str]:
        return {}  # one instance, no leases

    async def set_paused(self, sync_id: str, paused: bool) -> None:
        async with self._transaction() as conn:
            await conn.execute("INSERT INTO sync_controls (sync_id, paused) VALUES (?, ?) "
                               "ON CONFLICT (sync_id) DO UPDATE SET paused = excluded.paused", (sync_id, int(paused)))

    # -- sync.events.allConsumed -----------------------------------------------------------------

    async def consumed_runs(self) -> list[ConsumedRun]:
        """Tallied runs whose events are all delivered or dead, not announced yet."""
        return consumed_runs_of(await self._conn.execute_fetchall(CONSUMED_RUNS_SQL))

    async def announce_consumed(self, events: list[OutboxEvent], run_ids: list[str], now: float) -> None:
        """Queue the allConsumed events of these runs and mark them announced, atomically."""
        async with self._transaction() as conn:
            await self._queue(conn, events)
            await conn.executemany("UPDATE run_tallies SET emitted_at = ? WHERE run_id = ? AND emitted_at IS NULL",
                                   [(now, run_id) for run_id in run_ids])
        if events:
            self.outbox_changed.set()

    async def _insert_run(self, run: RunRecord) -> None:
        await self._conn.execute(
            "INSERT INTO runs (run_id, sync_id, started_at, finished_at, outcome, sync_type, error, records, new, "
            "modified, deleted, invalid_ids, duplicate_ids, pages, warning) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (run.run_id, run.sync_id, run.started_at, run.finished_at, run.outcome, run.sync_type, run.error,
             run.records, run.new, run.modified, run.deleted, run.invalid_ids, run.duplicate_ids, run.pages, run.warning),
        )
        await self._conn.execute(
            "DELETE FROM runs WHERE sync_id = ?1 AND seq <= "
            "(SELECT seq FROM runs WHERE sync_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            (run.sync_id, RUNS_KEPT),
        )

    async def runs(self, sync_id: str, limit: int = 20) -> list[RunRecord]:
        rows = await self._conn.execute_fetchall(
            "SELECT run_id, sync_id, started_at, finished_at, outcome, sync_type, error, records, new, modified, "
            "deleted, invalid_ids, duplicate_ids, pages, warning FROM runs WHERE sync_id = ? ORDER BY seq DESC LIMIT ?",
            (sync_id, limit),
        )
        return [RunRecord(*row) for row in rows]

    async def reset(self, sync_id: str) -> bool:
        """Forget a sync's fingerprints: its next run is an initial sync again. Outbox is kept."""
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM records WHERE sync_id = ?", (sync_id,))
            cursor = await conn.execute(
                "UPDATE syncs SET shape = NULL, body_hash = NULL, baselined = 0, record_count = 0, validators = NULL, "
                "last_warning = NULL, pending_deletes = 0, deletes_held = 0, keeps_records = 0, body_dict = NULL, "
                "generation = generation + 1 WHERE sync_id = ?",
                (sync_id,),
            )
            found = cursor.rowcount > 0
        self._cache.forget(sync_id)
        return found

    # -- outbox --------------------------------------------------------------------------------

    async def due_events(self, now: float, limit: int, sync_id: str | None = None) -> list[PendingEvent]:
        """Deliverable events: due, not dead, and the oldest undelivered event of their record
        (a later event of a record waits until the earlier one is delivered or dead)."""
        return [pending_event(*row) for row in await self._due_rows(now, limit, sync_id)]

    async def _due_rows(self, now: float, limit: int, sync_id: str | None) -> list[tuple]:
        """due_events' rows, bodies not rendered yet (columns as pending_event takes them)."""
        where = "o.sync_id = ? AND " if sync_id is not None else ""
        args = (sync_id, now, limit) if sync_id is not None else (now, limit)
        # Never while a run's commit is open: a webhook could go out for a run that then rolls back.
        async with self._run_commit:
            rows = await self._conn.execute_fetchall(
                f"""
                SELECT o.seq, o.event_id, o.sync_id, o.record_id, o.event_type, o.webhook_url, o.body, o.attempts, o.created_at,
                       o.sync_type, o.sync_run_id, o.changed_fields
                FROM outbox o
                WHERE {where}o.dead_at IS NULL AND o.next_attempt_at <= ?
                  AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.sync_id = o.sync_id AND p.record_id = o.record_id
                                  AND p.seq < o.seq AND p.dead_at IS NULL)
                ORDER BY o.next_attempt_at, o.seq
                LIMIT ?
                """,
                args,
            )
        return rows

    async def claim_due(self, now: float, limit: int, sync_id: str | None = None) -> list[PendingEvent]:
        """Claim up to `limit` deliverable events for this process's deliverer (see due_events),
        skipping those claimed already and the records they belong to."""
        claimed, records = self._claimed, self._claimed_records
        rows = await self._due_rows(now, limit + len(claimed), sync_id)
        out = []
        for row in rows:
            seq, key = row[0], (row[2], row[3])
            if seq in claimed or key in records:
                continue  # held already: not rendered again
            claimed.add(seq)
            records[key] = seq
            out.append(pending_event(*row))
            if len(out) >= limit:
                break
        return out

    async def claim_spread(self, now: float, rooms: dict[str, int]) -> list[PendingEvent]:
        """claim_due for several syncs at once, up to rooms[sync] events of each."""
        out: list[PendingEvent] = []
        for sync_id, room in rooms.items():
            out += await self.claim_due(now, room, sync_id)
        return out

    def claim_valid(self, event: PendingEvent) -> bool:
        return True  # one process: a claim cannot pass to anyone else

    async def release(self, events: list[PendingEvent]) -> None:
        """Give claimed events back unsettled (a cancelled attempt): they are claimable again."""
        for e in events:
            self._unclaim(e.seq, (e.sync_id, e.record_id))

    def _unclaim(self, seq: int, key: tuple[str, str] | None = None) -> None:
        if seq not in self._claimed:
            return
        self._claimed.discard(seq)
        if key is None:
            key = next((k for k, s in self._claimed_records.items() if s == seq), None)
        if key is not None and self._claimed_records.get(key) == seq:
            del self._claimed_records[key]

    async def due_syncs(self, now: float) -> list[str]:
        """Syncs with undelivered events due now (some may be waiting behind an earlier event)."""
        async with self._run_commit:
            rows = await self._conn.execute_fetchall(
                "SELECT DISTINCT sync_id FROM outbox WHERE dead_at IS NULL AND next_attempt_at <= ?", (now,)
            )
        return [row[0] for row in rows]

    async def next_due(self) -> float | None:
        """When the earliest pending event is due (None when nothing is pending)."""
        # Only heads count: an event queued behind an earlier one of its record is not deliverable
        # however old its own next_attempt_at is (counting it would make an idle deliverer spin).
        async with self._run_commit:
            rows = await self._conn.execute_fetchall(
                """
                SELECT MIN(o.next_attempt_at) FROM outbox o
                WHERE o.dead_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.sync_id = o.sync_id AND p.record_id = o.record_id
                                  AND p.seq < o.seq AND p.dead_at IS NULL)
                """
            )
        return rows[0][0]

    async def record_attempts(self, delivered: list[int], retries: list[tuple], dead: list[tuple]) -> None:
        """Persist delivery outcomes in one transaction.

        delivered: seqs (removed from the outbox); retries: (attempts, next_attempt_at, status, error, seq);
        dead: (attempts, dead_at, status, error, seq)."""
        async with self._transaction() as conn:
            if delivered:
                any_dead = await conn.execute_fetchall("SELECT 1 FROM outbox WHERE dead_at IS NOT NULL LIMIT 1")
                if any_dead:
                    # A delivered event supersedes the dead letters before it of the same record:
                    # replaying one later would send stale data after newer (rare: only with dead letters).
                    await conn.executemany(
                        "UPDATE outbox SET superseded = 1 WHERE dead_at IS NOT NULL AND seq < ?1 AND (sync_id, record_id) = "
                        "(SELECT sync_id, record_id FROM outbox WHERE seq = ?1)", [(seq,) for seq in delivered])
                await conn.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in delivered])
            if retries:
                await conn.executemany(
                    "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_status = ?, last_error = ? WHERE seq = ?",
                    retries,
                )
            if dead:
                await conn.executemany(
                    "UPDATE outbox SET attempts = ?, dead_at = ?, last_status = ?, last_error = ? WHERE seq = ?", dead
                )
        if self._claimed:
            by_seq = {seq: key for key, seq in self._claimed_records.items()}
            for seq in [*delivered, *(r[-1] for r in retries), *(d[-1] for d in dead)]:
                self._unclaim(seq, by_seq.get(seq))

    async def outbox_stats(self) -> dict[str, OutboxStats]:
        rows = await self._conn.execute_fetchall(
            "SELECT sync_id, SUM(dead_at IS NULL), SUM(dead_at IS NOT NULL), "
            "MIN(CASE WHEN dead_at IS NULL THEN created_at END) FROM outbox GROUP BY sync_id"
        )
        return {row[0]: OutboxStats(row[1], row[2], row[3]) for row in rows}

    async def deliveries(self, *, sync_id: str | None = None, dead_only: bool = False, limit: int | None = None) -> list[Delivery]:
        """Undelivered events (pending and dead letters), oldest first, for `syncd deliveries list`."""
        where, args = self._where(sync_id=sync_id, dead=True if dead_only else None)
        query = (
            "SELECT seq, event_id, sync_id, record_id, event_type, webhook_url, created_at, attempts, next_attempt_at, "
            f"last_status, last_error, dead_at, dead_at IS NOT NULL AND ({_SUPERSEDED}) FROM outbox {where} ORDER BY seq"
        )
        if limit:
            query += f" LIMIT {int(limit)}"
        rows = await self._conn.execute_fetchall(query, args)
        return [Delivery(*row[:-1], superseded=bool(row[-1])) for row in rows]

    async def replay(self, *, sync_id: str | None = None, since: float | None = None, event_id: str | None = None,
                     now: float) -> tuple[int, int]:
        """Put dead letters back in the queue with fresh attempts, in their original order. A dead
        letter superseded by a later event of its record (delivered, or still queued) is skipped:
        sent now, it would arrive after that later event and undo it at the receiver (a deleted
        record brought back). Returns (replayed, skipped as superseded)."""
        where, args = self._where(sync_id=sync_id, dead=True, since=since, event_id=event_id)
        async with self._transaction() as conn:
            cursor = await conn.execute(f"UPDATE outbox SET superseded = 1 {where} AND ({_SUPERSEDED})", args)
            skipped = cursor.rowcount
            cursor = await conn.execute(
                f"UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = ?, last_status = NULL, "
                f"last_error = NULL {where} AND superseded = 0", (now, *args)
            )
            count = cursor.rowcount
        if count:
            self.outbox_changed.set()
        return count, skipped

    async def purge_dead(self, *, before: float, sync_id: str | None = None) -> int:
        """Delete dead letters that died before `before`. Returns how many."""
        where, args = self._where(sync_id=sync_id, dead=True)
        async with self._transaction() as conn:
            # A run not announced yet keeps counting its purged dead letters as dead letters.
            await conn.execute(
                f"UPDATE run_tallies SET dead_purged = dead_purged + (SELECT count(*) FROM outbox {where} AND dead_at < ? "
                "AND outbox.run_id = run_tallies.run_id) WHERE emitted_at IS NULL", (*args, before))
            cursor = await conn.execute(f"DELETE FROM outbox {where} AND dead_at < ?", (*args, before))
            return cursor.rowcount

    @staticmethod
    def _where(*, sync_id=None, dead=None, since=None, event_id=None) -> tuple[str, tuple]:
        clauses, args = [], []
        if dead is True:
            clauses.append("dead_at IS NOT NULL")
        if sync_id is not None:
            clauses.append("sync_id = ?")
            args.append(sync_id)
        if since is not None:
            clauses.append("dead_at >= ?")
            args.append(since)
        if event_id is not None:
            clauses.append("event_id = ?")
            args.append(event_id)
        return ("WHERE " + " AND ".join(clauses)) if clauses else "WHERE 1", tuple(args)

    async def outbox(self, sync_id: str | None = None) -> list[OutboxEvent]:
        """Every event still in the outbox (pending or dead), oldest first."""
        query = ("SELECT event_id, sync_id, record_id, event_type, webhook_url, created_at, body, run_id, sync_type, "
                 "sync_run_id, changed_fields FROM outbox")
        args: tuple = ()
        if sync_id is not None:
            query += " WHERE sync_id = ?"
            args = (sync_id,)
        rows = await self._conn.execute_fetchall(query + " ORDER BY seq", args)
        return [OutboxEvent(*row) for row in rows]


_STATE_COLUMNS = (
    "sync_id, shape, body_hash, generation, baselined, record_count, last_run_at, last_outcome, last_error, "
    "last_success_at, last_change_at, next_run_at, validators, last_warning, pending_deletes, deletes_held, "
    "keeps_records, body_dict"
)


def _state(row: Any) -> SyncState:
    row = list(row)
    row[4] = bool(row[4])
    row[12] = load_validators(row[12])
    row[16] = bool(row[16])
    return SyncState(*row)


