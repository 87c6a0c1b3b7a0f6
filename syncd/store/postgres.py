"""The shared state backend: PostgreSQL through asyncpg, for several syncd instances at once.

The same tables as SQLite, plus `instances` (who is alive: a heartbeat row per instance) and
`leases` (which instance polls which sync). What several instances need beyond SQLite:

- Leases per sync with a fencing token. An instance polls only the syncs it holds; a run's commit
  checks, inside its own transaction, that the lease is still this instance's with the same token
  and unexpired (the lease row is locked FOR SHARE, so nobody can take it before the commit ends).
  A paused instance whose leases expired can therefore never commit.
- Delivery claims in the outbox (`claimed_by`). `claim_due` takes the head event of each record
  (its oldest event neither delivered nor dead) with FOR UPDATE SKIP LOCKED, so a record's next
  event is claimable only once the earlier one is settled, whichever instance sends it. A claim
  lives as long as its instance's heartbeat: a dead instance's claims go to the others.
- LISTEN/NOTIFY on `syncd_outbox`: every transaction that queues deliverable events notifies, and
  every instance's deliverer wakes up.

Times are unix seconds (DOUBLE PRECISION) like SQLite's; lease and heartbeat expiry use the
database's clock, so instances on machines with skewed clocks still agree.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from contextlib import asynccontextmanager
from itertools import repeat
from typing import Any

import asyncpg
import orjson
import structlog

from syncd.store.base import (
    CONSUMED_RUNS_SQL,
    RUNS_KEPT,
    Commit,
    ConsumedRun,
    Delivery,
    FingerprintCache,
    LeaseLost,
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
    default_instance_id,
    dump_validators,
    load_validators,
    neutral_errors,
    record_event_counts,
    tallied_events,
)

log = structlog.get_logger("syncd.store")

SCHEMA_VERSION = 1
CHANNEL = "syncd_outbox"
#: Serialises schema creation and upgrades between instances starting at once.
_MIGRATION_LOCK = 0x5359_4E43_4400_0001

_SCHEMA = """
CREATE TABLE IF NOT EXISTS syncd_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS syncs (
    sync_id         TEXT PRIMARY KEY,
    shape           TEXT,
    body_hash       BYTEA,
    generation      BIGINT NOT NULL DEFAULT 0,
    baselined       BOOLEAN NOT NULL DEFAULT FALSE,
    record_count    BIGINT NOT NULL DEFAULT 0,
    last_run_at     DOUBLE PRECISION,
    last_outcome    TEXT,
    last_error      TEXT,
    last_success_at DOUBLE PRECISION,
    last_change_at  DOUBLE PRECISION,
    next_run_at     DOUBLE PRECISION,
    validators      TEXT,
    last_warning    TEXT,
    pending_deletes BIGINT NOT NULL DEFAULT 0,
    deletes_held    BIGINT NOT NULL DEFAULT 0,
    keeps_records   BOOLEAN NOT NULL DEFAULT FALSE,
    body_dict       BYTEA
);
CREATE TABLE IF NOT EXISTS records (
    sync_id     TEXT NOT NULL,
    record_id   TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    missing     INTEGER NOT NULL DEFAULT 0,
    body        BYTEA,
    PRIMARY KEY (sync_id, record_id)
);
CREATE INDEX IF NOT EXISTS records_missing ON records (sync_id) WHERE missing > 0;
CREATE TABLE IF NOT EXISTS runs (
    seq           BIGSERIAL PRIMARY KEY,
    run_id        TEXT NOT NULL,
    sync_id       TEXT NOT NULL,
    started_at    DOUBLE PRECISION NOT NULL,
    finished_at   DOUBLE PRECISION NOT NULL,
    outcome       TEXT NOT NULL,
    sync_type     TEXT,
    error         TEXT,
    records       BIGINT,
    new           BIGINT NOT NULL DEFAULT 0,
    modified      BIGINT NOT NULL DEFAULT 0,
    deleted       BIGINT NOT NULL DEFAULT 0,
    invalid_ids   BIGINT NOT NULL DEFAULT 0,
    duplicate_ids BIGINT NOT NULL DEFAULT 0,
    pages         BIGINT NOT NULL DEFAULT 0,
    warning       TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_sync ON runs (sync_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
    seq             BIGSERIAL PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    sync_id         TEXT NOT NULL,
    record_id       TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    webhook_url     TEXT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    body            BYTEA NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_status     INTEGER,
    last_error      TEXT,
    dead_at         DOUBLE PRECISION,
    superseded      BOOLEAN NOT NULL DEFAULT FALSE,
    run_id          TEXT,
    claimed_by      TEXT
);
CREATE INDEX IF NOT EXISTS outbox_by_record ON outbox (sync_id, record_id, seq);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, seq) WHERE dead_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_dead ON outbox (dead_at) WHERE dead_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_by_run ON outbox (run_id) WHERE run_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS run_tallies (
    run_id      TEXT PRIMARY KEY,
    sync_id     TEXT NOT NULL,
    sync_type   TEXT,
    webhook_url TEXT NOT NULL,
    total       BIGINT NOT NULL,
    dead_purged BIGINT NOT NULL DEFAULT 0,
    emitted_at  DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS event_hours (
    sync_id  TEXT NOT NULL,
    hour     BIGINT NOT NULL,
    new      BIGINT NOT NULL DEFAULT 0,
    modified BIGINT NOT NULL DEFAULT 0,
    deleted  BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (sync_id, hour)
);
CREATE TABLE IF NOT EXISTS sync_controls (
    sync_id      TEXT PRIMARY KEY,
    paused       BOOLEAN NOT NULL DEFAULT FALSE,
    triggered_at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    hostname    TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    started_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    sync_id    TEXT PRIMARY KEY,
    owner      TEXT,
    token      BIGINT NOT NULL DEFAULT 0,
    expires_at DOUBLE PRECISION NOT NULL DEFAULT 0
);
-- A poll that changed no fingerprint (unchanged, failed), in one statement: the fence (when p_owner
-- is given), the sync row, the run history and its trim. Returns NULL, or who holds the lease now.
CREATE OR REPLACE FUNCTION syncd_record_run(
    p_sync_id TEXT, p_owner TEXT, p_token BIGINT, p_finished DOUBLE PRECISION, p_outcome TEXT, p_error TEXT,
    p_success BOOLEAN, p_validators TEXT, p_not_before DOUBLE PRECISION, p_deletes_held BIGINT, p_run_id TEXT,
    p_started DOUBLE PRECISION, p_sync_type TEXT, p_records BIGINT, p_new BIGINT, p_modified BIGINT,
    p_deleted BIGINT, p_invalid BIGINT, p_duplicate BIGINT, p_pages BIGINT, p_warning TEXT, p_keep INTEGER
) RETURNS TEXT LANGUAGE plpgsql AS $$
DECLARE
    holder TEXT;
    held_token BIGINT;
    live BOOLEAN;
BEGIN
    IF p_owner IS NOT NULL THEN
        SELECT owner, token, expires_at > extract(epoch from clock_timestamp()) INTO holder, held_token, live
        FROM leases WHERE sync_id = p_sync_id FOR SHARE;
        IF NOT FOUND OR holder IS DISTINCT FROM p_owner OR held_token <> p_token OR NOT live THEN
            RETURN coalesce(holder, 'nobody');
        END IF;
    END IF;
    INSERT INTO syncs AS s (sync_id, last_run_at, last_outcome, last_error, last_success_at, next_run_at, deletes_held)
    VALUES (p_sync_id, p_finished, p_outcome, p_error, CASE WHEN p_success THEN p_finished END, p_not_before,
            p_deletes_held)
    ON CONFLICT (sync_id) DO UPDATE SET
        last_run_at = p_finished, last_outcome = p_outcome, last_error = p_error,
        last_success_at = CASE WHEN p_success THEN p_finished ELSE s.last_success_at END,
        validators = CASE WHEN p_success AND p_validators IS NOT NULL THEN p_validators ELSE s.validators END,
        next_run_at = p_not_before, deletes_held = p_deletes_held;
    INSERT INTO runs (run_id, sync_id, started_at, finished_at, outcome, sync_type, error, records, new, modified,
                      deleted, invalid_ids, duplicate_ids, pages, warning)
    VALUES (p_run_id, p_sync_id, p_started, p_finished, p_outcome, p_sync_type, p_error, p_records, p_new,
            p_modified, p_deleted, p_invalid, p_duplicate, p_pages, p_warning);
    DELETE FROM runs WHERE sync_id = p_sync_id
        AND seq <= (SELECT seq FROM runs WHERE sync_id = p_sync_id ORDER BY seq DESC LIMIT 1 OFFSET p_keep);
    RETURN NULL;
END
$$
"""

#: Each step takes the schema from version N to N+1 (none yet: version 1 is the first).
_MIGRATIONS: dict[int, list[str]] = {}

#: The database's clock, in unix seconds.
_NOW = "extract(epoch from clock_timestamp())"

#: SQL condition: outbox row `o` is not claimed by a live instance other than $me... or by $me.
_UNCLAIMED = ("(o.claimed_by IS NULL OR (o.claimed_by <> {me} AND NOT EXISTS (SELECT 1 FROM instances i "
              "WHERE i.instance_id = o.claimed_by AND i.expires_at > " + _NOW + ")))")
#: SQL condition: outbox row `o` is the oldest event of its record that is neither delivered nor dead.
_HEAD = ("NOT EXISTS (SELECT 1 FROM outbox p WHERE p.sync_id = o.sync_id AND p.record_id = o.record_id "
         "AND p.seq < o.seq AND p.dead_at IS NULL)")
#: SQL condition on an outbox row: a later event of its record is queued, or one was delivered.
_SUPERSEDED = ("superseded OR EXISTS (SELECT 1 FROM outbox later WHERE later.sync_id = outbox.sync_id "
               "AND later.record_id = outbox.record_id AND later.seq > outbox.seq AND later.dead_at IS NULL)")

_STATE_COLUMNS = (
    "sync_id, shape, body_hash, generation, baselined, record_count, last_run_at, last_outcome, last_error, "
    "last_success_at, last_change_at, next_run_at, validators, last_warning, pending_deletes, deletes_held, "
    "keeps_records, body_dict"
)


def store_error(exc: BaseException) -> StoreError:
    """An asyncpg or connection error as a store-neutral one."""
    if isinstance(exc, StoreError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.InvalidSchemaNameError):
        return StoreError(f"{text} (the schema that state_url's search_path names does not exist: create it with "
                          "CREATE SCHEMA, or leave search_path out to use the database's default schema)", "other")
    if isinstance(exc, asyncpg.DiskFullError | asyncpg.OutOfMemoryError):
        return StoreError(text, "full")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError | asyncpg.ReadOnlySQLTransactionError):
        return StoreError(text, "readonly")
    if isinstance(exc, asyncpg.LockNotAvailableError | asyncpg.DeadlockDetectedError):
        return StoreError(text, "locked")
    if isinstance(exc, OSError | asyncpg.InterfaceError | asyncpg.CannotConnectNowError | TimeoutError
                  | asyncpg.ConnectionDoesNotExistError | asyncpg.InvalidCatalogNameError
                  | asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
        return StoreError(f"cannot reach PostgreSQL: {text}", "unavailable")
    return StoreError(text, "other")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to reset (see PostgresStore.open)."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@neutral_errors((asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError), store_error)
class PostgresStore:
    """The state in PostgreSQL. Open with `await PostgresStore.open(url)`.

    Each open store is an instance: it keeps a heartbeat row (renewed every third of `lease_ttl`)
    that its delivery claims live by, and it can hold sync leases (`lease_tick`)."""

    def __init__(self, pool: asyncpg.Pool, url: str, *, instance_id: str, lease_ttl: float, readonly: bool) -> None:
        from syncd.settings import redact_url

        self._pool = pool
        self._url = url
        self.location = redact_url(url)
        self.instance_id = instance_id
        self.lease_ttl = lease_ttl
        self._readonly = readonly
        self.outbox_changed = asyncio.Event()
        self._cache = FingerprintCache()
        #: Leases this instance holds: sync id -> fencing token.
        self.tokens: dict[str, int] = {}
        self._listener: asyncpg.Connection | None = None
        self._heartbeat: asyncio.Task | None = None
        #: Until when (monotonic) this instance's heartbeat is surely unexpired, so its claims hold.
        self._alive_until = 0.0
        #: Bumped whenever the heartbeat lapsed: claims taken before a lapse may have been taken over.
        self._lapses = 0
        self._claim_lapse: dict[int, int] = {}
        self._closed = False
        #: Whether writes of runs need this instance's lease (see start_leasing).
        self.leasing = False
        #: This instance's fair share of the syncs at the last lease_tick.
        self.share = 0
        #: Seconds from the last lease_tick until another instance's lease or heartbeat runs out (None: none).
        self.next_expiry: float | None = None

    @classmethod
    async def open(cls, url: str, *, readonly: bool = False, instance_id: str | None = None, lease_ttl: float = 30.0,
                   pool_size: int = 10, connect_timeout: float = 10.0, instance: bool = True) -> PostgresStore:
        """`instance`: this store takes part as an instance (heartbeat, LISTEN, delivery claims, leases).
        The CLI opens one without: a `syncd status` must not count as a live instance, which would
        make the daemons give up leases for a moment."""
        # No reset query when a connection goes back to the pool (asyncpg's default runs one, a
        # round trip each time): syncd leaves no session state behind (no SET, no session locks,
        # LISTEN only on its own connection).
        pool = await asyncpg.create_pool(url, min_size=1, max_size=max(2, pool_size), timeout=connect_timeout,
                                         command_timeout=max(60.0, lease_ttl * 2), reset=_keep_session)
        try:
            async with pool.acquire() as conn:
                await _migrate(conn, readonly)
        except BaseException:
            await pool.close()
            raise
        store = cls(pool, url, instance_id=instance_id or default_instance_id(), lease_ttl=lease_ttl,
                    readonly=readonly or not instance)
        if instance and not readonly:
            try:
                await store._beat()
                await store._listen()
            except BaseException:
                await pool.close()
                raise
            store._heartbeat = asyncio.create_task(store._heartbeats(), name="state-heartbeat")
        return store

    def identity_problem(self) -> str | None:
        return None  # a server cannot be swapped for another file under us

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._listener is not None:
            try:
                await self._listener.close(timeout=2)
            except Exception:
                self._listener.terminate()
        if not self._readonly:
            try:  # leave cleanly: leases and claims go to the others at once, not after lease_ttl
                async with self._pool.acquire(timeout=2) as conn, conn.transaction():
                    await conn.execute("UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = $1", self.instance_id)
                    await conn.execute("UPDATE outbox SET claimed_by = NULL WHERE claimed_by = $1", self.instance_id)
                    await conn.execute("DELETE FROM instances WHERE instance_id = $1", self.instance_id)
            except Exception:
                pass  # they expire by themselves
        try:
            await asyncio.wait_for(self._pool.close(), 5)
        except Exception:
            self._pool.terminate()

    async def __aenter__(self) -> PostgresStore:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self):
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    # -- heartbeat and LISTEN ----------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        delay = self.lease_ttl / 3
        while True:
            await asyncio.sleep(delay)
            try:
                await self._beat()
                await self._listen()
                delay = self.lease_ttl / 3
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = min(delay, 1.0)  # the server is away: try again soon

    async def _beat(self) -> None:
        """Renew this instance's heartbeat; notice a lapse (paused, or cut off for too long)."""
        started = time.monotonic()
        host, pid = socket.gethostname(), os.getpid()
        async with self._transaction() as conn:
            alive = await conn.fetchval(
                f"UPDATE instances SET expires_at = {_NOW} + $2 WHERE instance_id = $1 AND expires_at > {_NOW} "
                "AND hostname = $3 AND pid = $4 RETURNING instance_id", self.instance_id, self.lease_ttl, host, pid)
            if alive is None:
                other = await conn.fetchrow(
                    f"SELECT hostname, pid FROM instances WHERE instance_id = $1 AND expires_at > {_NOW}", self.instance_id)
                if other is not None and (other[0], other[1]) != (host, pid):
                    if other[0] == host and not _running(other[1]):
                        log.info("taking over the instance of a process that is gone", instance=self.instance_id,
                                 previous_pid=other[1])
                    else:
                        log.warning("another live process uses this instance_id; taking it over", instance=self.instance_id,
                                    other=f"{other[0]}:{other[1]}",
                                    hint="give every syncd instance its own instance_id: two processes under one "
                                         "name share leases and claims and keep taking them from each other")
                # New, or it expired: others may have taken our claims and leases. Start afresh.
                if self._alive_until:
                    self._lapses += 1
                    self.tokens.clear()
                await conn.execute(
                    f"INSERT INTO instances (instance_id, hostname, pid, started_at, expires_at) "
                    f"VALUES ($1, $2, $3, {_NOW}, {_NOW} + $4) ON CONFLICT (instance_id) DO UPDATE SET "
                    f"expires_at = {_NOW} + $4, hostname = $2, pid = $3", self.instance_id, host, pid, self.lease_ttl)
                await conn.execute("UPDATE outbox SET claimed_by = NULL WHERE claimed_by = $1", self.instance_id)
        if started > self._alive_until and self._alive_until:
            self._lapses += 1  # our own clock says the heartbeat had lapsed meanwhile
            self.tokens.clear()
        self._alive_until = started + self.lease_ttl * 2 / 3

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        self._listener = await asyncpg.connect(self._url, timeout=10)
        await self._listener.add_listener(CHANNEL, lambda *_: self.outbox_changed.set())
        self.outbox_changed.set()  # events may have come while nobody listened

    def claim_valid(self, event: PendingEvent) -> bool:
        """Whether this instance surely still holds its claim on `event` (no heartbeat lapse since
        it was claimed): an event whose claim may have passed to another instance is not sent."""
        return time.monotonic() < self._alive_until and self._claim_lapse.get(event.seq) == self._lapses

    # -- syncs -------------------------------------------------------------------------------------

    async def sync_state(self, sync_id: str) -> SyncState:
        row = await self._pool.fetchrow(f"SELECT {_STATE_COLUMNS} FROM syncs WHERE sync_id = $1", sync_id)
        return _state(row) if row else SyncState(sync_id)

    async def all_states(self) -> list[SyncState]:
        rows = await self._pool.fetch(f"SELECT {_STATE_COLUMNS} FROM syncs ORDER BY sync_id")
        return [_state(row) for row in rows]

    async def pending_missing(self, sync_id: str) -> dict[str, int]:
        rows = await self._pool.fetch("SELECT record_id, missing FROM records WHERE sync_id = $1 AND missing > 0", sync_id)
        return {r[0]: r[1] for r in rows}

    async def bodies(self, state: SyncState, record_ids: list[str]) -> dict[str, bytes]:
        if state.body_dict is None or not record_ids:
            return {}
        rows = await self._pool.fetch(
            "SELECT record_id, body FROM records WHERE sync_id = $1 AND record_id = ANY($2::text[]) AND body IS NOT NULL",
            state.sync_id, record_ids)
        return {r[0]: decompress_body(r[1], state.body_dict) for r in rows}

    async def fingerprints(self, state: SyncState) -> dict[str, bytes]:
        cached = self._cache.get(state.sync_id, state.generation)
        if cached is not None:
            return cached
        rows = await self._pool.fetch("SELECT record_id, fingerprint FROM records WHERE sync_id = $1", state.sync_id)
        fingerprints = {r[0]: r[1] for r in rows}
        self._cache.put(state.sync_id, state.generation, fingerprints)
        return fingerprints

    async def _fence(self, conn: asyncpg.Connection, sync_id: str) -> None:
        """Refuse the write unless this instance holds the sync's lease, with its token, unexpired.
        The lease row stays locked (FOR SHARE) until the transaction ends: it cannot change hands
        before this commit is done."""
        token = self.tokens.get(sync_id)
        row = await conn.fetchrow(
            f"SELECT owner, token, expires_at > {_NOW} FROM leases WHERE sync_id = $1 FOR SHARE", sync_id)
        if token is None or row is None or row[0] != self.instance_id or row[1] != token or not row[2]:
            self.tokens.pop(sync_id, None)
            holder = row[0] if row is not None and row[0] else "nobody"
            raise LeaseLost(f"{self.instance_id} no longer holds the lease on {sync_id} (held by {holder}); "
                            "nothing was written")

    async def commit_run(self, commit: Commit) -> int:
        run = commit.run
        sid = run.sync_id
        fenced = self.leasing
        async with self._transaction() as conn:
            if fenced:
                await self._fence(conn, sid)
            current = await conn.fetchval("SELECT generation FROM syncs WHERE sync_id = $1 FOR UPDATE", sid) or 0
            if current != commit.expected_generation:
                raise StateConflict(f"the state of {sid} changed while this run was computing (generation "
                                    f"{commit.expected_generation} -> {current}: another syncd process or 'syncd reset'); "
                                    "nothing was written, the next run starts from the new state")
            if commit.replace_all:
                await conn.execute("DELETE FROM records WHERE sync_id = $1", sid)
            if commit.deletes:
                await conn.execute("DELETE FROM records WHERE sync_id = $1 AND record_id = ANY($2::text[])",
                                   sid, commit.deletes)
            if commit.upserts and (commit.replace_all or commit.expected_generation == 0) and len(commit.upserts) > _COPY_OVER:
                # Nothing stored can conflict (all deleted above, or never committed): COPY, ~4x
                # faster than an upsert for an initial run of 100k records.
                bodies = commit.bodies or {}
                await conn.copy_records_to_table(
                    "records", columns=["sync_id", "record_id", "fingerprint", "body"],
                    records=[(sid, rid, fp, bodies.get(rid)) for rid, fp in commit.upserts.items()])
            elif commit.upserts:
                ids = list(commit.upserts)
                bodies = commit.bodies
                await conn.execute(
                    "INSERT INTO records (sync_id, record_id, fingerprint, body) "
                    "SELECT $1, r, f, b FROM unnest($2::text[], $3::bytea[], $4::bytea[]) AS t(r, f, b) "
                    "ON CONFLICT (sync_id, record_id) DO UPDATE SET fingerprint = excluded.fingerprint, "
                    "body = excluded.body, missing = 0",
                    sid, ids, list(commit.upserts.values()),
                    [bodies.get(rid) for rid in ids] if bodies is not None else [None] * len(ids))
            if commit.drop_bodies:
                await conn.execute("UPDATE records SET body = NULL WHERE sync_id = $1 AND body IS NOT NULL", sid)
                await conn.execute("UPDATE syncs SET body_dict = NULL WHERE sync_id = $1", sid)
            if commit.missing:
                await conn.execute(
                    "UPDATE records SET missing = t.m FROM unnest($2::text[], $3::int[]) AS t(r, m) "
                    "WHERE records.sync_id = $1 AND records.record_id = t.r",
                    sid, list(commit.missing), list(commit.missing.values()))
            await _queue(conn, commit.events, commit.run_events)
            await _count_events(conn, sid, run.finished_at, commit.events, commit.run_events)
            if commit.tally is not None:
                await _open_tally(conn, run, commit.tally, commit.events, commit.run_events)
            pending = await conn.fetchval("SELECT count(*) FROM records WHERE sync_id = $1 AND missing > 0", sid)
            changed = commit.changed or commit.replace_all or bool(commit.upserts) or bool(commit.deletes)
            generation = await conn.fetchval(
                """
                INSERT INTO syncs (sync_id, shape, body_hash, generation, baselined, record_count,
                                   last_run_at, last_outcome, last_error, last_success_at, last_change_at,
                                   validators, last_warning, pending_deletes, deletes_held, keeps_records, body_dict)
                VALUES ($1, $2, $3, 1, TRUE, $4, $5::float8, $6, NULL, $5::float8, CASE WHEN $7::bool THEN $5::float8 END, $8, $9, $10, 0, $11, $12)
                ON CONFLICT (sync_id) DO UPDATE SET
                    shape = $2, body_hash = $3, generation = syncs.generation + 1, baselined = TRUE, record_count = $4,
                    last_run_at = $5, last_outcome = $6, last_error = NULL, last_success_at = $5,
                    last_change_at = CASE WHEN $7::bool THEN $5::float8 ELSE syncs.last_change_at END,
                    validators = $8, last_warning = $9, next_run_at = NULL, pending_deletes = $10, deletes_held = 0,
                    keeps_records = $11, body_dict = COALESCE($12, syncs.body_dict)
                RETURNING generation
                """,
                sid, commit.shape, commit.body_hash, commit.record_count, run.finished_at, run.outcome, changed,
                dump_validators(commit.validators), run.warning, pending, commit.bodies is not None, commit.body_dict)
            await _insert_run(conn, run)
            if commit.events or commit.run_events:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        if commit.events or commit.run_events:
            self.outbox_changed.set()
        self._cache.committed(commit, generation)
        return pending

    async def record_run(self, run: RunRecord, *, validators: dict[str, str] | None = None,
                         not_before: float | None = None, events: list[OutboxEvent] = (),
                         tally: tuple[str, str | None] | None = None, deletes_held: int = 0) -> None:
        success = run.outcome != "failed"
        fenced = self.leasing
        if not events:
            # The common case (unchanged and failed polls): one round trip, one statement.
            token = self.tokens.get(run.sync_id, -1) if fenced else None
            holder = await self._pool.fetchval(
                "SELECT syncd_record_run($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, "
                "$18, $19, $20, $21, $22)",
                run.sync_id, self.instance_id if fenced else None, token, run.finished_at, run.outcome, run.error,
                success, dump_validators(validators), not_before, deletes_held, run.run_id, run.started_at,
                run.sync_type, run.records, run.new, run.modified, run.deleted, run.invalid_ids, run.duplicate_ids,
                run.pages, run.warning, RUNS_KEPT)
            if holder is not None:
                self.tokens.pop(run.sync_id, None)
                raise LeaseLost(f"{self.instance_id} no longer holds the lease on {run.sync_id} (held by {holder}); "
                                "nothing was written")
            return
        async with self._transaction() as conn:
            if fenced:
                await self._fence(conn, run.sync_id)
            await conn.execute(
                """
                INSERT INTO syncs (sync_id, last_run_at, last_outcome, last_error, last_success_at, next_run_at, deletes_held)
                VALUES ($1, $2::float8, $3, $4, CASE WHEN $5::bool THEN $2::float8 END, $7::float8, $8)
                ON CONFLICT (sync_id) DO UPDATE SET
                    last_run_at = $2, last_outcome = $3, last_error = $4,
                    last_success_at = CASE WHEN $5::bool THEN $2::float8 ELSE syncs.last_success_at END,
                    validators = CASE WHEN $5::bool AND $6::text IS NOT NULL THEN $6::text ELSE syncs.validators END,
                    next_run_at = $7, deletes_held = $8
                """,
                run.sync_id, run.finished_at, run.outcome, run.error, success, dump_validators(validators), not_before,
                deletes_held)
            await _queue(conn, list(events))
            if tally is not None and events:
                await _open_tally(conn, run, tally, list(events))
            await _insert_run(conn, run)
            if events:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        if events:
            self.outbox_changed.set()

    async def events_since(self, since: float) -> dict[str, tuple[int, int, int]]:
        rows = await self._pool.fetch(
            "SELECT sync_id, sum(new), sum(modified), sum(deleted) FROM event_hours WHERE hour >= $1 GROUP BY sync_id",
            int(since // 3600))
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}

    async def runs(self, sync_id: str, limit: int = 20) -> list[RunRecord]:
        rows = await self._pool.fetch(
            "SELECT run_id, sync_id, started_at, finished_at, outcome, sync_type, error, records, new, modified, "
            "deleted, invalid_ids, duplicate_ids, pages, warning FROM runs WHERE sync_id = $1 ORDER BY seq DESC LIMIT $2",
            sync_id, limit)
        return [RunRecord(*row) for row in rows]

    async def all_runs(self, sync_id: str) -> list[RunRecord]:
        return list(reversed(await self.runs(sync_id, limit=RUNS_KEPT)))

    async def paused(self) -> set[str]:
        rows = await self._pool.fetch("SELECT sync_id FROM sync_controls WHERE paused")
        return {r[0] for r in rows}

    async def set_paused(self, sync_id: str, paused: bool) -> None:
        await self._pool.execute("INSERT INTO sync_controls (sync_id, paused) VALUES ($1, $2) "
                                 "ON CONFLICT (sync_id) DO UPDATE SET paused = excluded.paused", sync_id, paused)

    async def reset(self, sync_id: str) -> bool:
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM records WHERE sync_id = $1", sync_id)
            found = await conn.fetchval(
                "UPDATE syncs SET shape = NULL, body_hash = NULL, baselined = FALSE, record_count = 0, validators = NULL, "
                "last_warning = NULL, pending_deletes = 0, deletes_held = 0, keeps_records = FALSE, body_dict = NULL, "
                "generation = generation + 1 WHERE sync_id = $1 RETURNING sync_id", sync_id)
        self._cache.forget(sync_id)
        return found is not None

    # -- leases --------------------------------------------------------------------------------------

    def start_leasing(self) -> None:
        """Writes of runs need this instance's lease from now on (a daemon that takes leases;
        `syncd once` and `reset` rely on the generation check alone, as with SQLite)."""
        self.leasing = True

    async def lease_tick(self, wanted: set[str], busy: set[str] = frozenset()) -> dict[str, int]:
        """Renew this instance's leases, then take or give back leases so that it holds about its
        fair share of `wanted` (the syncs it would poll): ceil(len(wanted) / live instances).
        Syncs under way (`busy`) are given back last. Returns the leases held: sync id -> token."""
        ttl = self.lease_ttl
        if self._alive_until and time.monotonic() > self._alive_until:
            await self._beat()  # the heartbeat lapsed (we were paused): know it before renewing anything
        async with self._transaction() as conn:
            if wanted:
                await conn.execute("INSERT INTO leases (sync_id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                                   sorted(wanted))
            rows = await conn.fetch(
                f"UPDATE leases SET expires_at = {_NOW} + $2 WHERE owner = $1 AND expires_at > {_NOW} "
                "RETURNING sync_id, token", self.instance_id, ttl)
            held = {r[0]: r[1] for r in rows}
            gone = [s for s in held if s not in wanted]
            if gone:
                await conn.execute("UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = $1 AND sync_id = ANY($2)",
                                   self.instance_id, gone)
                for s in gone:
                    del held[s]
            live = await conn.fetchval(f"SELECT count(*) FROM instances WHERE expires_at > {_NOW}") or 1
            share = self.share = -(-len(wanted) // max(1, live))
            if len(held) > share:
                extra = sorted(held, key=lambda s: (s not in busy, s), reverse=True)[:len(held) - share]
                extra = [s for s in extra if s not in busy] or []
                if extra:
                    await conn.execute(
                        "UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = $1 AND sync_id = ANY($2)",
                        self.instance_id, extra)
                    for s in extra:
                        del held[s]
            elif len(held) < share:
                rows = await conn.fetch(
                    f"""
                    WITH free AS (
                        SELECT sync_id FROM leases
                        WHERE sync_id = ANY($2::text[]) AND (owner IS NULL OR expires_at <= {_NOW})
                        ORDER BY sync_id LIMIT $3 FOR UPDATE SKIP LOCKED
                    )
                    UPDATE leases SET owner = $1, token = leases.token + 1, expires_at = {_NOW} + $4
                    FROM free WHERE leases.sync_id = free.sync_id
                    RETURNING leases.sync_id, leases.token
                    """, self.instance_id, sorted(wanted), share - len(held), ttl)
                held.update({r[0]: r[1] for r in rows})
            # When the next lease or heartbeat of another instance runs out if not renewed: a dead
            # instance's syncs can be taken right then, not up to a renewal period later.
            self.next_expiry = await conn.fetchval(
                f"SELECT min(e) - {_NOW} FROM (SELECT min(expires_at) AS e FROM leases WHERE owner IS NOT NULL "
                f"AND owner <> $1 AND expires_at > {_NOW} AND sync_id = ANY($2::text[]) UNION ALL "
                f"SELECT min(expires_at) FROM instances WHERE instance_id <> $1 AND expires_at > {_NOW}) AS t",
                self.instance_id, sorted(wanted))
        self.tokens = held
        return dict(held)

    async def request_trigger(self, sync_id: str) -> None:
        """Ask the instance holding the sync's lease to poll it now (at its next lease renewal)."""
        await self._pool.execute(
            f"INSERT INTO sync_controls (sync_id, triggered_at) VALUES ($1, {_NOW}) "
            f"ON CONFLICT (sync_id) DO UPDATE SET triggered_at = {_NOW}", sync_id)

    async def take_triggers(self, held: list[str]) -> list[str]:
        """The syncs among `held` that some instance was asked to poll now; the requests are consumed."""
        if not held:
            return []
        rows = await self._pool.fetch(
            "UPDATE sync_controls SET triggered_at = NULL WHERE sync_id = ANY($1::text[]) AND triggered_at IS NOT NULL "
            "RETURNING sync_id", held)
        return [r[0] for r in rows]

    async def lease_owners(self) -> dict[str, str]:
        """Which live instance holds each sync's lease."""
        rows = await self._pool.fetch(f"SELECT sync_id, owner FROM leases WHERE owner IS NOT NULL AND expires_at > {_NOW}")
        return {r[0]: r[1] for r in rows}

    async def instances(self) -> list[str]:
        rows = await self._pool.fetch(f"SELECT instance_id FROM instances WHERE expires_at > {_NOW} ORDER BY instance_id")
        return [r[0] for r in rows]

    # -- outbox --------------------------------------------------------------------------------------

    async def claim_due(self, now: float, limit: int, sync_id: str | None = None) -> list[PendingEvent]:
        where = "o.sync_id = $4 AND " if sync_id is not None else ""
        args: tuple = (now, limit, self.instance_id) + ((sync_id,) if sync_id is not None else ())
        # One statement: atomic on its own, and one round trip.
        rows = await self._pool.fetch(
            f"""
            WITH c AS (
                SELECT o.seq FROM outbox o
                WHERE {where}o.dead_at IS NULL AND o.next_attempt_at <= $1
                  AND {_UNCLAIMED.format(me="$3")} AND {_HEAD}
                ORDER BY o.next_attempt_at, o.seq
                LIMIT $2
                FOR UPDATE OF o SKIP LOCKED
            )
            UPDATE outbox SET claimed_by = $3 FROM c WHERE outbox.seq = c.seq
            RETURNING outbox.seq, event_id, sync_id, record_id, event_type, webhook_url, body, attempts,
                      created_at, next_attempt_at
            """, *args)
        return self._claimed(rows)

    async def claim_spread(self, now: float, rooms: dict[str, int]) -> list[PendingEvent]:
        """claim_due for several syncs at once, up to rooms[sync] events of each: one statement."""
        if not rooms:
            return []
        rows = await self._pool.fetch(
            f"""
            WITH q AS (SELECT * FROM unnest($2::text[], $3::int[]) AS q(sync_id, room)),
            c AS (
                SELECT x.seq FROM q CROSS JOIN LATERAL (
                    SELECT o.seq FROM outbox o
                    WHERE o.sync_id = q.sync_id AND o.dead_at IS NULL AND o.next_attempt_at <= $1
                      AND {_UNCLAIMED.format(me="$4")} AND {_HEAD}
                    ORDER BY o.next_attempt_at, o.seq
                    LIMIT q.room
                    FOR UPDATE OF o SKIP LOCKED
                ) x
            )
            UPDATE outbox SET claimed_by = $4 FROM c WHERE outbox.seq = c.seq
            RETURNING outbox.seq, event_id, sync_id, record_id, event_type, webhook_url, body, attempts,
                      created_at, next_attempt_at
            """, now, list(rooms), list(rooms.values()), self.instance_id)
        return self._claimed(rows)

    def _claimed(self, rows: list) -> list[PendingEvent]:
        """Rows a claim statement returned, oldest due first, stamped with the heartbeat lapse count."""
        rows = sorted(rows, key=lambda r: (r[9], r[0]))
        lapse = self._lapses
        for r in rows:
            self._claim_lapse[r[0]] = lapse
        return [PendingEvent(*r[:9]) for r in rows]

    async def release(self, events: list[PendingEvent]) -> None:
        seqs = [e.seq for e in events]
        for seq in seqs:
            self._claim_lapse.pop(seq, None)
        if seqs:
            await self._pool.execute("UPDATE outbox SET claimed_by = NULL WHERE seq = ANY($1) AND claimed_by = $2",
                                     seqs, self.instance_id)
            await self._pool.execute("SELECT pg_notify($1, '')", CHANNEL)

    async def due_events(self, now: float, limit: int, sync_id: str | None = None) -> list[PendingEvent]:
        """Deliverable events (head of their record, due, not dead), without claiming them."""
        where = "o.sync_id = $3 AND " if sync_id is not None else ""
        args: tuple = (now, limit) + ((sync_id,) if sync_id is not None else ())
        rows = await self._pool.fetch(
            f"""SELECT o.seq, o.event_id, o.sync_id, o.record_id, o.event_type, o.webhook_url, o.body, o.attempts, o.created_at
                FROM outbox o WHERE {where}o.dead_at IS NULL AND o.next_attempt_at <= $1 AND {_HEAD}
                ORDER BY o.next_attempt_at, o.seq LIMIT $2""", *args)
        return [PendingEvent(*r) for r in rows]

    async def due_syncs(self, now: float) -> list[str]:
        rows = await self._pool.fetch(
            f"SELECT DISTINCT o.sync_id FROM outbox o WHERE o.dead_at IS NULL AND o.next_attempt_at <= $1 "
            f"AND {_UNCLAIMED.format(me='$2')}", now, self.instance_id)
        return [r[0] for r in rows]

    async def next_due(self) -> float | None:
        # Heads only, and not those another live instance is sending (else an idle deliverer spins).
        return await self._pool.fetchval(
            f"SELECT MIN(o.next_attempt_at) FROM outbox o WHERE o.dead_at IS NULL AND {_HEAD} "
            f"AND {_UNCLAIMED.format(me='$1')}", self.instance_id)

    async def record_attempts(self, delivered: list[int], retries: list[tuple], dead: list[tuple]) -> None:
        """Persist delivery outcomes. Only rows this instance still has claimed are touched: a
        claim that passed to another instance (ours lapsed) is that instance's to settle."""
        me = self.instance_id
        async with self._transaction() as conn:
            if delivered:
                if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM outbox WHERE dead_at IS NOT NULL)"):
                    await conn.execute(
                        "UPDATE outbox SET superseded = TRUE FROM outbox d WHERE d.seq = ANY($1::bigint[]) "
                        "AND outbox.dead_at IS NOT NULL AND outbox.sync_id = d.sync_id AND outbox.record_id = d.record_id "
                        "AND outbox.seq < d.seq", delivered)
                await conn.execute("DELETE FROM outbox WHERE seq = ANY($1::bigint[]) AND claimed_by = $2", delivered, me)
            if retries:
                await conn.executemany(
                    "UPDATE outbox SET attempts = $1, next_attempt_at = $2, last_status = $3, last_error = $4, "
                    "claimed_by = NULL WHERE seq = $5 AND claimed_by = $6", [(*r, me) for r in retries])
            if dead:
                await conn.executemany(
                    "UPDATE outbox SET attempts = $1, dead_at = $2, last_status = $3, last_error = $4, "
                    "claimed_by = NULL WHERE seq = $5 AND claimed_by = $6", [(*d, me) for d in dead])
            if delivered or dead:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)  # the records' next events are due
        for seq in [*delivered, *(r[4] for r in retries), *(d[4] for d in dead)]:
            self._claim_lapse.pop(seq, None)

    async def consumed_runs(self) -> list[ConsumedRun]:
        return consumed_runs_of(await self._pool.fetch(CONSUMED_RUNS_SQL))

    async def announce_consumed(self, events: list[OutboxEvent], run_ids: list[str], now: float) -> None:
        """Queue the allConsumed events of runs nobody announced yet: with several instances the
        first to mark a run announced queues its event; the others queue nothing for it."""
        async with self._transaction() as conn:
            marked = await conn.fetch(
                "UPDATE run_tallies SET emitted_at = $1 WHERE run_id = ANY($2::text[]) AND emitted_at IS NULL "
                "RETURNING run_id", now, run_ids)
            mine = {r[0] for r in marked}
            events = [e for e in events if _run_of(e) in mine]
            await _queue(conn, events)
            if events:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        if events:
            self.outbox_changed.set()

    async def outbox_stats(self) -> dict[str, OutboxStats]:
        rows = await self._pool.fetch(
            "SELECT sync_id, count(*) FILTER (WHERE dead_at IS NULL), count(*) FILTER (WHERE dead_at IS NOT NULL), "
            "MIN(created_at) FILTER (WHERE dead_at IS NULL) FROM outbox GROUP BY sync_id")
        return {r[0]: OutboxStats(r[1], r[2], r[3]) for r in rows}

    async def deliveries(self, *, sync_id: str | None = None, dead_only: bool = False,
                         limit: int | None = None) -> list[Delivery]:
        where, args = _where(sync_id=sync_id, dead=True if dead_only else None)
        query = ("SELECT seq, event_id, sync_id, record_id, event_type, webhook_url, created_at, attempts, next_attempt_at, "
                 f"last_status, last_error, dead_at, dead_at IS NOT NULL AND ({_SUPERSEDED}) FROM outbox {where} ORDER BY seq")
        if limit:
            query += f" LIMIT {int(limit)}"
        rows = await self._pool.fetch(query, *args)
        return [Delivery(*row[:-1], superseded=bool(row[-1])) for row in rows]

    async def replay(self, *, sync_id: str | None = None, since: float | None = None, event_id: str | None = None,
                     now: float) -> tuple[int, int]:
        where, args = _where(sync_id=sync_id, dead=True, since=since, event_id=event_id)
        async with self._transaction() as conn:
            skipped = _count(await conn.execute(f"UPDATE outbox SET superseded = TRUE {where} AND ({_SUPERSEDED})", *args))
            n = len(args) + 1
            count = _count(await conn.execute(
                f"UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = ${n}, last_status = NULL, "
                f"last_error = NULL, claimed_by = NULL {where} AND NOT superseded", *args, now))
            if count:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
        if count:
            self.outbox_changed.set()
        return count, skipped

    async def purge_dead(self, *, before: float, sync_id: str | None = None) -> int:
        where, args = _where(sync_id=sync_id, dead=True)
        n = len(args) + 1
        async with self._transaction() as conn:
            await conn.execute(
                f"UPDATE run_tallies SET dead_purged = dead_purged + (SELECT count(*) FROM outbox {where} "
                f"AND dead_at < ${n} AND outbox.run_id = run_tallies.run_id) WHERE emitted_at IS NULL", *args, before)
            return _count(await conn.execute(f"DELETE FROM outbox {where} AND dead_at < ${n}", *args, before))

    async def outbox(self, sync_id: str | None = None) -> list[OutboxEvent]:
        query = "SELECT event_id, sync_id, record_id, event_type, webhook_url, created_at, body, run_id FROM outbox"
        args: tuple = ()
        if sync_id is not None:
            query += " WHERE sync_id = $1"
            args = (sync_id,)
        rows = await self._pool.fetch(query + " ORDER BY seq", *args)
        return [OutboxEvent(*row) for row in rows]


# -- helpers ---------------------------------------------------------------------------------------


async def _migrate(conn: asyncpg.Connection, readonly: bool) -> None:
    """Create the schema, or bring an older one up to date, once (an advisory lock serialises
    instances starting together); refuse a schema written by a newer syncd."""
    async with conn.transaction():
        if not readonly:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        exists = await conn.fetchval("SELECT to_regclass('syncd_meta') IS NOT NULL")
        version = int(await conn.fetchval("SELECT value FROM syncd_meta WHERE key = 'schema_version'") or 0) if exists else 0
        if version > SCHEMA_VERSION:
            raise SchemaError(f"the PostgreSQL state has schema version {version}, newer than this syncd's "
                              f"({SCHEMA_VERSION}): it was written by a newer syncd; upgrade syncd")
        if readonly:
            if version != SCHEMA_VERSION:
                raise SchemaError(f"the PostgreSQL state has schema version {version}; this syncd reads version "
                                  f"{SCHEMA_VERSION} (start 'syncd run' once to create or upgrade it)")
            return
        if version == SCHEMA_VERSION:
            return
        for step in range(max(version, 1), SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                await conn.execute(statement)
        await conn.execute(_SCHEMA)
        await conn.execute("INSERT INTO syncd_meta (key, value) VALUES ('schema_version', $1) "
                           "ON CONFLICT (key) DO UPDATE SET value = excluded.value", str(SCHEMA_VERSION))


_COPY_OVER = 200  # events queued with COPY above this many (an initial run of 100k records)


async def _queue(conn: asyncpg.Connection, events: list[OutboxEvent], run_events: RunEvents | None = None) -> None:
    """A run's record events (first) and other events. Stored as whole envelopes: several
    instances, possibly of different syncd versions during an upgrade, read these rows, and all of
    them can send a stored envelope as it is."""
    rows = []
    if run_events:
        r = run_events
        rows = list(zip(r.event_ids, repeat(r.sync_id), r.record_ids, map(str, r.types), repeat(r.webhook_url),
                        repeat(r.created_at), r.envelopes(), repeat(r.run_id), strict=False))
    rows += [(e.event_id, e.sync_id, e.record_id, str(e.event_type), e.webhook_url, e.created_at, e.envelope(), e.run_id)
             for e in events]
    if not rows:
        return
    columns = ["event_id", "sync_id", "record_id", "event_type", "webhook_url", "created_at", "body", "run_id"]
    if len(rows) > _COPY_OVER:
        await conn.copy_records_to_table("outbox", records=rows, columns=columns)
    else:
        await conn.executemany(
            "INSERT INTO outbox (event_id, sync_id, record_id, event_type, webhook_url, created_at, body, run_id) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", rows)


async def _open_tally(conn: asyncpg.Connection, run: RunRecord, tally: tuple[str, str | None],
                      events: list[OutboxEvent], run_events: RunEvents | None = None) -> None:
    total = tallied_events(events, run_events)
    if total:
        await conn.execute("INSERT INTO run_tallies (run_id, sync_id, sync_type, webhook_url, total) "
                           "VALUES ($1, $2, $3, $4, $5)", run.run_id, run.sync_id, tally[1], tally[0], total)


async def _count_events(conn: asyncpg.Connection, sync_id: str, at: float, events: list[OutboxEvent],
                        run_events: RunEvents | None = None) -> None:
    counts = record_event_counts(events, run_events)
    if not any(counts):
        return
    hour = int(at // 3600)
    await conn.execute(
        "INSERT INTO event_hours (sync_id, hour, new, modified, deleted) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (sync_id, hour) DO UPDATE SET new = event_hours.new + $3, modified = event_hours.modified + $4, "
        "deleted = event_hours.deleted + $5", sync_id, hour, *counts)
    await conn.execute("DELETE FROM event_hours WHERE sync_id = $1 AND hour < $2", sync_id, hour - 48)


async def _insert_run(conn: asyncpg.Connection, run: RunRecord) -> None:
    await conn.execute(
        "INSERT INTO runs (run_id, sync_id, started_at, finished_at, outcome, sync_type, error, records, new, "
        "modified, deleted, invalid_ids, duplicate_ids, pages, warning) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        run.run_id, run.sync_id, run.started_at, run.finished_at, run.outcome, run.sync_type, run.error,
        run.records, run.new, run.modified, run.deleted, run.invalid_ids, run.duplicate_ids, run.pages, run.warning)
    await conn.execute(
        "DELETE FROM runs WHERE sync_id = $1 AND seq <= "
        "(SELECT seq FROM runs WHERE sync_id = $1 ORDER BY seq DESC LIMIT 1 OFFSET $2)", run.sync_id, RUNS_KEPT)


def _where(*, sync_id=None, dead=None, since=None, event_id=None) -> tuple[str, tuple]:
    clauses, args = [], []
    if dead is True:
        clauses.append("dead_at IS NOT NULL")
    for column, value, op in (("sync_id", sync_id, "="), ("dead_at", since, ">="), ("event_id", event_id, "=")):
        if value is not None:
            args.append(value)
            clauses.append(f"{column} {op} ${len(args)}")
    return ("WHERE " + " AND ".join(clauses)) if clauses else "WHERE TRUE", tuple(args)


def _count(status: str) -> int:
    """Rows affected, from asyncpg's command status ("UPDATE 3", "DELETE 0")."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, AttributeError):
        return 0


def _run_of(event: OutboxEvent) -> str | None:
    """The run an allConsumed event announces (its body's data.syncRunId)."""
    try:
        return orjson.loads(event.body)["syncRunId"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def _state(row: Any) -> SyncState:
    row = list(row)
    row[12] = load_validators(row[12])
    return SyncState(*row)


